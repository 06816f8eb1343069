"""DDIM (Song et al. 2021): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z.

eta = 0 is the deterministic sampler (Euler on the eps-ODE in x/alpha, sigma/alpha);
eta = 1 gives the DDPM posterior variance. Written here rather than wrapping diffusers'
DDIMScheduler because that one steps to ``t - T // n``, which is not the next timestep when n
does not divide T (15, 6, 8 ... steps), so it would not solve the ODE it claims to.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, VP_KINDS, GridSolver
from methods.solvers.core import Callback, Grid, ODEModel, ancestral_sigma, noise_like, notify


def trailing_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """Integer timesteps T-1, ..., spaced T/steps apart (the 'trailing' spacing of Lin et al. 2024)."""
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1


@torch.no_grad()
def sample_ddim(
    model: ODEModel,
    x: torch.Tensor,
    grid: Grid,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM over the grid (Song et al. 2021, Eq. 12), ending at sigma = 0."""
    for i in range(grid.steps):
        x0, eps = model(x, grid.t[i])
        notify(callback, i=i, t=grid.t[i], x=x, x0=x0, eps=eps)
        a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        c = eta * ancestral_sigma(grid, i)
        x = a_s * x0 + (max(s_s**2 - c**2, 0.0) ** 0.5) * eps
        if c > 0:
            x = x + c * noise_like(x, generators)
    return x


@register_method
class DDIM(GridSolver):
    name = "ddim"
    paper = "Song et al. 2021, Denoising Diffusion Implicit Models, arXiv 2010.02502"
    applies_to = VP_KINDS
    description = "DDIM; eta = 0 deterministic (Euler on the eps-ODE), eta = 1 DDPM-like ancestral"
    knobs = (
        *SCHEDULE_KNOBS,
        Knob("eta", float, 0.0, "stochasticity: 0 deterministic, 1 DDPM posterior variance", low=0.0, high=1.0),
    )

    def sample(self, model, x, grid, generators):
        return sample_ddim(model, x, grid, self.config["eta"], generators)
