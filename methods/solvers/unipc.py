"""UniPC (Zhao et al. 2023, arXiv 2302.04867): unified predictor-corrector with the data prediction.

For a step s -> t (h = lambda_t - lambda_s) the exact solution is
x_t = (sigma_t / sigma_s) x_s + alpha_t sum_k J_{k+1}(h) D^(k), J_k = integral_0^h e^{-(h-u)} u^(k-1)/(k-1)! du.
UniP-p replaces the k >= 1 terms by B(h) sum_m a_m (D_m - D_s) / r_m over the last p - 1 points
(r_m = (lambda_m - lambda_s) / h), with sum_m a_m r_m^(k-1) = k! J_{k+1}(h) / (h^k B(h)) for
k = 1..p-1; for p = 2 the paper fixes a_1 = 1/2. UniC-p, after the model is evaluated at the
predicted x_t (the evaluation the next step reuses, so no extra NFE), adds that point (r = 1) and
solves the p x p system (a = 1/2 for p = 1), raising the order to p + 1. B(h) = h (bh1) or
1 - e^{-h} (bh2, the data-prediction form of e^h - 1). The step into sigma = 0 is first order
without correction; ``lower_order_final`` caps the order at the number of remaining steps
(diffusers' rule).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.adapter import Knob, register_method
from methods.solvers.base import SCHEDULE_KNOBS, GridSolver
from methods.solvers.core import Callback, Grid, ODEModel, notify, phi, require_positive_alpha


def _B(h: float, variant: str) -> float:
    return h if variant == "bh1" else -math.expm1(-h)


def _combination(
    hist: list[tuple[float, torch.Tensor]],
    lam_s: float,
    D_s: torch.Tensor,
    h: float,
    variant: str,
    new: tuple[float, torch.Tensor] | None,
) -> torch.Tensor:
    """B(h) sum_m a_m (D_m - D_s) / r_m over the older points in ``hist`` (and ``new`` for UniC)."""
    pts = [*hist, new] if new is not None else list(hist)
    p = len(pts)
    if p == 0:
        return torch.zeros_like(D_s)
    r = np.array([(lam - lam_s) / h for lam, _ in pts])
    Dr = [(D - D_s) / float(rm) for (_, D), rm in zip(pts, r, strict=True)]
    B = _B(h, variant)
    if p == 1:
        a = np.array([0.5])  # the paper's a_1 = 1/2 (UniP-2, UniC-1)
    else:
        g = np.array([math.factorial(k) * phi(k + 1, h) / (h**k * B) for k in range(1, p + 1)])
        R = np.vander(r, p, increasing=True).T  # R[k-1, m] = r_m^(k-1)
        a = np.linalg.solve(R, g)
    return B * sum(float(am) * d for am, d in zip(a, Dr, strict=True))


@torch.no_grad()
def sample_unipc(
    model: ODEModel,
    x: torch.Tensor,
    grid: Grid,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
    callback: Callback | None = None,
) -> torch.Tensor:
    """UniPC-p (UniP-p predictor + UniC corrector) over the grid."""
    require_positive_alpha(grid, "UniPC")
    lam = grid.lam
    n = grid.steps
    hist: list[tuple[float, torch.Tensor]] = []  # (lambda, x0) at past grid points, newest last
    prev: tuple[torch.Tensor, int, int] | None = None  # (x_s before the step, s index, predictor order)
    for i in range(n):
        D_i = model(x, grid.t[i])[0]
        notify(callback, i=i, t=grid.t[i], x=x, x0=D_i, eps=None)
        if corrector and prev is not None:  # UniC: correct x_i with the evaluation at the predicted x_i
            x_s, j, p = prev
            lam_s, D_s = hist[-1]
            h = float(lam[i] - lam_s)
            older = hist[-p:-1] if p > 1 else []
            x = (float(grid.sigma[i]) / float(grid.sigma[j])) * x_s + float(grid.alpha[i]) * (
                phi(1, h) * D_s + _combination(older, lam_s, D_s, h, variant, (float(lam[i]), D_i))
            )
        hist = [*hist[-(order - 1) :], (float(lam[i]), D_i)] if order > 1 else [(float(lam[i]), D_i)]
        s_t = float(grid.sigma[i + 1])
        if s_t == 0.0:
            return D_i
        p = min(order, len(hist))
        if lower_order_final:
            p = min(p, n - i)
        h = float(lam[i + 1] - lam[i])
        older = hist[-p:-1] if p > 1 else []
        prev = (x, i, p)
        x = (s_t / float(grid.sigma[i])) * x + float(grid.alpha[i + 1]) * (
            phi(1, h) * D_i + _combination(older, float(lam[i]), D_i, h, variant, None)
        )
    return x


@register_method
class UniPC(GridSolver):
    name = "unipc"
    paper = (
        "Zhao et al. 2023, UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models, arXiv 2302.04867"
    )
    description = "UniP-p predictor + UniC corrector (order p + 1 at no extra NFE), data prediction, B(h) bh1/bh2"
    pure_noise_start = False
    knobs = (
        *SCHEDULE_KNOBS,
        Knob("order", int, 2, "predictor order p (UniC makes it p + 1)", low=1, high=3),
        Knob("variant", str, "bh2", "B(h): bh1 = h, bh2 = 1 - e^{-h}", choices=("bh1", "bh2")),
        Knob("corrector", bool, True, "apply UniC (off: UniP alone, order p)"),
        Knob("lower_order_final", bool, True, "cap the order at the remaining steps (diffusers' rule)"),
    )

    def sample(self, model, x, grid, generators):
        c = self.config
        return sample_unipc(model, x, grid, c["order"], c["variant"], c["corrector"], c["lower_order_final"])
