"""DPM-Solver++(2M) SDE (Lu et al. 2022, arXiv 2211.01095; diffusers' ``sde-dpmsolver++``,
k-diffusion's ``sample_dpmpp_2m_sde``): the multistep data-prediction solver of the reverse SDE.

x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) (D + D1 / 2) + sigma_t sqrt(1 - e^{-2h}) z,
D1 = (x0_s - x0_prev) / r (midpoint form), first order on the first step and into sigma = 0.
"""

from __future__ import annotations

import math

import torch

from bench.adapter import register_method
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Grid, ODEModel, noise_like, notify


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: ODEModel,
    x: torch.Tensor,
    grid: Grid,
    generators: list[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) for the reverse SDE over the grid."""
    lam = grid.lam
    x0_prev, h_prev = None, None
    for i in range(grid.steps):
        x0, eps = model(x, grid.t[i])
        notify(callback, i=i, t=grid.t[i], x=x, x0=x0, eps=eps)
        s_s, a_t, s_t = float(grid.sigma[i]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        if s_t == 0.0:
            return x0
        h = float(lam[i + 1] - lam[i])
        w = -math.expm1(-2 * h)  # 1 - e^{-2h}
        D = x0
        if x0_prev is not None and math.isfinite(h_prev):
            D = x0 + 0.5 * (x0 - x0_prev) / (h_prev / h)
        x = (s_t / s_s) * math.exp(-h) * x + a_t * w * D + s_t * math.sqrt(w) * noise_like(x, generators)
        x0_prev, h_prev = x0, h
    return x


@register_method
class DPMSolverPP2MSDE(GridSolver):
    name = "dpmpp_2m_sde"
    paper = "Lu et al. 2022, DPM-Solver++: Fast Solver for Guided Sampling, arXiv 2211.01095 (SDE variant)"
    description = "DPM-Solver++(2M) for the reverse SDE (stochastic, data prediction)"
    pure_noise_start = False
    knobs = SCHEDULE_KNOBS

    def sample(self, model, x, grid, generators):
        return sample_dpmpp_2m_sde(model, x, grid, generators)
