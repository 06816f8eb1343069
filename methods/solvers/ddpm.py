"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over any grid of the VP schedule.

Each step draws x_s ~ q(x_s | x_t, x0_hat): the posterior mean with the posterior variance
(``variance: small``, beta-tilde) or with the forward step's variance (``large``, beta), the two
choices of the paper; no noise is added on the final step to the data.
"""

from __future__ import annotations

import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, VP_KINDS, GridSolver
from methods.solvers.core import Callback, Grid, ODEModel, ancestral_sigma, noise_like, notify


@torch.no_grad()
def sample_ddpm(
    model: ODEModel,
    x: torch.Tensor,
    grid: Grid,
    variance: str = "small",
    generators: list[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat) at each step."""
    for i in range(grid.steps):
        x0, eps = model(x, grid.t[i])
        notify(callback, i=i, t=grid.t[i], x=x, x0=x0, eps=eps)
        a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
        a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        c = ancestral_sigma(grid, i)  # posterior std (beta-tilde)
        x = a_s * x0 + (max(s_s**2 - c**2, 0.0) ** 0.5) * eps  # posterior mean
        if s_s > 0:
            std = c if variance == "small" else max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0) ** 0.5  # beta_t
            x = x + std * noise_like(x, generators)
    return x


@register_method
class DDPM(GridSolver):
    name = "ddpm"
    paper = "Ho et al. 2020, Denoising Diffusion Probabilistic Models, arXiv 2006.11239"
    applies_to = VP_KINDS
    description = "stochastic ancestral sampling from the DDPM posterior (beta-tilde or beta variance)"
    knobs = (
        *SCHEDULE_KNOBS,
        Knob("variance", str, "small", "posterior variance beta-tilde (small) or beta (large)", choices=("small", "large")),
    )

    def sample(self, model, x, grid, generators):
        return sample_ddpm(model, x, grid, self.config["variance"], generators)
