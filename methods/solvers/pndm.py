"""PNDM (Liu et al. 2022): pseudo numerical methods with the DDIM step as transfer function.

F-PNDM: three pseudo Runge-Kutta steps (4 evaluations each, Eq. 13 of the paper) start the
pseudo linear multistep, which combines the last four slopes with the fourth-order
Adams-Bashforth weights (Eq. 12). S-PNDM: one pseudo improved-Euler step (2 evaluations), then
the second-order combination. The transfer phi is the DDIM step, i.e. an Euler step in the model's
frame, so the slopes live there (eps for VP models, velocity for flow models). Runge-Kutta stages
sit at the frame midpoint of each step; a Runge-Kutta or improved-Euler step into sigma = 0 is a
plain DDIM step (no evaluation at sigma = 0).

Written here: diffusers' PNDMScheduler rounds its Runge-Kutta half steps to integer timesteps
and supports only its own spacing, so it cannot run a custom schedule.
"""

from __future__ import annotations

import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import BUDGET_KNOB, SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import IPNDM_COEFFS, Callback, Frame, Grid, ODEModel, notify

WARMUP = {"f": 3, "s": 1}
PLMS_ORDER = {"f": 4, "s": 2}


@torch.no_grad()
def sample_pndm(
    model: ODEModel, x: torch.Tensor, grid: Grid, variant: str = "f", callback: Callback | None = None
) -> torch.Tensor:
    """F-PNDM (variant 'f') or S-PNDM ('s') over the grid."""
    frame = Frame(model.schedule)
    tau = frame.tau(grid)
    order = PLMS_ORDER[variant]
    ds: list[torch.Tensor] = []

    def f(y: torch.Tensor, tau_v: float, t: float | None = None) -> torch.Tensor:
        return frame.evaluate(model, y, tau_v, t)[0]

    for i in range(grid.steps):
        y = frame.to_y(x, float(grid.alpha[i]))
        x0, eps = model(x, grid.t[i])
        notify(callback, i=i, t=grid.t[i], x=x, x0=x0, eps=eps)
        d = frame.slope(x0, eps)
        ds = [*ds[-(order - 1) :], d]
        t0, t1 = float(tau[i]), float(tau[i + 1])
        h = t1 - t0
        into_data = grid.sigma[i + 1] == 0
        if i < WARMUP[variant]:
            if into_data:
                e = d
            elif variant == "f":  # pseudo Runge-Kutta (classic RK4 stages through the transfer)
                tm = 0.5 * (t0 + t1)
                d2 = f(y + 0.5 * h * d, tm)
                d3 = f(y + 0.5 * h * d2, tm)
                d4 = f(y + h * d3, t1, float(grid.t[i + 1]))
                e = (d + 2 * d2 + 2 * d3 + d4) / 6
            else:  # pseudo improved Euler
                e = 0.5 * (d + f(y + h * d, t1, float(grid.t[i + 1])))
        else:  # pseudo linear multistep
            c = IPNDM_COEFFS[len(ds)]
            e = sum(cj * dj for cj, dj in zip(c, reversed(ds), strict=True))
        x = frame.to_x(y + h * e, float(grid.alpha[i + 1]))
    return x


@register_method
class PNDM(GridSolver):
    name = "pndm"
    paper = "Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models on Manifolds, arXiv 2202.09778"
    description = "pseudo numerical methods: F-PNDM (pseudo RK4 start, 4th-order PLMS) or S-PNDM (improved-Euler start, PLMS-2)"
    knobs = (
        *SCHEDULE_KNOBS,
        BUDGET_KNOB,
        Knob("variant", str, "f", "F-PNDM (f) or S-PNDM (s)", choices=("f", "s")),
    )

    def nfe_of(self, n: int) -> int:
        warm = min(WARMUP[self.config["variant"]], n - 1)  # the step into sigma = 0 is a single DDIM step
        stages = 4 if self.config["variant"] == "f" else 2
        return warm * stages + (n - warm)

    def sample(self, model, x, grid, generators):
        return sample_pndm(model, x, grid, self.config["variant"])
