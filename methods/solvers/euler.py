"""Euler (Karras et al. 2022, Algorithm 1; with churn, the stochastic step of Algorithm 2).

VP models step in EDM's variance-exploding frame (y = x / alpha, tau = sigma_bar, slope eps),
where an Euler step is exactly DDIM; flow models step in s with the velocity, as diffusers'
FlowMatchEulerDiscreteScheduler does (and can start at pure noise, s = 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Frame, Grid, ODEModel, churn, notify

CHURN_KNOBS = (
    Knob("s_churn", float, 0.0, "EDM S_churn: stochasticity (0 = deterministic ODE solver)", low=0.0, high=100.0),
    Knob("s_tmin", float, 0.0, "EDM S_tmin: churn only where sigma_bar >= this", low=0.0, high=1e4),
    Knob("s_tmax", float, 1e4, "EDM S_tmax: churn only where sigma_bar <= this", low=0.0, high=1e4),
    Knob("s_noise", float, 1.0, "EDM S_noise: scale of the churn noise", low=0.0, high=2.0),
)


def churn_gamma(sigma_bar: float, n: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0."""
    if s_churn <= 0 or not s_tmin <= sigma_bar <= s_tmax:
        return 0.0
    return min(s_churn / n, math.sqrt(2) - 1)


def churn_start(
    model: ODEModel,
    frame: Frame,
    x: torch.Tensor,
    grid: Grid,
    tau: np.ndarray,
    i: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    generators: list[torch.Generator] | None,
) -> tuple[torch.Tensor, float, float]:
    """Step i's start (x, t, tau): grid point i, raised by EDM's churn where it applies (Euler and Heun)."""
    t, tau_i = float(grid.t[i]), float(tau[i])
    gamma = churn_gamma(float(grid.sigma_bar[i]), grid.steps, s_churn, s_tmin, s_tmax)
    if gamma > 0:
        x, t = churn(model, frame, x, t, gamma, s_noise, generators)
        tau_i = frame.tau_of_time(t)
    return x, t, tau_i


@torch.no_grad()
def sample_euler(
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
    """Euler over the grid in the model's frame; EDM churn when s_churn > 0."""
    frame = Frame(model.schedule)
    tau, n = frame.tau(grid), grid.steps
    for i in range(n):
        x, t, tau_i = churn_start(model, frame, x, grid, tau, i, s_churn, s_tmin, s_tmax, s_noise, generators)
        a = frame.alpha_of_tau(tau_i)
        y = frame.to_y(x, a)
        x0, eps = model(x, t)
        notify(callback, i=i, t=t, x=x, x0=x0, eps=eps)
        y = y + (float(tau[i + 1]) - tau_i) * frame.slope(x0, eps)
        x = frame.to_x(y, float(grid.alpha[i + 1]))
    return x


@register_method
class Euler(GridSolver):
    name = "euler"
    paper = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models, arXiv 2206.00364"
    description = "first-order Euler step in sigma (VE form) for VP models, in s for flow models; EDM churn optional"
    knobs = (*SCHEDULE_KNOBS, *CHURN_KNOBS)

    def sample(self, model, x, grid, generators):
        c = self.config
        return sample_euler(model, x, grid, c["s_churn"], c["s_tmin"], c["s_tmax"], c["s_noise"], generators)
