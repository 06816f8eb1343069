"""Euler ancestral (k-diffusion's ``sample_euler_ancestral``; diffusers' EulerAncestralDiscreteScheduler).

Each step splits the next noise level sigma_bar_s into a deterministic part sigma_down and fresh
noise sigma_up (sigma_up^2 = eta^2 sigma_bar_s^2 (sigma_bar_t^2 - sigma_bar_s^2) / sigma_bar_t^2),
takes an Euler step (in EDM's VE frame) to sigma_down and adds sigma_up noise. Written in the
parametrisation-free sigma_bar, so it runs on flow models too (including the start at s = 1).
"""

from __future__ import annotations

import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Grid, ODEModel, ancestral_sigma, noise_like, notify


@torch.no_grad()
def sample_euler_ancestral(
    model: ODEModel,
    x: torch.Tensor,
    grid: Grid,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generators: list[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler to sigma_down, then sigma_up of fresh noise (Song et al. 2021's reverse SDE, discretised)."""
    for i in range(grid.steps):
        x0, eps = model(x, grid.t[i])
        notify(callback, i=i, t=grid.t[i], x=x, x0=x0, eps=eps)
        a_s, sb_s = float(grid.alpha[i + 1]), float(grid.sigma_bar[i + 1])
        sigma_up = min(sb_s, eta * ancestral_sigma(grid, i) / a_s)
        sigma_down = max(sb_s**2 - sigma_up**2, 0.0) ** 0.5
        xb = x0 + sigma_down * eps  # Euler in (x/alpha, sigma_bar) from sigma_bar_t to sigma_down
        if sigma_up > 0:
            xb = xb + s_noise * sigma_up * noise_like(x, generators)
        x = a_s * xb
    return x


@register_method
class EulerAncestral(GridSolver):
    name = "euler_ancestral"
    paper = "Karras et al. 2022, arXiv 2206.00364 (k-diffusion's ancestral Euler); Song et al. 2021, arXiv 2011.13456"
    description = "ancestral Euler: Euler step to sigma_down plus sigma_up of fresh noise (eta scales the noise)"
    knobs = (
        *SCHEDULE_KNOBS,
        Knob("eta", float, 1.0, "ancestral noise: 0 is Euler/DDIM, 1 the full reverse-SDE amount", low=0.0, high=1.0),
        Knob("s_noise", float, 1.0, "scale of the added noise", low=0.0, high=2.0),
    )

    def sample(self, model, x, grid, generators):
        return sample_euler_ancestral(model, x, grid, self.config["eta"], self.config["s_noise"], generators)
