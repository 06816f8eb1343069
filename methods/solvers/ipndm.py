"""iPNDM (Zhang & Chen 2022, DEIS paper's improved PNDM): Adams-Bashforth with the fixed
equal-step coefficients of order up to 4 on the slope in the model's frame, warm-started by the
lower orders (no Runge-Kutta start).

Written here: diffusers' IPNDMScheduler steps its own made-up sine schedule rather than the
model's noise levels, so it does not solve the model's ODE. For VP models the frame is EDM's
(x / alpha, sigma_bar), the "x-space" form of the iPNDM of the DEIS and GITS code.
The fixed coefficients are the exact Adams-Bashforth weights when the grid is uniform in tau
(order k there); on other grids the step is consistent to second order.
"""

from __future__ import annotations

import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Grid, ODEModel, sample_adams

# Adams-Bashforth weights for equal steps, newest slope first.
IPNDM_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def sample_ipndm(model: ODEModel, x: torch.Tensor, grid: Grid, order: int = 4, callback: Callback | None = None) -> torch.Tensor:
    """iPNDM over the grid: y_{i+1} = y_i + h_i sum_j c_j d_{i-j}, lower orders while warming up."""
    return sample_adams(model, x, grid, order, lambda tau, i, k: IPNDM_COEFFS[k], callback)


@register_method
class IPNDM(GridSolver):
    name = "ipndm"
    paper = "Zhang & Chen 2022, Fast Sampling of Diffusion Models with Exponential Integrator, arXiv 2204.13902 (iPNDM)"
    description = "improved PNDM: fixed-coefficient Adams-Bashforth (order 1-4) with lower-order warm start"
    knobs = (*SCHEDULE_KNOBS, Knob("order", int, 4, "multistep order", low=1, high=4))

    def sample(self, model, x, grid, generators):
        return sample_ipndm(model, x, grid, self.config["order"])
