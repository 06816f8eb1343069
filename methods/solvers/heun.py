"""Heun's second-order method (Karras et al. 2022, Algorithm 1; Algorithm 2 with churn).

Same frames as Euler (VE sigma_bar for VP, s for flow as diffusers' FlowMatchHeunDiscreteScheduler).
The step into sigma = 0 is an Euler step (EDM: no correction where sigma_{i+1} = 0), so n steps
cost 2n - 1 network evaluations.
"""

from __future__ import annotations

import torch

from bench.adapter import register_method
from methods.solvers.base import BUDGET_KNOB, SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Frame, Grid, ODEModel, notify
from methods.solvers.euler import CHURN_KNOBS, churn_start


@torch.no_grad()
def sample_heun(
    model: ODEModel,
    x: torch.Tensor,
    grid: Grid,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generators: list[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """EDM Heun over the grid in the model's frame."""
    frame = Frame(model.schedule)
    tau, n = frame.tau(grid), grid.steps
    for i in range(n):
        x, t, tau_i = churn_start(model, frame, x, grid, tau, i, s_churn, s_tmin, s_tmax, s_noise, generators)
        y = frame.to_y(x, frame.alpha_of_tau(tau_i))
        x0, eps = model(x, t)
        notify(callback, i=i, t=t, x=x, x0=x0, eps=eps)
        d = frame.slope(x0, eps)
        h = float(tau[i + 1]) - tau_i
        y_next = y + h * d
        if grid.sigma[i + 1] > 0:  # second-order correction (EDM Algorithm 1, lines 6-8)
            a_next = float(grid.alpha[i + 1])
            x0_2, eps_2 = model(frame.to_x(y_next, a_next), grid.t[i + 1])
            y_next = y + h * 0.5 * (d + frame.slope(x0_2, eps_2))
        x = frame.to_x(y_next, float(grid.alpha[i + 1]))
    return x


@register_method
class Heun(GridSolver):
    name = "heun"
    paper = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models, arXiv 2206.00364"
    description = "EDM Heun (2nd order, 2 NFE per step, Euler into sigma = 0); churn gives EDM's stochastic sampler"
    knobs = (*SCHEDULE_KNOBS, BUDGET_KNOB, *CHURN_KNOBS)

    def nfe_of(self, n: int) -> int:
        return 2 * n - 1

    def sample(self, model, x, grid, generators):
        c = self.config
        return sample_heun(model, x, grid, c["s_churn"], c["s_tmin"], c["s_tmax"], c["s_noise"], generators)
