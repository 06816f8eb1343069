"""DPM-Solver-v3 (Zheng et al. 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical
Model Statistics", arXiv 2310.13268; reference code thu-ml/DPM-Solver-v3, read, not copied).

The diffusion ODE in lambda = log(alpha / sigma) is dx/dlambda = (alpha'/alpha) x - sigma eps(x, lambda)
for any (alpha, sigma) path: VP and rectified flow (alpha = 1 - s, sigma = s) alike, so the method
applies to every model kind as it is (eps, x0 and v models through their eps and x0, a flow's
velocity through its x0 and eps; on a flow the levels start at s = 1 - 1/T, where lambda is
finite, as dpmpp_2m's do). DPM-Solver-v3 rewrites it with three
*empirical model statistics* (EMS) per noise level: scalars l_lambda, s_lambda and a vector b_lambda
of the sample's shape,

    f(x, lambda) = (sigma eps(x, lambda) - l_lambda x) / alpha,
    g(x, lambda) = exp(-int_{ls}^{lambda} s) f - int_{ls}^{lambda} exp(-int_{ls}^{r} s) b_r dr,

so that the exact step from lambda_s to lambda_t is

    x_t = (alpha_t / alpha_s) e^{-int l} x_s
          - alpha_t e^{-int_{ls}^{lt} l} int_{ls}^{lt} e^{int_{ls}^{lambda}(l + s)} (g(lambda) + B(lambda)) dlambda,

B(lambda) = int_{ls}^{lambda} e^{-int_{ls}^{r} s} b_r dr. g is expanded in a Taylor series at lambda_s,
its derivatives estimated from the g values of the previous points (multistep; each previous
point's g is taken relative to the current reference lambda_s), and the integrals of the EMS are
computed once per step (here by Gauss-Legendre quadrature, 8 nodes per cell of the EMS grid, with
the EMS linear in lambda between grid points; the authors' code snaps the solver's times to the
EMS grid and uses the trapezoid rule). The statistics make the parametrisation fit the model:

    l_lambda = argmin_l E ||grad_x (sigma eps) - l I||_F^2 = E[tr grad_x (sigma eps)] / D,
    (s_lambda, b_lambda) = argmin E ||f^(1) - s f - b||^2,  f^(1) = df(x_lambda, lambda)/dlambda along the ODE,

expectations over the teacher's own ODE trajectories at the job's guidance. With
(l, s, b) = (1, 0, 0) the solver is DPM-Solver++ (data prediction, its exact phi_2 / Taylor
multistep form), with (0, -1, 0) DPM-Solver (noise prediction): the ``ems`` knob runs those
degenerate statistics without an artifact, the check the tests make.

Sampler (the authors' ``sample``): multistep predictor of ``order`` (lower orders while the
history fills; ``lower_order_final``), the predictor's derivatives by solving the Taylor system
(or, ``predictor_pseudo``, the paper's pseudo-order: Newton divided differences), and a
corrector that, once the model has been evaluated at the predicted point (no extra NFE), redoes
the step with that point in the derivative estimate (order of the predictor, or one more with
``corrector_pseudo``), keeping the model's output sigma eps - l x at that point and moving only x.
``auto`` follows the paper's few-step settings (EDM code: pseudo predictor at <= 5 steps,
corrector at <= 6).

Grid (``final``): ``sigma_min`` (the paper's) spends the N = ``steps`` evaluations on N steps over N + 1
levels from sigma_max to sigma_min (the EMS range) and returns the state at sigma_min;
``denoise`` uses the free solvers' grid (the schedule's N levels, then the data end: its last
evaluation's data prediction is the sample), the grid of ``dpmpp_2m`` at N steps.

Statistics (the artifact, training class ``params``: (K + 1)(2 + D) numbers on a K-step logSNR grid
shared by every NFE and solver setting): ``stat_samples`` training draws (own seeds,
:mod:`methods.learned_solvers.trajectories`, disjoint from every evaluation seed) are carried along the
EMS grid by DPM-Solver++(3M) (Taylor-consistent weight, one step per grid cell); l from the
trace of the Jacobian of sigma eps by autograd (exact for D <= 8, else Hutchinson with one
Rademacher probe per draw, the same probe at every level so that l is smooth in lambda) on the
first ``trace_draws`` draws; f^(1) by fourth-order finite differences of f along each trajectory
(no network evaluation beyond the trajectory's, and the lambda-dependence of l is in it);
(s, b) by least squares over draws and dimensions at each level (a relative ridge of 1e-12 keeps s
defined where f does not vary).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser, Schedule
from bench.io import atomic_write, write_json
from methods.learned_solvers.trajectories import train_guidance, training_noise
from methods.solvers.core import Grid, ODEModel
from methods.solvers.dpmpp_3m import sample_dpmpp_3m

EMS_FILE = "ems.safetensors"
INFO_FILE = "dpm_solver_v3.json"
SCHEDULES = ("logsnr", "karras", "uniform", "ays")
DEGENERATE = {"dpmpp": (1.0, 0.0), "dpm": (0.0, -1.0)}  # (l, s) with b = 0: DPM-Solver++ / DPM-Solver
EXACT_TRACE_DIM = 8  # the Jacobian trace is exact (D backward passes) up to this dimension
RIDGE = 1e-12
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


# ---------------------------------------------------------------------------------------------
# the statistics and their integrals


def stats_lambdas(schedule: Schedule, steps: int) -> np.ndarray:
    """The EMS grid: ``steps + 1`` levels uniform in lambda from sigma_max to sigma_min (ascending)."""
    smin, smax = S.sigma_range(schedule)
    return np.linspace(-math.log(smax), -math.log(smin), steps + 1)


class EMS:
    """l, s (K + 1 scalars) and b ((K + 1, *shape) or None for zero) on the ascending lambda grid
    ``lam``, linear in lambda between grid points (linear extrapolation past the ends)."""

    def __init__(self, lam: np.ndarray, ell: np.ndarray, s: np.ndarray, b: torch.Tensor | None) -> None:
        self.lam = np.asarray(lam, dtype=np.float64)
        self.l = np.asarray(ell, dtype=np.float64)
        self.s = np.asarray(s, dtype=np.float64)
        self.b = b
        self.d = np.diff(self.lam)
        self.cum_l = np.concatenate([[0.0], np.cumsum(0.5 * self.d * (self.l[1:] + self.l[:-1]))])
        self.cum_s = np.concatenate([[0.0], np.cumsum(0.5 * self.d * (self.s[1:] + self.s[:-1]))])

    @classmethod
    def constant(cls, lam: np.ndarray, ell: float, s: float) -> EMS:
        return cls(lam, np.full(len(lam), ell), np.full(len(lam), s), None)

    def _cell(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        k = np.clip(np.searchsorted(self.lam, x, side="right") - 1, 0, len(self.lam) - 2)
        return k, x - self.lam[k], self.d[k]

    def at(self, v: np.ndarray, x: np.ndarray | float) -> np.ndarray:
        """Grid values ``v`` interpolated at lambda ``x``."""
        k, u, d = self._cell(x)
        return v[k] + (u / d) * (v[k + 1] - v[k])

    def cum(self, which: str, x: np.ndarray | float) -> np.ndarray:
        """int_{lam_0}^{x} of l or s (exact for the piecewise-linear statistic)."""
        v, c = (self.l, self.cum_l) if which == "l" else (self.s, self.cum_s)
        k, u, d = self._cell(x)
        return c[k] + u * v[k] + 0.5 * u * u * (v[k + 1] - v[k]) / d

    def rows(self, x: np.ndarray) -> np.ndarray:
        """(len(x), K + 1): the weights of the grid values in the interpolant at each x."""
        k, u, d = self._cell(x)
        w = u / d
        out = np.zeros((len(k), len(self.lam)))
        idx = np.arange(len(k))
        out[idx, k] = 1.0 - w
        out[idx, k + 1] += w
        return out

    def nodes(self, a: float, c: float) -> tuple[np.ndarray, np.ndarray]:
        """Gauss-Legendre nodes and weights of int_a^c (negative weights when c < a), 8 nodes per
        piece between consecutive grid points."""
        lo, hi = min(a, c), max(a, c)
        br = np.concatenate([[lo], self.lam[(self.lam > lo) & (self.lam < hi)], [hi]])
        mid, half = 0.5 * (br[1:] + br[:-1]), 0.5 * (br[1:] - br[:-1])
        x = (mid[:, None] + half[:, None] * _GL_X[None]).ravel()
        w = (half[:, None] * _GL_W[None]).ravel()
        return x, w if c >= a else -w

    def learned(self) -> int:
        return self.l.size + self.s.size + (int(self.b.numel()) if self.b is not None else 0)


def derivative_matrix(lams: list[float], pseudo: bool) -> np.ndarray:
    """(n, n + 1): row i - 1 maps the values g_0..g_n at ``lams`` (lams[0] the reference point) to
    the i-th lambda-derivative at lams[0]: by solving the Taylor system
    g_j - g_0 = sum_i (l_j - l_0)^i / i! g^(i), or (``pseudo``, the paper's pseudo-order) as i! times
    the i-th Newton divided difference over the points in the given order."""
    n = len(lams) - 1
    lam = np.asarray(lams, dtype=np.float64)
    if n == 0:
        return np.zeros((0, 1))
    if pseudo:
        D = [np.eye(n + 1)]  # D[i][j]: divided difference over points j..j+i, as weights on g
        for i in range(1, n + 1):
            D.append(np.stack([(D[i - 1][j] - D[i - 1][j + 1]) / (lam[j] - lam[i + j]) for j in range(n - i + 1)]))
        return np.stack([D[i][0] * math.factorial(i) for i in range(1, n + 1)])
    V = np.array([[(lam[j] - lam[0]) ** i / math.factorial(i) for i in range(1, n + 1)] for j in range(1, n + 1)])
    diff = np.concatenate([-np.ones((n, 1)), np.eye(n)], 1)  # g_j - g_0
    return np.linalg.solve(V, diff)


@dataclass
class Step:
    """One update x_t = lin x_ref + sum_m w_m f_m + bterm, f_m the stored f of the points used."""

    ref: int
    points: list[int]  # the reference first, then the others in the derivative order
    target: int
    lin: float
    w: list[float]
    bterm: torch.Tensor | None


def step_coefficients(
    ems: EMS, lams: list[float], lam_t: float, alpha_s: float, alpha_t: float, pseudo: bool
) -> tuple[float, list[float], np.ndarray | None]:
    """The coefficients of a step from lams[0] to lam_t using the points at ``lams``: (lin, w, bw)
    with x_t = lin x_s + sum_m w_m f_m + bw . b (bw: weights of the grid's b vectors; None when b = 0)."""
    lam_s = lams[0]
    n = len(lams) - 1
    dl = float(ems.cum("l", lam_t) - ems.cum("l", lam_s))
    lin = alpha_t / alpha_s * math.exp(-dl)
    scale = alpha_t * math.exp(-dl)
    base = float(ems.cum("l", lam_s) + ems.cum("s", lam_s))
    cs = float(ems.cum("s", lam_s))

    def psi(x: np.ndarray) -> np.ndarray:  # int_{ls}^{x} (l + s)
        return ems.cum("l", x) + ems.cum("s", x) - base

    q, wq = ems.nodes(lam_s, lam_t)
    eq = np.exp(psi(q))
    K = [float(np.sum(wq * eq * (q - lam_s) ** k / math.factorial(k))) for k in range(n + 1)]
    # the combination of g_0..g_n: K_0 g_0 + sum_i K_i g^(i)
    comb = np.zeros(n + 1)
    comb[0] = K[0]
    if n:
        comb += np.asarray(K[1:]) @ derivative_matrix(lams, pseudo)
    sig = [math.exp(-(float(ems.cum("s", lj)) - cs)) for lj in lams]  # g_m = sig_m f_m - beta_m . b
    w = [-scale * float(comb[m]) * sig[m] for m in range(n + 1)]
    if ems.b is None:
        return lin, w, None
    # b: -scale (int e^psi B + sum_m comb_m g_m's -beta_m) with B(x) = int_{ls}^{x} e^{-int s} b
    J = np.array([float(np.sum(wj * np.exp(psi(qj)))) for qj, wj in (ems.nodes(lam_s, float(r)) for r in q)])
    decay = np.exp(-(ems.cum("s", q) - cs))
    bw = -scale * (ems.rows(q).T @ (wq * decay * (K[0] - J)))
    for m in range(1, n + 1):
        qm, wm = ems.nodes(lam_s, lams[m])
        beta = ems.rows(qm).T @ (wm * np.exp(-(ems.cum("s", qm) - cs)))
        bw = bw + scale * float(comb[m]) * beta
    return lin, w, bw


def plan(M: int, order: int, p_pseudo: bool, corrector: bool, c_pseudo: bool, lower_order_final: bool) -> list[dict[str, Any]]:
    """The authors' sampling loop as data: for the evaluation at each level i = 0..M (level M is
    evaluated only when something follows: the caller drops it), the corrector to apply (points
    and pseudo flag, or None) and the predictor to level i + 1 (points, or None at i = M). Points
    are level indices, the reference first."""
    out = []
    p_prev = 0
    for i in range(M + 1):
        corr = None
        if corrector and i >= 1:
            c_order = p_prev + (1 if c_pseudo else 0)
            if c_order > 1:
                older = [i - 1 - k for k in range(1, c_order - 1)]
                corr = [i - 1, i, *older]
        pred = None
        if i < M:
            p = min(i + 1, order)
            if lower_order_final:
                p = min(p, M - i)
            pred = [i - k for k in range(p)]
            p_prev = p
        out.append({"corrector": corr, "c_pseudo": c_pseudo, "predictor": pred, "p_pseudo": p_pseudo})
    return out


# ---------------------------------------------------------------------------------------------
# estimating the statistics


def jacobian_trace(
    den: Denoiser, x: torch.Tensor, t: float, cond: torch.Tensor | None, guidance: float, probes: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample tr(d(sigma eps)/dx) at native time t: exact (one backward per dimension) when
    ``probes`` is None, else Hutchinson's v^T J v with the given probes."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tt = torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        x0 = den.x0_eps(xg, tt, den(xg, tt, cond, guidance))[0]
        a, _ = den.alpha_sigma(tt, xg)
        N = (xg - a * x0).flatten(1)  # sigma eps
        if probes is not None:
            (g,) = torch.autograd.grad((N * probes.flatten(1)).sum(), xg)
            return (g.flatten(1) * probes.flatten(1)).sum(1).double()
        tr = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for d in range(N.shape[1]):
            (g,) = torch.autograd.grad(N[:, d].sum(), xg, retain_graph=d + 1 < N.shape[1])
            tr = tr + g.flatten(1)[:, d].double()
        return tr


def lambda_derivative(F: torch.Tensor, h: float) -> torch.Tensor:
    """dF/dlambda along dim 0 (uniform spacing h) by fourth-order finite differences: the central
    five-point stencil inside, the one-sided five-point ones at the two ends on each side."""
    if F.shape[0] < 5:
        raise ValueError("the fourth-order derivative needs at least 5 levels (stat_steps >= 4)")
    d = torch.empty_like(F)
    d[2:-2] = (F[:-4] - 8 * F[1:-3] + 8 * F[3:-1] - F[4:]) / (12 * h)
    d[0] = (-25 * F[0] + 48 * F[1] - 36 * F[2] + 16 * F[3] - 3 * F[4]) / (12 * h)
    d[1] = (-3 * F[0] - 10 * F[1] + 18 * F[2] - 6 * F[3] + F[4]) / (12 * h)
    d[-1] = (25 * F[-1] - 48 * F[-2] + 36 * F[-3] - 16 * F[-4] + 3 * F[-5]) / (12 * h)
    d[-2] = (3 * F[-1] + 10 * F[-2] - 18 * F[-3] + 6 * F[-4] - F[-5]) / (12 * h)
    return d


def fit_sb(F: torch.Tensor, dF: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Per level k: (s_k, b_k) = argmin sum_{draws} ||dF - s F - b||^2 over a scalar s and a vector b
    (``F``, ``dF``: (K + 1, n, *shape) float64); a ridge of 1e-12 E||F||^2 keeps s defined where F is constant."""
    Fm, dFm = F.mean(1, keepdim=True), dF.mean(1, keepdim=True)
    Fc, dFc = (F - Fm).flatten(2), (dF - dFm).flatten(2)
    cov = (Fc * dFc).sum((1, 2))
    var = Fc.square().sum((1, 2)) + RIDGE * F.flatten(2).square().sum((1, 2)) + 1e-300
    s = cov / var
    b = dFm[:, 0] - s.view(-1, *([1] * (F.ndim - 2))) * Fm[:, 0]
    return s.numpy(), b


# ---------------------------------------------------------------------------------------------
# the method


@register_method
class DPMSolverV3(MethodAdapter):
    name = "dpm_solver_v3"
    family = "learned_solver"
    training = "params"
    paper = "Zheng et al. 2023, DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics, arXiv 2310.13268"
    description = "multistep predictor-corrector exponential integrator reparametrised by empirical model statistics (l, s, b on a logSNR grid) computed from the teacher's trajectories; base dpmpp (data prediction)"  # fmt: skip
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    knobs = (
        Knob("schedule", str, "uniform", "timestep schedule (uniform: the authors' time_uniform)", choices=SCHEDULES),
        Knob("rho", float, 7.0, "Karras rho (schedule=karras)", low=1.0, high=20.0),
        Knob("order", int, 3, "predictor order (the paper's default 3)", low=1, high=4),
        Knob("predictor_pseudo", str, "auto", "pseudo-order predictor (auto: at <= 5 steps)", choices=("auto", "on", "off")),
        Knob("corrector", str, "auto", "the corrector (auto: at <= 6 steps, the paper's)", choices=("auto", "on", "off")),
        Knob("corrector_pseudo", bool, False, "pseudo corrector: one order more, divided differences"),
        Knob("lower_order_final", bool, True, "cap the order at the remaining steps"),
        Knob(
            "final",
            str,
            "sigma_min",
            "sigma_min: N steps to sigma_min; denoise: the free solvers' grid",
            choices=("sigma_min", "denoise"),
        ),
        Knob(
            "ems",
            str,
            "empirical",
            "the teacher's statistics, or DPM-Solver++'s (1, 0, 0) / DPM-Solver's (0, -1, 0)",
            choices=("empirical", "dpmpp", "dpm"),
        ),
        Knob("stat_steps", int, 120, "cells of the logSNR grid the statistics live on", low=4, high=100_000, trains=True),
        Knob("stat_samples", int, 256, "teacher trajectories (training noise draws)", low=2, high=1_000_000, trains=True),
        Knob("trace_draws", int, 64, "draws the Jacobian trace (l) is estimated on", low=1, high=1_000_000, trains=True),
        Knob("seed", int, 0, "seed of the trace probes", low=0, trains=True),
    )

    # --- the grid ----------------------------------------------------------------------------

    def levels(self, bundle: ModelBundle, steps: int) -> np.ndarray:
        """Native times of the levels the solver steps between (without the data end)."""
        sch = bundle.denoiser.schedule
        c = self.config
        if c["final"] == "denoise":
            return S.timesteps(c["schedule"], sch, steps, pure_noise=False, rho=c["rho"])[:-1]
        n = steps + 1
        if c["schedule"] == "uniform":  # the authors' time_uniform: t_max .. t_min
            return np.linspace(S.t_max(sch, pure_noise=False), S.t_min(sch), n)
        return S.timesteps(c["schedule"], sch, n, pure_noise=False, rho=c["rho"])[:-1]

    def flag(self, name: str, steps: int, limit: int) -> bool:
        v = self.config[name]
        return steps <= limit if v == "auto" else v == "on"

    # --- artifacts ---------------------------------------------------------------------------

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        if self.config["ems"] != "empirical":
            return []
        w = train_guidance(bundle, guidance, self.name)
        c = self.config
        cfg_rows = 2 if w != 1.0 and bundle.num_classes else 1
        rows = (c["stat_steps"] + 1) * (c["stat_samples"] + min(c["trace_draws"], c["stat_samples"])) * cfg_rows
        return [artifact_spec(self, bundle, "ems", {"guidance": w}, budget={"teacher_rows": rows})]

    @torch.no_grad()
    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        den = bundle.denoiser
        sch = den.schedule
        w = float(spec.params["guidance"])
        K = c["stat_steps"]
        lam = stats_lambdas(sch, K)
        times = S.time_of_lambda(sch, lam)
        grid = Grid.from_times(sch, np.concatenate([times, [S.t_data(sch)]]))
        n = c["stat_samples"]
        xs, x0s = [], []
        chunk = 64
        for lo in range(0, n, chunk):
            z, cond = training_noise(bundle, min(chunk, n - lo), lo)
            rec_x: list[torch.Tensor] = []
            rec_x0: list[torch.Tensor] = []

            def record(info: dict[str, Any], rx: list = rec_x, r0: list = rec_x0) -> None:
                rx.append(info["x"].double())
                r0.append(info["x0"].double())

            sample_dpmpp_3m(ODEModel(den, cond, w), z, grid, lower_order_final=False, d2_weight=2.0, callback=record)
            xs.append(torch.stack(rec_x))
            x0s.append(torch.stack(rec_x0))
            ctx.progress(min(lo + chunk, n), n, what="trajectories")
        X, X0 = torch.cat(xs, 1), torch.cat(x0s, 1)  # (K + 1, n, *shape) float64
        # l: the Jacobian trace of sigma eps, on the first trace_draws draws
        m = min(c["trace_draws"], n)
        D = int(np.prod(bundle.sample_shape))
        zt, ct = training_noise(bundle, m, 0)
        probes = None
        if D > EXACT_TRACE_DIM:
            g = torch.Generator().manual_seed(c["seed"])
            probes = (torch.randint(0, 2, zt.shape, generator=g) * 2 - 1).to(zt.dtype)
        traces = []
        for k in range(K + 1):
            tr = torch.cat([
                jacobian_trace(den, X[k, lo : lo + chunk].to(zt.dtype), float(times[k]),
                               ct[lo : lo + chunk] if ct is not None else None, w,
                               probes[lo : lo + chunk] if probes is not None else None)
                for lo in range(0, m, chunk)
            ])  # fmt: skip
            traces.append(float(tr.mean()) / D)
            ctx.progress(k + 1, K + 1, what="trace")
        ell = np.asarray(traces)
        # f along each trajectory, its lambda-derivative by finite differences, (s, b) by least squares
        shape = (-1, *([1] * (X.ndim - 1)))
        alpha = torch.as_tensor(grid.alpha[: K + 1], dtype=torch.float64).view(shape)
        lt = torch.as_tensor(ell, dtype=torch.float64).view(shape)
        F = ((1 - lt) * X - alpha * X0) / alpha
        dF = lambda_derivative(F, float(lam[1] - lam[0]))
        s, b = fit_sb(F, dF)
        ems = EMS(lam, ell, s, b)
        tensors = {
            "lam": torch.as_tensor(lam),
            "l": torch.as_tensor(ell),
            "s": torch.as_tensor(s),
            "b": b.contiguous(),
        }
        atomic_write(ctx.out / EMS_FILE, lambda p: save_file(tensors, str(p)))
        resid = (dF - torch.as_tensor(s).view(shape) * F - b[:, None]).square().flatten(1).mean(1)
        info = {
            "learned_params": ems.learned(),
            "guidance": w,
            "stat_steps": K,
            "l_range": [float(ell.min()), float(ell.max())],
            "s_range": [float(s.min()), float(s.max())],
            "fit_residual_mean": float(resid.mean()),
            "f1_mean_square": float(dF.square().flatten(1).mean(1).mean()),
        }
        write_json(ctx.out / INFO_FILE, info)
        ctx.note(samples_drawn=n, learned_params=ems.learned(), final_loss=info["fit_residual_mean"],
                 first_loss=info["f1_mean_square"])  # fmt: skip

    # --- the sampler -------------------------------------------------------------------------

    def statistics(self, bundle: ModelBundle, artifacts: Mapping[str, Artifact]) -> EMS:
        mode = self.config["ems"]
        if mode != "empirical":
            lam = stats_lambdas(bundle.denoiser.schedule, self.config["stat_steps"])
            return EMS.constant(lam, *DEGENERATE[mode])
        art = next((a for a in artifacts.values() if a.record.get("method") == self.name), None)
        if art is None:
            raise ValueError(f"{self.name}: its statistics artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        t = load_file(str(art.path / EMS_FILE))
        return EMS(t["lam"].numpy(), t["l"].numpy(), t["s"].numpy(), t["b"])

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        ems = self.statistics(bundle, artifacts)
        sch = bundle.denoiser.schedule
        t = self.levels(bundle, steps)
        a, sg = S.alpha_sigma(sch, t)
        lam = np.log(a) - np.log(sg)
        denoise = self.config["final"] == "denoise"
        M = len(t) - 1  # EMS steps between the levels
        c = self.config
        actions = plan(M, c["order"], self.flag("predictor_pseudo", steps, 5), self.flag("corrector", steps, 6),
                       c["corrector_pseudo"], c["lower_order_final"])  # fmt: skip
        if not denoise:
            actions = actions[:-1]  # the last level is the sample: never evaluated
        lvals = ems.at(ems.l, lam)

        def make_step(points: list[int], target: int, pseudo: bool) -> Step:
            lin, w, bw = step_coefficients(ems, [float(lam[p]) for p in points], float(lam[target]), float(a[points[0]]),
                                           float(a[target]), pseudo)  # fmt: skip
            bterm = None
            if bw is not None:
                bterm = torch.tensordot(torch.as_tensor(bw), ems.b.double(), dims=1)
            return Step(points[0], points, target, lin, w, bterm)

        steps_plan = []
        for i, act in enumerate(actions):
            corr = make_step(act["corrector"], i, act["c_pseudo"]) if act["corrector"] else None
            pred = make_step(act["predictor"], i + 1, act["p_pseudo"]) if act["predictor"] else None
            steps_plan.append((corr, pred))
        self.grid_times, self.grid_lambdas = t, lam
        self.step_plan = steps_plan
        den = bundle.denoiser

        def apply(st: Step, xs: dict[int, torch.Tensor], fs: dict[int, torch.Tensor]) -> torch.Tensor:
            x = st.lin * xs[st.ref]
            for m, wm in zip(st.points, st.w, strict=True):
                x = x + wm * fs[m]
            if st.bterm is not None:
                x = x + st.bterm.to(x.device, x.dtype)
            return x

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            model = ODEModel(den, cond, guidance)
            x = noise
            xs: dict[int, torch.Tensor] = {}
            fs: dict[int, torch.Tensor] = {}
            for i, (corr, pred) in enumerate(steps_plan):
                x0, _ = model(x, float(t[i]))
                ai, li = float(a[i]), float(lvals[i])
                xs[i], fs[i] = x, ((1 - li) * x - ai * x0) / ai  # f = (sigma eps - l x) / alpha
                if corr is not None:  # redo the step into level i with its evaluation; f_i is kept
                    xs[i] = apply(corr, xs, fs)
                if pred is None:  # denoise: the data prediction at the last level (of the corrected point)
                    return (1 - li) * xs[i] / ai - fs[i]
                x = apply(pred, xs, fs)
                for old in [k for k in xs if k < i - 4]:
                    del xs[old], fs[old]
            return x

        return Prepared(sampler, den, info={"learned_params": ems.learned() if c["ems"] == "empirical" else 0})
