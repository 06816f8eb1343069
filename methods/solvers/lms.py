"""Linear multistep (k-diffusion's ``sample_lms``; diffusers' LMSDiscreteScheduler).

Variable-step Adams-Bashforth of order k in the model's frame: the slope is extrapolated by the
Lagrange polynomial through the last k slopes (as a function of tau) and integrated exactly over
the step; the first steps use the lower orders the history allows.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Grid, ODEModel, lagrange_integrals, sample_adams


def _lms_weights(tau: np.ndarray, i: int, k: int) -> np.ndarray:
    """Integrals over [tau_i, tau_{i+1}] of the Lagrange basis through tau_i, tau_{i-1}, ..., in units of the step."""
    return lagrange_integrals((tau[i - k + 1 : i + 1][::-1] - tau[i]) / float(tau[i + 1] - tau[i]))


def sample_lms(model: ODEModel, x: torch.Tensor, grid: Grid, order: int = 4, callback: Callback | None = None) -> torch.Tensor:
    """Order-k linear multistep over the grid (k-diffusion's LMS)."""
    return sample_adams(model, x, grid, order, _lms_weights, callback)


@register_method
class LMS(GridSolver):
    name = "lms"
    paper = "Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models on Manifolds, arXiv 2202.09778 (linear multistep; k-diffusion)"
    description = "variable-step Adams-Bashforth (linear multistep) on the slope in the model's frame, order 1-4"
    knobs = (*SCHEDULE_KNOBS, Knob("order", int, 4, "multistep order", low=1, high=4))

    def sample(self, model, x, grid, generators):
        return sample_lms(model, x, grid, self.config["order"])
