"""Linear multistep (k-diffusion's ``sample_lms``; diffusers' LMSDiscreteScheduler).

Variable-step Adams-Bashforth of order k in the model's frame: the slope is extrapolated by the
Lagrange polynomial through the last k slopes (as a function of tau) and integrated exactly over
the step; the first steps use the lower orders the history allows.
"""

from __future__ import annotations

import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Frame, Grid, ODEModel, lagrange_integrals, notify


@torch.no_grad()
def sample_lms(model: ODEModel, x: torch.Tensor, grid: Grid, order: int = 4, callback: Callback | None = None) -> torch.Tensor:
    """Order-k linear multistep over the grid (k-diffusion's LMS)."""
    frame = Frame(model.schedule)
    tau = frame.tau(grid)
    ds: list[torch.Tensor] = []
    for i in range(grid.steps):
        y = frame.to_y(x, float(grid.alpha[i]))
        x0, eps = model(x, grid.t[i])
        notify(callback, i=i, t=grid.t[i], x=x, x0=x0, eps=eps)
        ds = [*ds[-(order - 1) :], frame.slope(x0, eps)] if order > 1 else [frame.slope(x0, eps)]
        h = float(tau[i + 1] - tau[i])
        k = len(ds)
        w = lagrange_integrals((tau[i - k + 1 : i + 1][::-1] - tau[i]) / h)  # nodes tau_i, tau_{i-1}, ...
        y = y + h * sum(float(wj) * d for wj, d in zip(w, reversed(ds), strict=True))
        x = frame.to_x(y, float(grid.alpha[i + 1]))
    return x


@register_method
class LMS(GridSolver):
    name = "lms"
    paper = "Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models on Manifolds, arXiv 2202.09778 (linear multistep; k-diffusion)"
    description = "variable-step Adams-Bashforth (linear multistep) on the slope in the model's frame, order 1-4"
    knobs = (*SCHEDULE_KNOBS, Knob("order", int, 4, "multistep order", low=1, high=4))

    def sample(self, model, x, grid, generators):
        return sample_lms(model, x, grid, self.config["order"])
