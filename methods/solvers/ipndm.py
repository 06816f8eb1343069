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

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import IPNDM_COEFFS, sample_ipndm

__all__ = ["IPNDM", "IPNDM_COEFFS", "sample_ipndm"]  # the solver function lives in core (GITS uses it too)


@register_method
class IPNDM(GridSolver):
    name = "ipndm"
    paper = "Zhang & Chen 2022, Fast Sampling of Diffusion Models with Exponential Integrator, arXiv 2204.13902 (iPNDM)"
    description = "improved PNDM: fixed-coefficient Adams-Bashforth (order 1-4) with lower-order warm start"
    knobs = (*SCHEDULE_KNOBS, Knob("order", int, 4, "multistep order", low=1, high=4))

    def sample(self, model, x, grid, generators):
        return sample_ipndm(model, x, grid, self.config["order"])
