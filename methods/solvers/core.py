"""What every training-free solver shares: the noise-level grid, the model as an ODE, the two
stepping frames, per-sample noise, and the exponential-integrator weights.

A solver is one plain function ``sample_x(model, x, grid, ...) -> x0`` (k-diffusion style) over
an :class:`ODEModel` and a :class:`Grid`. Notation: ``x_t = alpha_t x0 + sigma_t eps``,
``lambda = log(alpha / sigma)``, ``sigma_bar = sigma / alpha``. The last grid point is always the
data end (sigma = 0); no solver evaluates the model there.

The solvers are written here rather than wrapped from diffusers' schedulers because those are
inexact where the exact-ODE tests look: with custom sigmas (Karras, logSNR) they round the model's
timestep to an integer while stepping with the unrounded sigma, and DPMSolverMultistepScheduler
casts flow timesteps ``1000 s`` to int64, so the model is asked about another noise level than the
step assumes (a ~1e-3 error floor on gmm; given exact times it matches ``sample_dpmpp_2m`` to 1e-8).
``tests/test_solvers_diffusers.py`` checks that on the integer trailing grid, where diffusers is
exact up to its float32 sigmas, the functions here give diffusers' answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench import schedules as S
from bench.denoiser import Denoiser, FlowSchedule, Schedule
from bench.seeds import noise_like  # noqa: F401  (used by the stochastic solvers through core)

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Grid:
    """Noise levels a solver steps through: native times ``t`` (descending; the last is sigma = 0)
    with their alpha and sigma in float64."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_times(cls, schedule: Schedule, t: np.ndarray) -> Grid:
        t = np.asarray(t, dtype=np.float64)
        a, s = S.alpha_sigma(schedule, t)
        if s[-1] != 0.0:
            raise ValueError(f"a solver grid must end at sigma = 0 (t = {S.t_data(schedule)}), got t = {t[-1]}")
        if not np.all(np.diff(t) < 0):
            raise ValueError(f"grid times must be strictly descending, got {t.tolist()}")
        return cls(t, a, s)

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    @property
    def lam(self) -> np.ndarray:
        """log(alpha / sigma): -inf at pure noise (alpha = 0), +inf at the data end."""
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)

    @property
    def sigma_bar(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return self.sigma / self.alpha


class ODEModel:
    """A denoiser with its conditioning fixed; each call is one network evaluation -> (x0, eps).

    The native time is passed in float64 for float64 states (the gmm oracle), so the model is
    asked about exactly the noise level the solver steps with.
    """

    def __init__(self, denoiser: Denoiser, cond: torch.Tensor | None = None, guidance: float = 1.0) -> None:
        self.denoiser, self.cond, self.guidance = denoiser, cond, guidance

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    def __call__(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        tt = tt.to(x.device)
        pred = self.denoiser(x, tt, self.cond, self.guidance)
        return self.denoiser.x0_eps(x, tt, pred)


class Frame:
    """The coordinates EDM-style solvers (Euler, Heun, LMS, PNDM, iPNDM) step in.

    VP models: EDM's variance-exploding form, y = x / alpha, tau = sigma_bar, dy/dtau = eps
    (Karras et al. 2022, Eq. 4 with s(t) = alpha); a VP Euler step is exactly DDIM. Flow models:
    the native rectified-flow form, y = x, tau = s, dy/dtau = eps - x0 (the velocity), which also
    starts at pure noise (s = 1), as diffusers' FlowMatch schedulers do.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.flow = isinstance(schedule, FlowSchedule)

    def tau(self, grid: Grid) -> np.ndarray:
        return grid.sigma.copy() if self.flow else grid.sigma_bar

    def to_y(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        return x if self.flow else x / alpha

    def to_x(self, y: torch.Tensor, alpha: float) -> torch.Tensor:
        return y if self.flow else y * alpha

    def slope(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps - x0 if self.flow else eps

    def tau_of_time(self, t: float) -> float:
        if self.flow:
            return float(t) / self.schedule.num_train_timesteps
        return float(S.sigma_bar(self.schedule, t))

    def time_of_tau(self, tau: float) -> float:
        """Native time of a frame time (for evaluations between grid points)."""
        if self.flow:
            return float(tau) * self.schedule.num_train_timesteps
        return float(S.time_of_sigma_bar(self.schedule, tau))

    def alpha_of_tau(self, tau: float) -> float:
        return 1.0 - float(tau) if self.flow else 1.0 / math.sqrt(1.0 + float(tau) ** 2)

    def evaluate(self, model: ODEModel, y: torch.Tensor, tau: float, t: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slope, x0) at frame point (y, tau); one network evaluation."""
        t = self.time_of_tau(tau) if t is None else t
        a = self.alpha_of_tau(tau)
        x0, eps = model(self.to_x(y, a), t)
        return self.slope(x0, eps), x0


def phi(k: int, h: float) -> float:
    """phi_k(-h) * h^k = integral_0^h e^{-(h-u)} u^(k-1)/(k-1)! du, the exponential-integrator weight
    of the (k-1)-th lambda-derivative of the data prediction over a step of length h (h may be inf).
    """
    if math.isinf(h):
        return 1.0 if k == 1 else math.inf
    if h < 1e-3:  # series, avoids cancellation: sum_m (-1)^m h^(m+k) / (m+k)!
        return sum((-1) ** m * h ** (m + k) / math.factorial(m + k) for m in range(12))
    val = -math.expm1(-h)  # k = 1: 1 - e^{-h}
    for j in range(2, k + 1):
        val = h ** (j - 1) / math.factorial(j - 1) - val  # I_j = h^(j-1)/(j-1)! - I_{j-1}
    return val


def weights_of_step(grid: Grid, i: int) -> tuple[float, float, float, float, float, float]:
    """(alpha_s, sigma_s, alpha_t, sigma_t, lambda_s, h) for the step i -> i + 1."""
    lam = grid.lam
    return (
        float(grid.alpha[i]),
        float(grid.sigma[i]),
        float(grid.alpha[i + 1]),
        float(grid.sigma[i + 1]),
        float(lam[i]),
        float(lam[i + 1] - lam[i]),
    )


def require_positive_alpha(grid: Grid, name: str) -> None:
    """Solvers that work in x / alpha cannot start at pure noise (a flow model at s = 1)."""
    if grid.alpha[0] <= 0:
        raise ValueError(f"{name} divides by alpha and cannot start at pure noise (alpha = 0); start the grid at s < 1")


def notify(callback: Callback | None, **info: Any) -> None:
    if callback is not None:
        callback(info)


def ancestral_sigma(grid: Grid, i: int) -> float:
    """Std, in x units, of the Markov posterior q(x_s | x_t, x0) for the step i -> i + 1:
    sigma_s sqrt(1 - (sigma_bar_s / sigma_bar_t)^2). On a VP path this is DDIM's eta = 1 sigma
    (the DDPM beta-tilde); in EDM terms it is k-diffusion's sigma_up times alpha_s."""
    a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
    a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
    if s_s == 0.0:
        return 0.0
    r = (s_s * a_t) / (a_s * s_t)  # 0 at pure noise (alpha_t = 0)
    return s_s * max(1.0 - r * r, 0.0) ** 0.5


def churn(
    model: ODEModel,
    frame: Frame,
    x: torch.Tensor,
    t: float,
    gamma: float,
    s_noise: float,
    generators: list[torch.Generator] | None,
) -> tuple[torch.Tensor, float]:
    """EDM Algorithm 2, lines 5-6: raise the noise level sigma_bar -> sigma_bar (1 + gamma) by adding
    fresh noise (in the VE frame, whatever ``frame`` the solver steps in), capped at the model's
    largest level. Returns (x_hat, t_hat)."""
    sch = model.schedule
    sb = float(S.sigma_bar(sch, t))
    if gamma <= 0 or not math.isfinite(sb):
        return x, t
    sb_max = S.sigma_range(sch)[1]
    sb_hat = min(sb * (1 + gamma), max(sb_max, sb))
    if sb_hat <= sb:
        return x, t
    t_hat = float(S.time_of_sigma_bar(sch, sb_hat))
    a, _ = S.alpha_sigma(sch, t)
    a_hat, _ = S.alpha_sigma(sch, t_hat)
    xb = x / float(a) + s_noise * math.sqrt(sb_hat**2 - sb**2) * noise_like(x, generators)
    return xb * float(a_hat), t_hat


_GL3 = np.polynomial.legendre.leggauss(3)


def lagrange_integrals(nodes: np.ndarray) -> np.ndarray:
    """Integral over u in [0, 1] of each Lagrange basis polynomial on ``nodes`` (at most 6 nodes).

    Nodes are in step units (u = (tau - tau_i) / (tau_{i+1} - tau_i)), so ``h * result[j]`` is the
    weight of the j-th stored slope in a variable-step Adams-Bashforth step of length h. Three-point
    Gauss-Legendre is exact for these polynomials (degree <= 5).
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    if len(nodes) > 6:
        raise ValueError("lagrange_integrals is exact for at most 6 nodes")
    u = 0.5 * (_GL3[0] + 1.0)  # quadrature points on [0, 1]
    diff = u[:, None, None] - nodes[None, None, :]  # (q, 1, m)
    den = nodes[:, None] - nodes[None, :]
    np.fill_diagonal(den, 1.0)
    num = np.where(np.eye(len(nodes), dtype=bool)[None], 1.0, diff)  # (q, j, m): drop m = j
    basis = np.prod(num / den[None], axis=2)  # (q, j)
    return 0.5 * (_GL3[1] @ basis)


@torch.no_grad()
def sample_adams(
    model: ODEModel,
    x: torch.Tensor,
    grid: Grid,
    order: int,
    weights: Callable[[Any, int, int], Any],
    callback: Callback | None = None,
) -> torch.Tensor:
    """Adams-Bashforth over the grid in the model's frame, shared by iPNDM and LMS:
    y_{i+1} = y_i + h_i sum_j w_j d_{i-j} over the last k <= ``order`` slopes (newest first; the
    lower orders while the history fills), ``weights(tau, i, k)`` giving step i's k weights."""
    frame = Frame(model.schedule)
    tau = frame.tau(grid)
    ds: list[torch.Tensor] = []
    for i in range(grid.steps):
        y = frame.to_y(x, float(grid.alpha[i]))
        x0, eps = model(x, grid.t[i])
        notify(callback, i=i, t=grid.t[i], x=x, x0=x0, eps=eps)
        ds = [*ds[-(order - 1) :], frame.slope(x0, eps)] if order > 1 else [frame.slope(x0, eps)]
        w = weights(tau, i, len(ds))
        y = y + float(tau[i + 1] - tau[i]) * sum(float(wj) * d for wj, d in zip(w, reversed(ds), strict=True))
        x = frame.to_x(y, float(grid.alpha[i + 1]))
    return x


# iPNDM's Adams-Bashforth weights for equal steps, newest slope first (also PNDM's multistep).
IPNDM_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def sample_ipndm(model: ODEModel, x: torch.Tensor, grid: Grid, order: int = 4, callback: Callback | None = None) -> torch.Tensor:
    """iPNDM over the grid: y_{i+1} = y_i + h_i sum_j c_j d_{i-j}, lower orders while warming up
    (the adapter is :mod:`methods.solvers.ipndm`; GITS calibrates with it)."""
    return sample_adams(model, x, grid, order, lambda tau, i, k: IPNDM_COEFFS[k], callback)
