"""DEIS (Zhang & Chen 2022, arXiv 2204.13902): tAB-DEIS, the exponential integrator with
Adams-Bashforth extrapolation of the noise prediction in time.

In EDM's frame (x_bar = x / alpha, rho = sigma_bar) the PF-ODE is dx_bar/drho = eps exactly, so
x_bar_{i+1} = x_bar_i + sum_j C_j eps_{i-j}, C_j = integral_{t_i}^{t_{i+1}} l_j(t) drho(t), with l_j
the Lagrange basis in native time t through the last k evaluation times (the paper's Eq. 15; its
psi-weighted integrand is drho/dt here). The weights are integrated exactly: on a VP model rho(t) is
piecewise linear between integer timesteps, so each unit piece is a polynomial integral; on a flow
model rho = s / (1 - s) is integrated by Gauss-Legendre in w = -log(1 - s), where the integrand
l_j(t(w)) e^w is smooth. Order k = 1, 2, 3; warm-up with lower orders, and diffusers' lower-order
final steps for short runs.
"""

from __future__ import annotations

import numpy as np
import torch

from bench import schedules as S
from bench.adapter import Knob, register_method
from bench.denoiser import Schedule, VPSchedule
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Grid, ODEModel, notify, require_positive_alpha

_GL_X, _GL_W = np.polynomial.legendre.leggauss(12)


def _lagrange(nodes: np.ndarray, j: int, t: np.ndarray) -> np.ndarray:
    others = np.delete(nodes, j)
    return np.prod((t[..., None] - others) / (nodes[j] - others), axis=-1)


def deis_coefficients(schedule: Schedule, nodes: np.ndarray, t_from: float, t_to: float) -> np.ndarray:
    """C_j = integral from t_from to t_to of l_j(t) d sigma_bar(t), for each node j."""
    nodes = np.asarray(nodes, dtype=np.float64)
    if isinstance(schedule, VPSchedule):
        inner = np.arange(np.floor(t_from), np.ceil(t_to) - 1, -1.0)
        inner = inner[(inner < t_from) & (inner > t_to)]
        b = np.concatenate([[t_from], inner, [t_to]])
        rho = S.sigma_bar(schedule, b)
        slope = np.diff(rho) / np.diff(b)
        # Gauss-Legendre with 12 nodes is exact for the (degree <= 2) Lagrange polynomials on each piece
        mid, half = 0.5 * (b[1:] + b[:-1]), 0.5 * np.diff(b)
        tq = mid[:, None] + half[:, None] * _GL_X[None]
        return np.array([np.sum(slope * half * (_lagrange(nodes, j, tq) @ _GL_W)) for j in range(len(nodes))])
    T = schedule.num_train_timesteps
    w0, w1 = -np.log1p(-t_from / T), -np.log1p(-t_to / T)
    m = max(1, int(np.ceil(abs(w1 - w0) / 0.25)))
    edges = np.linspace(w0, w1, m + 1)
    mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * np.diff(edges)
    wq = mid[:, None] + half[:, None] * _GL_X[None]
    tq = T * -np.expm1(-wq)
    # a shifted flow time (a pipeline's schedule, sigma_bar = shift * u / (1 - u)) scales sigma_bar by its shift
    shift = float(getattr(schedule, "shift", 1.0))
    return shift * np.array([np.sum(half * ((_lagrange(nodes, j, tq) * np.exp(wq)) @ _GL_W)) for j in range(len(nodes))])


@torch.no_grad()
def sample_deis(
    model: ODEModel,
    x: torch.Tensor,
    grid: Grid,
    order: int = 3,
    lower_order_final: bool = True,
    callback: Callback | None = None,
) -> torch.Tensor:
    """tAB-DEIS of the given order over the grid."""
    require_positive_alpha(grid, "DEIS")
    eps_hist: list[torch.Tensor] = []
    n = grid.steps
    for i in range(n):
        x0, eps = model(x, grid.t[i])
        notify(callback, i=i, t=grid.t[i], x=x, x0=x0, eps=eps)
        eps_hist = [*eps_hist[-(order - 1) :], eps] if order > 1 else [eps]
        k = len(eps_hist)
        if lower_order_final and n < 15:
            k = min(k, n - i)
        if grid.sigma[i + 1] == 0 and k == 1:
            return x0
        nodes = grid.t[i - k + 1 : i + 1][::-1]  # t_i, t_{i-1}, ...
        C = deis_coefficients(model.schedule, nodes, float(grid.t[i]), float(grid.t[i + 1]))
        xb = x / float(grid.alpha[i]) + sum(float(c) * e for c, e in zip(C, reversed(eps_hist[-k:]), strict=True))
        x = float(grid.alpha[i + 1]) * xb
    return x


@register_method
class DEIS(GridSolver):
    name = "deis"
    paper = "Zhang & Chen 2022, Fast Sampling of Diffusion Models with Exponential Integrator, arXiv 2204.13902"
    description = "tAB-DEIS: exponential integrator, eps extrapolated by a Lagrange polynomial in time (order 1-3)"
    pure_noise_start = False  # works in x / alpha
    knobs = (
        *SCHEDULE_KNOBS,
        Knob("order", int, 3, "multistep order", low=1, high=3),
        Knob("lower_order_final", bool, True, "lower orders on the last steps when < 15 steps (diffusers' rule)"),
    )

    def sample(self, model, x, grid, generators):
        return sample_deis(model, x, grid, self.config["order"], self.config["lower_order_final"])
