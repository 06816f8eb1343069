"""AMED-Solver and AMED-Plugin (Zhou et al. 2024, "Fast ODE-based Sampling for Diffusion Models in
Around 5 Steps", arXiv 2312.00094; reference code zju-pi/diff-sampler, amed-solver-main).

By the mean value theorem the exact step of the ODE dy/dtau = d(y, tau) from tau_n to tau_{n+1} is
(tau_{n+1} - tau_n) times the direction at some intermediate point. AMED approximates that mean
direction with one extra evaluation at an intermediate time s_n = tau_{n+1}^r tau_n^(1 - r), where a
tiny network (the *AMED predictor*) chooses r in (0, 1) per sample and step, together with a scale of
the direction c_dir in (0.99, 1.01) and a scale of the evaluation time c_time in (0.8, 1.2):

    y_mid  = y_n + (s_n - tau_n) d(y_n, tau_n)                    (Euler to the intermediate time)
    d_mid  = (y_mid - x0(y_mid, c_time s_n)) / s_n                 (the direction there)
    y_n+1  = y_n + c_dir (tau_{n+1} - tau_n) d_mid                 (AMED-Solver: one mean-direction step)

in EDM's frame y = x / alpha, tau = sigma / alpha (for every model kind: VP and rectified flow
alike), so with r = 1/2, c_dir = c_time = 1 a step is exactly a DPM-Solver-2 step (the midpoint in
log-SNR with the noise prediction), AMED-Solver's base solver. AMED-Plugin instead splits each
step of a base solver (iPNDM or Euler, in the base's own frame, with its multistep history) into
tau_n -> s_n -> tau_{n+1}, the second sub-step's direction scaled by c_dir and evaluated at c_time s_n.

The predictor (the paper's ``AMED_predictor``): sinusoidal embeddings of tau_n and tau_{n+1} through
one shared linear layer, a 2-layer encoder of a per-sample feature (128 hidden, 4 out), and three
linear heads with sigmoids: ~9k parameters at 64 feature values. The heads start at zero, so a fresh
predictor gives r = 1/2, c_dir = c_time = 1 (the base solver; the paper initialises them randomly).

Feature (deviation, stated): the paper feeds the U-Net bottleneck (channel-mean of the 8x8 middle
block output). Not every model here has one (the analytic ``gmm`` has no network, the DiT no
bottleneck), so the feature is the model's own direction d(y_n, tau_n) at the step's start (already
computed, no extra NFE), channel-averaged and pooled to at most 8x8 = 64 values (``feature: none``:
time only, i.e. per-step constants).

Training (the paper's loss and loop): teacher trajectories from the training noise (own seeds,
:mod:`methods.learned_solvers.trajectories`) by DPM-Solver-2 with ``teacher_substeps`` intermediate (at least; log-SNR steps of at most ``teacher_h``)
points between consecutive student times; the loss is the squared L2 distance, in the student's
frame, between the student's step and the teacher's state at tau_{n+1}, summed over the steps. The
AMED-Solver's step n starts from the teacher's state at tau_n (the paper's choice for single-step
solvers); AMED-Plugin runs its chain from the noise with its multistep history and detaches the state
between steps (the paper's choice for multistep bases). Gradients flow through the frozen teacher
network into r and c_time. Before training, each step's (r, c_time) starts at the best constant of
a small grid (``warm_start``; the paper initialises randomly): the loss is far from convex in r, and
from r = 1/2 gradient descent can settle in the worse valley (measured on ``gmm``).

NFE: ``steps`` is the network-evaluation budget B. The grid runs from sigma_max to sigma_min (the
schedule's levels), as the paper's does: q = floor(B / 2) AMED steps (2 evaluations each; with
``afs``, the paper's analytical first step d = y / sqrt(1 + tau^2) at the start, the first costs
1: off by default, since the exact-ODE oracle reads the start state from the first network call),
then, when an evaluation is left, the step from sigma_min into sigma = 0 (the x0 prediction; the
paper's ``denoise_to_zero``); otherwise the state at sigma_min is the sample, as the paper's sampler
returns it (a noise floor of sigma_min, 0.01 on the DDPM schedule, 0.001 on a flow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser, FlowSchedule, Schedule
from bench.io import atomic_write, write_json
from bench.training import TrainConfig, fit
from methods.learned_solvers.trajectories import (
    alpha_of_sigma_bar,
    n_params,
    time_of_sigma_bar_torch,
    train_guidance,
    training_noise,
)
from methods.solvers.core import IPNDM_COEFFS, Grid

FEATURE_SIDE = 8  # the paper's bottleneck is 8x8
PREDICTOR_FILE = "predictor.safetensors"
INFO_FILE = "amed.json"
GRID_SCHEDULES = tuple(s for s in S.SCHEDULES if s != "gits")


# ---------------------------------------------------------------------------------------------
# coordinates: EDM's frame (y = x / alpha, tau = sigma_bar) or a flow's native one (y = x, tau = s)


class Coords:
    """The frame a solver steps in: ``ve`` is EDM's (any model); ``native`` is the base solver's
    own (:class:`methods.solvers.core.Frame`: EDM's on VP, y = x and tau = s on a flow)."""

    def __init__(self, schedule: Schedule, kind: str) -> None:
        self.schedule = schedule
        self.flow_native = kind == "native" and isinstance(schedule, FlowSchedule)

    def tau(self, grid: Grid) -> np.ndarray:
        return grid.sigma.copy() if self.flow_native else grid.sigma_bar

    def alpha(self, tau: Any) -> Any:
        return 1.0 - tau if self.flow_native else alpha_of_sigma_bar(self.schedule, tau)

    def time(self, tau: torch.Tensor) -> torch.Tensor:
        """Native time of frame time ``tau``, differentiable."""
        if self.flow_native:
            return tau * self.schedule.num_train_timesteps
        return time_of_sigma_bar_torch(self.schedule, tau)

    def tau_of_time(self, t: float) -> float:
        """Frame time of native time ``t`` (the far end of the intermediate time of the step into sigma = 0)."""
        a, s = S.alpha_sigma(self.schedule, t)
        return float(s) if self.flow_native else float(s / a)


def _bc(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A per-sample (B,) tensor shaped to broadcast against ``like``."""
    if isinstance(v, torch.Tensor) and v.ndim == 1:
        return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return v


class Evaluator:
    """The model in frame ``coords``: x0 at (y, tau) with per-sample or scalar tau; one network
    evaluation per call, differentiable in y and tau."""

    def __init__(self, den: Denoiser, coords: Coords, cond: torch.Tensor | None, guidance: float) -> None:
        self.den, self.coords, self.cond, self.guidance = den, coords, cond, guidance

    def x0(self, y: torch.Tensor, tau: torch.Tensor | float, t: float | None = None) -> torch.Tensor:
        """x0 predicted at frame point (y, tau); ``t``: the native time when known exactly (a grid point)."""
        if not isinstance(tau, torch.Tensor):
            tau = torch.full((y.shape[0],), float(tau), dtype=torch.float64, device=y.device)
        tt = self.coords.time(tau) if t is None else torch.full_like(tau, float(t))
        x = y if self.coords.flow_native else y * _bc(self.coords.alpha(tau), y)
        tt = tt.to(torch.float64 if y.dtype == torch.float64 else torch.float32)
        pred = self.den(x, tt, self.cond, self.guidance)
        return self.den.x0_eps(x, tt, pred)[0]

    def slope(self, y: torch.Tensor, tau: torch.Tensor | float, t: float | None = None) -> torch.Tensor:
        """dy/dtau = (y - x0) / tau (the noise prediction in EDM's frame, the velocity in a flow's)."""
        return (y - self.x0(y, tau, t)) / _bc(tau, y)


# ---------------------------------------------------------------------------------------------
# the predictor


def pool_feature(d: torch.Tensor, size: int) -> torch.Tensor:
    """The per-sample feature: channel-mean of an image pooled to 8x8, or a vector pooled to 64 values."""
    if size == 0:
        return d.new_zeros(d.shape[0], 0, dtype=torch.float32)
    if d.ndim == 4:
        f = F.adaptive_avg_pool2d(d.float().mean(1, keepdim=True), FEATURE_SIDE)
    else:
        f = d.float().flatten(1)
        if f.shape[1] > size:
            f = F.adaptive_avg_pool1d(f[:, None], size)[:, 0]
    return f.flatten(1)


def feature_size(sample_shape: tuple[int, ...], kind: str) -> int:
    if kind == "none":
        return 0
    if len(sample_shape) == 3:
        return FEATURE_SIDE * FEATURE_SIDE
    return min(int(np.prod(sample_shape)), FEATURE_SIDE * FEATURE_SIDE)


class AMEDPredictor(nn.Module):
    """The paper's predictor: (feature, tau_n, tau_{n+1}) -> (r, c_dir, c_time), plus a per-step
    bias of the three heads' logits (``step_bias``, zero when fresh: r = 1/2, c_dir = c_time = 1)
    that the warm start sets (see :func:`warm_start`)."""

    def __init__(self, feature_dim: int, n_steps: int, hidden: int = 128, bottleneck: int = 4, channels: int = 8) -> None:
        super().__init__()
        self.feature_dim, self.channels = feature_dim, channels
        self.time_layer = nn.Linear(channels, channels)
        self.enc = (
            nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, bottleneck)) if feature_dim else None
        )
        width = 2 * channels + (bottleneck if feature_dim else 0)
        self.heads = nn.Linear(width, 3)
        nn.init.zeros_(self.heads.weight)
        nn.init.zeros_(self.heads.bias)
        self.step_bias = nn.Parameter(torch.zeros(n_steps, 3))

    def embed(self, tau: float, n: int) -> torch.Tensor:
        half = self.channels // 2
        freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        e = float(tau) * freqs
        e = torch.cat([e.sin(), e.cos()])
        return F.silu(self.time_layer(e)).expand(n, -1)

    def forward(self, feature: torch.Tensor, step: int, tau_cur: float, tau_next: float) -> tuple[torch.Tensor, ...]:
        n = feature.shape[0]
        parts = [self.embed(tau_cur, n), self.embed(tau_next, n)]
        if self.enc is not None:
            parts.insert(0, self.enc(feature))
        out = self.heads(torch.cat(parts, 1)) + self.step_bias[step]
        r = torch.sigmoid(out[:, 0])
        c_dir = torch.sigmoid(out[:, 1]) / 50 + 0.99
        c_time = torch.sigmoid(out[:, 2]) / 2.5 + 0.8
        return r, c_dir, c_time


class ConstantPredictor(nn.Module):
    """Fixed (r, c_time) per step, c_dir = 1 (the warm start's candidates)."""

    def __init__(self, table: dict[int, tuple[float, float]]) -> None:
        super().__init__()
        self.table = table

    def forward(self, feature: torch.Tensor, step: int, tau_cur: float, tau_next: float) -> tuple[torch.Tensor, ...]:
        r, ct = self.table.get(step, (0.5, 1.0))
        one = torch.ones(feature.shape[0], dtype=torch.float64)
        return r * one, one, ct * one


WARM_R = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8)
WARM_CT = (0.85, 1.0, 1.15)


def warm_start(
    pred: AMEDPredictor, steps: list[int], loss_at: Callable[[int, dict[int, tuple[float, float]]], float]
) -> dict[int, tuple[float, float]]:
    """Set each trained step's bias to the best constant (r, c_time) on a grid, step by step
    (``loss_at(n, table)``: step n's loss with the constants of ``table``, earlier steps at their
    chosen values). The loss is far from convex in r (on the exact mixture, the step from
    sigma_bar 5.9 to 0.01 has its worst r near the fresh 1/2 and minima either side), so gradient
    descent from r = 1/2 can settle in the worse valley; the paper starts from a random initialisation."""
    chosen: dict[int, tuple[float, float]] = {}
    for n in steps:
        best = min(((loss_at(n, {**chosen, n: (r, ct)}), r, ct) for r in WARM_R for ct in WARM_CT), key=lambda v: v[0])
        chosen[n] = (best[1], best[2])
    with torch.no_grad():
        for n, (r, ct) in chosen.items():
            pred.step_bias[n, 0] = math.log(r / (1 - r))
            u = (ct - 0.8) * 2.5
            pred.step_bias[n, 2] = math.log(u / (1 - u))
    return chosen


# ---------------------------------------------------------------------------------------------
# the steps


def mid_time(tau_cur: float, tau_next: float, r: torch.Tensor) -> torch.Tensor:
    """The intermediate time s = tau_next^r tau_cur^(1 - r) (geometric: the midpoint in log-SNR at r = 1/2)."""
    if not tau_cur > tau_next > 0:
        raise ValueError(f"an AMED step runs between two positive noise levels, got {tau_cur} -> {tau_next}")
    return torch.exp(r.double() * math.log(tau_next) + (1 - r.double()) * math.log(tau_cur))


def amed_solver_step(
    ev: Evaluator,
    y: torch.Tensor,
    d: torch.Tensor,
    tau_cur: float,
    tau_next: float,
    r: torch.Tensor,
    c_dir: torch.Tensor,
    c_time: torch.Tensor,
) -> torch.Tensor:
    """One AMED-Solver step from (y, tau_cur) with its direction d there (one network evaluation)."""
    s = mid_time(tau_cur, tau_next, r)
    y_mid = y + _bc(s - tau_cur, y) * d
    d_mid = (y_mid - ev.x0(y_mid, c_time.double() * s)) / _bc(s, y)
    return y + _bc(c_dir, y) * (tau_next - tau_cur) * d_mid


def ab_step(y: torch.Tensor, h: torch.Tensor | float, d: torch.Tensor, history: list[torch.Tensor], order: int) -> torch.Tensor:
    """iPNDM's fixed-coefficient Adams-Bashforth step from y with the newest slope d and the
    earlier ones in ``history`` (oldest first), of order min(order, len(history) + 1)."""
    k = min(order, len(history) + 1)
    slopes = [d, *reversed(history[-(k - 1) :])] if k > 1 else [d]
    return y + _bc(h, y) * sum(c * s for c, s in zip(IPNDM_COEFFS[k], slopes, strict=True))


def layout(budget: int, afs: bool) -> list[int]:
    """Network evaluations of each step of the grid for a budget (plus the free first evaluation of
    AFS): AMED steps (2) from sigma_max down to sigma_min, then the step from sigma_min into sigma = 0:
    a plain first-order step (1, the paper's ``denoise_to_zero``) when an evaluation is left, else
    none (0: the state at sigma_min is the sample, as the paper's sampler returns it)."""
    q, rem = divmod(budget + int(afs), 2)
    if q < 1:
        raise ValueError(f"AMED needs a budget of at least {2 - int(afs)} network evaluations, got {budget}")
    return [2] * q + [rem]


# ---------------------------------------------------------------------------------------------
# the adapters


def _knobs(default_schedule: str) -> tuple[Knob, ...]:
    return (
        Knob("schedule", str, default_schedule, "schedule of the outer steps", choices=GRID_SCHEDULES, trains=True),
        Knob("rho", float, 7.0, "Karras rho (schedule=karras)", low=1.0, high=20.0, trains=True),
        Knob("afs", bool, False, "analytical first step: the first direction y / sqrt(1 + tau^2), saving one NFE", trains=True),
        Knob(
            "feature",
            str,
            "direction",
            "predictor input: the model's direction at the step start, or none",
            choices=("direction", "none"),
            trains=True,
        ),  # fmt: skip
        Knob(
            "teacher_substeps",
            int,
            3,
            "teacher points between consecutive student times (the paper's M)",
            low=0,
            high=100,
            trains=True,
        ),  # fmt: skip
        Knob(
            "teacher_h",
            float,
            0.3,
            "largest log-SNR step of the teacher (more substeps where M leaves larger)",
            low=1e-3,
            high=10.0,
            trains=True,
        ),  # fmt: skip
        Knob("train_samples", int, 128, "teacher trajectories (training noise draws)", low=1, high=100_000, trains=True),
        Knob("train_steps", int, 100, "optimiser steps (each over every student step)", low=1, high=1_000_000, trains=True),
        Knob("batch_size", int, 32, "trajectories per optimiser step", low=1, high=65536, trains=True),
        Knob("lr", float, 1e-2, "Adam learning rate (warm-up, cosine decay)", low=1e-6, high=1.0, trains=True),
        Knob("seed", int, 0, "seed of the predictor's initialisation and batches", low=0, trains=True),
        Knob(
            "warm_start",
            bool,
            True,
            "start each step's (r, c_time) at the best constant of a small grid (else r = 1/2)",
            trains=True,
        ),  # fmt: skip
    )


class AMEDBase(MethodAdapter):
    family = "learned_solver"
    training = "params"
    paper = "Zhou et al. 2024, Fast ODE-based Sampling for Diffusion Models in Around 5 Steps, arXiv 2312.00094"
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    frame: ClassVar[str] = "ve"
    pure_noise_start: ClassVar[bool] = False

    # --- the grid --------------------------------------------------------------------------

    def kinds(self, steps: int) -> list[int]:
        return layout(steps, self.config["afs"])

    def grid(self, bundle: ModelBundle, steps: int) -> Grid:
        sch = bundle.denoiser.schedule
        n = len(self.kinds(steps))
        return Grid.from_times(sch, S.timesteps(self.config["schedule"], sch, n, pure_noise=False, rho=self.config["rho"]))

    # --- artifacts --------------------------------------------------------------------------

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = train_guidance(bundle, guidance, self.name)
        c = self.config
        kinds = self.kinds(steps)
        cfg_rows = 2 if w != 1.0 and bundle.num_classes else 1
        sb = self.grid(bundle, steps).sigma_bar
        subs = sum(
            max(c["teacher_substeps"] + 1, math.ceil(math.log(sb[i] / sb[i + 1]) / c["teacher_h"])) for i in range(len(sb) - 2)
        )
        teacher = c["train_samples"] * (2 * subs + len(kinds) + 1) * cfg_rows
        budget = {"teacher_rows": teacher, "optimizer_steps": c["train_steps"], "batch_size": c["batch_size"]}
        return [artifact_spec(self, bundle, "predictor", {"guidance": w, "nfe": steps}, budget=budget)]

    def _artifact(self, artifacts: Mapping[str, Artifact]) -> Artifact:
        art = next((a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "predictor"), None)  # fmt: skip
        if art is None:
            raise ValueError(f"{self.name}: its predictor artifact was not given; prepare(bundle, nfe, guidance=w) builds it")
        return art

    def new_predictor(self, bundle: ModelBundle, steps: int) -> AMEDPredictor:
        torch.manual_seed(self.config["seed"])
        return AMEDPredictor(feature_size(bundle.sample_shape, self.config["feature"]), len(self.kinds(steps)))

    # --- teacher -----------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_states(
        self, ev_ve: Evaluator, coords: Coords, grid: Grid, z: torch.Tensor, m: int, h_max: float = 0.3
    ) -> list[torch.Tensor]:
        """The teacher's states at the student's grid points, in the student's frame: DPM-Solver-2
        (AMED-Solver with r = 1/2) in EDM's frame with ``m`` points between consecutive student
        times (geometric in sigma_bar; more where needed to keep each teacher step within ``h_max``
        in log-SNR), into sigma = 0 by its x0 (the grid's last level is sigma_min)."""
        sb = grid.sigma_bar
        y = z / float(grid.alpha[0])
        out = [coords_to(coords, grid, 0, y)]
        half = torch.full((z.shape[0],), 0.5, dtype=torch.float64)
        one = torch.ones(z.shape[0], dtype=torch.float64)
        for n in range(grid.steps):
            hi, lo = float(sb[n]), float(sb[n + 1])
            if lo == 0.0:
                y = ev_ve.x0(y, hi, float(grid.t[n]))
                out.append(coords_to(coords, grid, n + 1, y))
                continue
            parts = max(m + 1, math.ceil(math.log(hi / lo) / h_max))
            sub = np.exp(np.linspace(math.log(hi), math.log(lo), parts + 1))
            for j in range(parts):
                t_known = float(grid.t[n]) if j == 0 else None
                d = ev_ve.slope(y, float(sub[j]), t_known)
                y = amed_solver_step(ev_ve, y, d, float(sub[j]), float(sub[j + 1]), half, one, one)
            out.append(coords_to(coords, grid, n + 1, y))
        return out


def coords_to_x(coords: Coords, grid: Grid, i: int, y: torch.Tensor) -> torch.Tensor:
    """A state in ``coords``' frame at grid point i, as x."""
    return y if coords.flow_native else y * float(grid.alpha[i])


def coords_to(coords: Coords, grid: Grid, i: int, y_ve: torch.Tensor) -> torch.Tensor:
    """A state in EDM's frame at grid point i, in ``coords``' frame."""
    if not coords.flow_native:
        return y_ve
    return y_ve * float(grid.alpha[i])


def _save(ctx: BuildContext, pred: AMEDPredictor, info: dict[str, Any]) -> None:
    state = {k: v.detach().contiguous() for k, v in pred.state_dict().items()}
    atomic_write(ctx.out / PREDICTOR_FILE, lambda p: save_file(state, str(p)))
    write_json(ctx.out / INFO_FILE, info)


@register_method
class AMEDSolver(AMEDBase):
    name = "amed_solver"
    description = "AMED-Solver: one mean-direction step per 2 NFE, intermediate time and scales from a ~9k-parameter predictor distilled from DPM-Solver-2 teacher trajectories; base dpm_solver (order 2)"  # fmt: skip
    knobs = _knobs("karras")

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        den = bundle.denoiser
        steps = int(spec.params["nfe"])
        w = float(spec.params["guidance"])
        kinds = self.kinds(steps)
        grid = self.grid(bundle, steps)
        coords = Coords(den.schedule, "ve")
        tau = coords.tau(grid)
        fdim = feature_size(bundle.sample_shape, c["feature"])
        # the pool: teacher states at the student times, the model's direction and feature at each
        z, cond = training_noise(bundle, c["train_samples"])
        states, dirs = [], []
        chunk = 64
        for lo in range(0, len(z), chunk):
            zc = z[lo : lo + chunk]
            cc = cond[lo : lo + chunk] if cond is not None else None
            ev = Evaluator(den, coords, cc, w)
            ys = self.teacher_states(ev, coords, grid, zc, c["teacher_substeps"], c["teacher_h"])
            with torch.no_grad():
                ds = [self._first_direction(ev, ys[n], grid, tau, n) for n in range(grid.steps)]
            states.append(torch.stack(ys))
            dirs.append(torch.stack(ds))
            ctx.progress(min(lo + chunk, len(z)), len(z), what="teacher")
        Y, D = torch.cat(states, 1), torch.cat(dirs, 1)  # (K + 1, N, ...), (K, N, ...)
        Fe = torch.stack([pool_feature(D[n], fdim) for n in range(grid.steps)])
        trained = [n for n, k in enumerate(kinds) if k == 2]
        pred = self.new_predictor(bundle, steps)
        B = c["batch_size"]

        def step_loss(net: nn.Module, idx: torch.Tensor, n: int) -> torch.Tensor:
            ev = Evaluator(den, coords, cond[idx] if cond is not None else None, w)
            r, cd, ct = net(Fe[n][idx], n, float(tau[n]), float(tau[n + 1]))
            y_next = amed_solver_step(ev, Y[n][idx], D[n][idx], float(tau[n]), float(tau[n + 1]), r, cd, ct)
            return (y_next - Y[n + 1][idx]).flatten(1).pow(2).sum(1).mean()

        if c["warm_start"]:
            first = torch.arange(min(32, Y.shape[1]))
            with torch.no_grad():
                warm_start(pred, trained, lambda n, table: float(step_loss(ConstantPredictor(table), first, n)))

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, Y.shape[1], (B,), generator=g)
            return sum(step_loss(net, idx, n) for n in trained)

        steps_n = c["train_steps"]
        cfg = TrainConfig(steps_n, B, c["lr"], warmup=max(1, steps_n // 20), ema_decay=0.0, ckpt_every=max(1, steps_n // 5))
        res = fit(pred, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v))
        ctx.note_training(res)
        ctx.note(samples_drawn=int(len(z)), learned_params=n_params(res.model))
        _save(ctx, res.model, {"learned_params": n_params(res.model), "guidance": w, "nfe": steps})

    def _first_direction(self, ev: Evaluator, y: torch.Tensor, grid: Grid, tau: np.ndarray, n: int) -> torch.Tensor:
        if n == 0 and self.config["afs"]:
            return y / math.sqrt(1 + float(tau[0]) ** 2)
        return ev.slope(y, float(tau[n]), float(grid.t[n]))

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = self._artifact(artifacts)
        pred = self.new_predictor(bundle, steps)
        pred.load_state_dict(load_file(str(art.path / PREDICTOR_FILE)))
        pred.eval().requires_grad_(False)
        return Prepared(self.sampler(bundle, steps, pred), bundle.denoiser, info={"learned_params": n_params(pred)})

    def sampler(self, bundle: ModelBundle, steps: int, pred: AMEDPredictor) -> Callable[..., torch.Tensor]:
        """The AMED-Solver sampler with predictor ``pred`` (a fresh one: DPM-Solver-2)."""
        den = bundle.denoiser
        kinds, grid = self.kinds(steps), self.grid(bundle, steps)
        coords = Coords(den.schedule, "ve")
        tau = coords.tau(grid)
        fdim = feature_size(bundle.sample_shape, self.config["feature"])

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            ev = Evaluator(den, coords, cond, guidance)
            y = noise / float(grid.alpha[0])
            for n, k in enumerate(kinds):
                tc, tn = float(tau[n]), float(tau[n + 1])
                afs = n == 0 and self.config["afs"]
                if k == 0:  # stop at sigma_min: the state there is the sample
                    return y * float(grid.alpha[n])
                if k == 1:  # into sigma = 0: the x0 prediction (the limit of a first-order step)
                    return ev.x0(y, tc, float(grid.t[n]))
                d = y / math.sqrt(1 + tc**2) if afs else ev.slope(y, tc, float(grid.t[n]))
                feat = torch.zeros(len(y), fdim) if afs else pool_feature(d, fdim)
                r, cd, ct = pred(feat, n, tc, tn)
                y = amed_solver_step(ev, y, d, tc, tn, r, cd, ct)
            return y  # alpha = 1 at the data end

        return sampler


@register_method
class AMEDPlugin(AMEDBase):
    name = "amed_plugin"
    description = "AMED-Plugin: each step of a base solver (iPNDM or Euler) split at a learned intermediate time with learned direction/time scales; ~9k-parameter predictor distilled from teacher trajectories"  # fmt: skip
    knobs = (*_knobs("karras"), Knob("base", str, "ipndm", "the base solver", choices=("ipndm", "euler"), trains=True))
    frame = "native"
    pure_noise_start = False  # the teacher steps in EDM's frame, which cannot start at s = 1 (alpha = 0)

    @property
    def order(self) -> int:
        return 4 if self.config["base"] == "ipndm" else 1

    def chain(
        self,
        pred: nn.Module,
        ev: Evaluator,
        grid: Grid,
        y: torch.Tensor,
        kinds: list[int],
        fdim: int,
        on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The plugin's chain from y at grid point 0; ``on_step(n, y_next)`` (training) sees each
        step's result and returns the state the next step starts from."""
        coords = ev.coords
        tau = coords.tau(grid)
        hist: list[torch.Tensor] = []
        for n, k in enumerate(kinds):
            tc, tn = float(tau[n]), float(tau[n + 1])
            afs = n == 0 and self.config["afs"]
            if k == 0:  # stop at sigma_min: the state there is the sample
                return coords_to_x(coords, grid, n, y)
            d = y / math.sqrt(1 + tc**2) if afs and not coords.flow_native else y if afs else ev.slope(y, tc, float(grid.t[n]))
            if k == 1:
                y = ab_step(y, tn - tc, d, hist, self.order)
                hist.append(d.detach())
            else:
                feat = torch.zeros(len(y), fdim) if afs else pool_feature(d, fdim)
                r, cd, ct = pred(feat, n, tc, tn)
                s = mid_time(tc, tn, r)
                y_mid = ab_step(y, s - tc, d, hist, self.order)
                hist.append(d.detach())
                d_mid = (y_mid - ev.x0(y_mid, ct.double() * s)) / _bc(s, y)
                y = ab_step(y_mid, cd.double() * (tn - s), d_mid, hist, self.order)
                hist.append(d_mid.detach())
            if on_step is not None:
                y = on_step(n, y)
        return y

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        den = bundle.denoiser
        steps = int(spec.params["nfe"])
        w = float(spec.params["guidance"])
        kinds, grid = self.kinds(steps), self.grid(bundle, steps)
        coords = Coords(den.schedule, self.frame)
        fdim = feature_size(bundle.sample_shape, c["feature"])
        z, cond = training_noise(bundle, c["train_samples"])
        states = []
        for lo in range(0, len(z), 64):
            cc = cond[lo : lo + 64] if cond is not None else None
            ev = Evaluator(den, Coords(den.schedule, "ve"), cc, w)
            states.append(
                torch.stack(self.teacher_states(ev, coords, grid, z[lo : lo + 64], c["teacher_substeps"], c["teacher_h"]))
            )
            ctx.progress(min(lo + 64, len(z)), len(z), what="teacher")
        Y = torch.cat(states, 1)  # (K + 1, N, ...) in the base's frame
        pred = self.new_predictor(bundle, steps)
        B = c["batch_size"]

        def step_losses(net: nn.Module, idx: torch.Tensor) -> dict[int, torch.Tensor]:
            ev = Evaluator(den, coords, cond[idx] if cond is not None else None, w)
            parts: dict[int, torch.Tensor] = {}

            def on_step(n: int, y_next: torch.Tensor) -> torch.Tensor:
                if kinds[n] == 2:
                    parts[n] = (y_next - Y[n + 1][idx]).flatten(1).pow(2).sum(1).mean()
                return y_next.detach()

            self.chain(net, ev, grid, Y[0][idx], kinds, fdim, on_step)
            return parts

        if c["warm_start"]:
            first = torch.arange(min(32, Y.shape[1]))
            trained = [n for n, k in enumerate(kinds) if k == 2]
            with torch.no_grad():
                warm_start(pred, trained, lambda n, table: float(step_losses(ConstantPredictor(table), first)[n]))

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, Y.shape[1], (B,), generator=g)
            return sum(step_losses(net, idx).values())

        steps_n = c["train_steps"]
        cfg = TrainConfig(steps_n, B, c["lr"], warmup=max(1, steps_n // 20), ema_decay=0.0, ckpt_every=max(1, steps_n // 5))
        res = fit(pred, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v))
        ctx.note_training(res)
        ctx.note(samples_drawn=int(len(z)), learned_params=n_params(res.model))
        _save(ctx, res.model, {"learned_params": n_params(res.model), "guidance": w, "nfe": steps})

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = self._artifact(artifacts)
        pred = self.new_predictor(bundle, steps)
        pred.load_state_dict(load_file(str(art.path / PREDICTOR_FILE)))
        pred.eval().requires_grad_(False)
        return Prepared(self.sampler(bundle, steps, pred), bundle.denoiser, info={"learned_params": n_params(pred)})

    def sampler(self, bundle: ModelBundle, steps: int, pred: AMEDPredictor) -> Callable[..., torch.Tensor]:
        """The AMED-Plugin sampler with predictor ``pred``."""
        den = bundle.denoiser
        kinds, grid = self.kinds(steps), self.grid(bundle, steps)
        coords = Coords(den.schedule, self.frame)
        fdim = feature_size(bundle.sample_shape, self.config["feature"])

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            ev = Evaluator(den, coords, cond, guidance)
            y = noise if coords.flow_native else noise / float(grid.alpha[0])
            return self.chain(pred, ev, grid, y, kinds, fdim)

        return sampler
