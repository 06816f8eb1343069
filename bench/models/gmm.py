"""An analytic Gaussian mixture: exact score, exact posterior means and an exact PF-ODE endpoint.

The data distribution is ``sum_k w_k N(mu_k, diag(s_k^2))``. Under ``x = alpha x0 + sigma eps``
each component stays Gaussian, ``N(alpha mu_k, alpha^2 s_k^2 + sigma^2)``, so the score,
E[x0 | x] and E[eps | x] are closed form for any (alpha, sigma) (VP and rectified flow alike).
The probability-flow ODE along any path (alpha(tau), sigma(tau)) is
``dx/dtau = alpha'(tau) E[x0|x] + sigma'(tau) E[eps|x]``; integrating it with an adaptive
8th-order Runge-Kutta (DOP853) at tight tolerance gives the oracle endpoint for solvers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import nn

from bench.denoiser import FlowSchedule, Schedule, VPSchedule


class GaussianMixture:
    """A diagonal-covariance Gaussian mixture in float64."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> None:
        self.w = (weights / weights.sum()).double()
        self.mu = means.double()
        self.var = stds.double() ** 2
        self.dim = self.mu.shape[1]

    @classmethod
    def preset(cls, dim: int) -> GaussianMixture:
        """The registered variants: 2-D (8 modes on a ring) and any D (10 random modes), seed-fixed."""
        g = torch.Generator().manual_seed(1234 + dim)
        if dim == 2:
            ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
            means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
            stds = 0.25 + 0.25 * torch.rand(8, 2, generator=g, dtype=torch.float64)
            weights = 0.5 + torch.rand(8, generator=g, dtype=torch.float64)
        else:
            k = 10
            means = torch.randn(k, dim, generator=g, dtype=torch.float64)
            stds = 0.3 + 0.5 * torch.rand(k, dim, generator=g, dtype=torch.float64)
            weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        return cls(weights, means, stds)

    def _parts(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        x = x.double().reshape(x.shape[0], 1, -1)  # (N,1,D)
        a = alpha.double().reshape(-1, 1, 1)
        s = sigma.double().reshape(-1, 1, 1)
        c = a**2 * self.var[None] + s**2  # (N,K,D)
        r = x - a * self.mu[None]
        logn = -0.5 * ((r**2 / c) + torch.log(2 * math.pi * c)).sum(-1)  # (N,K)
        return a, s, c, r, logn + self.w.log()[None]

    def log_prob(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log p_t(x) of the noisy marginal."""
        *_, logp = self._parts(x, alpha, sigma)
        return torch.logsumexp(logp, 1)

    def posterior(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E[x0|x], E[eps|x], score) at noise level (alpha, sigma), all float64 (N,D)."""
        a, s, c, r, logp = self._parts(x, alpha, sigma)
        resp = torch.softmax(logp, 1)[..., None]  # (N,K,1)
        x0 = (resp * (self.mu[None] + a * self.var[None] * r / c)).sum(1)
        eps = (resp * (s * r / c)).sum(1)
        score = -(resp * (r / c)).sum(1)
        return x0, eps, score

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.mu[k] + self.var[k].sqrt() * z

    def _ve_drift(self, xb: torch.Tensor, sb: float) -> torch.Tensor:
        """dx̄/d(log σ̄) = x̄ - E[x0|x̄] in the variance-exploding form x̄ = x/α, σ̄ = σ/α.

        Written per component as σ̄²/(s²+σ̄²)(x̄-μ) so no difference of near-equal numbers is
        formed at small σ̄ (which would make the adaptive integrator chase round-off).
        """
        c = self.var[None] + sb**2
        r = xb[:, None, :] - self.mu[None]
        logp = -0.5 * ((r**2 / c) + torch.log(2 * math.pi * c)).sum(-1) + self.w.log()[None]
        resp = torch.softmax(logp, 1)[..., None]
        return (resp * (sb**2 / c) * r).sum(1)

    def ode_endpoint(self, x: torch.Tensor, schedule: Schedule, t_start: float, rtol: float = 1e-10) -> torch.Tensor:
        """Exact PF-ODE map of ``x`` at native time ``t_start`` to the data end (sigma = 0).

        The ODE depends only on the path of sigma/alpha, so VP and flow share it. Phase 1 runs
        in the VP angle tau (alpha = cos tau, sigma = sin tau) while the noise is large, which
        also covers the flow start alpha = 0; phase 2 runs in u = log(sigma/alpha) down to
        sigma/alpha = 1e-8, where the posterior mean finishes the last 1e-8 exactly.
        """
        a0, s0 = (float(v) for v in schedule.alpha_sigma(torch.tensor([float(t_start)])))
        norm = math.hypot(a0, s0)
        tau0 = math.atan2(s0, a0)
        shape, n = x.shape, x.shape[0]
        y = x.double().reshape(n, -1) / norm  # the same point on the VP path
        tau_sw = math.atan(self.SWITCH)
        if tau0 > tau_sw:

            def f_angle(tau: float, v: np.ndarray) -> np.ndarray:
                a, s = math.cos(tau), math.sin(tau)
                x0, eps, _ = self.posterior(torch.from_numpy(v).view(n, -1), torch.full((n,), a), torch.full((n,), s))
                return (-s * x0 + a * eps).reshape(-1).numpy()

            y = self._solve(f_angle, tau0, tau_sw, y, rtol)
            tau0 = tau_sw
        xb = y / math.cos(tau0)

        def f_log(u: float, v: np.ndarray) -> np.ndarray:
            return self._ve_drift(torch.from_numpy(v).view(n, -1), math.exp(u)).reshape(-1).numpy()

        xb = self._solve(f_log, math.log(math.tan(tau0)), math.log(self.SIGMA_END), xb, rtol)
        x0, _, _ = self.posterior(xb, torch.ones(n), torch.full((n,), self.SIGMA_END))
        return x0.view(shape)

    SWITCH = 20.0  # sigma/alpha where the integrator changes variable
    SIGMA_END = 1e-8

    @staticmethod
    def _solve(f, t0: float, t1: float, y: torch.Tensor, rtol: float) -> torch.Tensor:
        sol = solve_ivp(f, (t0, t1), y.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=rtol)
        if not sol.success:
            raise RuntimeError(f"exact ODE integration failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).view(y.shape)


class GMMNet(nn.Module):
    """``net(x, t, cond) -> eps`` (VP) or velocity (flow), computed exactly from the mixture."""

    def __init__(self, gmm: GaussianMixture, schedule: Schedule) -> None:
        super().__init__()
        self.gmm, self.schedule = gmm, schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        a, s = self.schedule.alpha_sigma(t)
        x0, eps, _ = self.gmm.posterior(x, a, s)
        out = eps - x0 if isinstance(self.schedule, FlowSchedule) else eps
        return out.to(x.dtype).view_as(x)


def gmm_schedule(prediction: str) -> Schedule:
    return FlowSchedule() if prediction == "flow" else VPSchedule.linear()
