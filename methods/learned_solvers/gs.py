"""Generalized Solver (GS) and Generalized Adversarial Solver (GAS) (Oganov et al. 2025, arXiv
2510.17699): learned timesteps and multistep coefficients on top of DPM-Solver++(2M), regressed on
the teacher's endpoints of the same noise; GAS adds a relativistic adversarial term.

The solver (:func:`sample_generalized`) is DPM-Solver++(2M) (:func:`methods.solvers.dpmpp_2m.
sample_dpmpp_2m`) on learned times, each step's update plus a learned weighted sum of *every*
previous point and data prediction (the paper's "order = steps": GAS's ``c_i`` and ``a_i`` offsets
over the whole history), and the network asked at a learned shifted time (GAS's ``t_couple``):

    x_{i+1} = DPM-Solver++(2M) step(x_i; t_i -> t_{i+1}) + sum_{j<=i} (a_ij x_j + c_ij x0_j),
    x0_j = x0 read from net(x_j, t_j + dt_j) at t_j.

Timesteps use the paper's stick-breaking map (its Eq. 14, in native time): interior point k sits at
t_end + (t_start - t_end) prod_{m<=k} mu_m, mu = eps + (1 - 2 eps) sigmoid(theta). The learned grid
is ``t_base + (f(theta) - f(theta_0))`` with theta_0 the logits of the base grid, so at initialisation
(theta = theta_0, a = c = dt = 0) every coefficient the solver uses is the base solver's float for
float, and the sampler equals DPM-Solver++(2M) on the base schedule bit for bit
(``tests/test_learned_gs.py``). Gradients reach the times through the schedule's alpha/sigma, the
exponential-integrator weights and the network's time input; the forward values are always computed
exactly as the base solver computes them (a straight-through sum with a zero difference).

Training (the shared loop :func:`bench.training.fit`; Adam(W), EMA, as the paper's code): the
``pairs`` artifact holds N noise draws (seeds ``bench.students.PAIR_SEED``, disjoint from every
evaluation seed) and the teacher's endpoints (``teacher_solver`` at ``teacher_steps``, the job's
guidance); the loss is the mean squared (or absolute) error to the teacher endpoint of the same
noise. GAS adds ``adv_weight`` times the relativistic generator loss softplus(-(D(fake) - D(real)))
of a small discriminator trained alongside (R3GAN's relativistic loss with R1 and R2 penalties, as
the paper's code; its fakes are student samples of other training noises, its reals the teacher
endpoints). Two methods (``gs``, ``gas``) rather than one with a knob: they are the paper's two
named methods, compared side by side in its tables and ours (rows are keyed by method name).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from bench.io import atomic_write, write_json
from bench.registry import METHODS
from bench.students import device_of, load_pairs, teacher_pairs
from bench.training import TrainConfig, fit
from methods.solvers.core import Grid

PARAMS_FILE = "solver.safetensors"
PAIR_KNOBS = ["teacher_solver", "teacher_steps", "pairs"]
BASE_SCHEDULES = ("uniform", "karras", "logsnr", "ays")
EPS_MU = 1e-5  # keeps the stick-breaking fractions inside (0, 1), as the paper's code


# --- the differentiable solver ---------------------------------------------------------------


def _st(exact: float, value: torch.Tensor | None) -> float | torch.Tensor:
    """``exact`` in the forward pass, the gradient of ``value`` in the backward pass (``exact`` as a
    plain float when nothing is differentiated, so the arithmetic is the base solver's)."""
    if value is None or not value.requires_grad:
        return exact
    return torch.tensor(exact, dtype=torch.float64, device=value.device) + (value - value.detach())


def stick_breaking(theta: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
    """Interior times t_end + (t_start - t_end) prod_{m<=k} mu_m (descending), mu in (eps, 1 - eps)."""
    mu = torch.sigmoid(theta) * (1 - 2 * EPS_MU) + EPS_MU
    return t_end + (t_start - t_end) * torch.cumprod(mu, 0)


def stick_breaking_logits(t: np.ndarray) -> torch.Tensor:
    """The logits whose :func:`stick_breaking` map gives the interior points of the grid ``t``."""
    p = (np.asarray(t[1:-1], dtype=np.float64) - t[-1]) / (t[0] - t[-1])
    mu = p / np.concatenate([[1.0], p[:-1]])
    mu = (mu - EPS_MU) / (1 - 2 * EPS_MU)
    return torch.logit(torch.as_tensor(mu, dtype=torch.float64))


class GeneralizedSolver(nn.Module):
    """The learned parameters of a generalized solver over ``len(t_base) - 1`` steps: the stick-breaking
    logits of the interior times (``times``), the model-time shifts ``dt`` (in units of the mean step)
    and the coefficients ``a`` (on points) and ``c`` (on data predictions) of every step's history,
    flattened (step i has i + 1 of each). All start where the base solver is."""

    def __init__(self, t_base: np.ndarray, learn_times: bool = True, learn_coeffs: bool = True, learn_shift: bool = True) -> None:
        super().__init__()
        t_base = np.asarray(t_base, dtype=np.float64)
        n = len(t_base) - 1
        self.n = n
        self.register_buffer("t_base", torch.as_tensor(t_base))
        self.register_buffer("theta0", stick_breaking_logits(t_base))
        self.theta = nn.Parameter(self.theta0.clone(), requires_grad=learn_times and n > 1)
        self.dt = nn.Parameter(torch.zeros(n, dtype=torch.float64), requires_grad=learn_shift)
        m = n * (n + 1) // 2
        self.a = nn.Parameter(torch.zeros(m, dtype=torch.float64), requires_grad=learn_coeffs)
        self.c = nn.Parameter(torch.zeros(m, dtype=torch.float64), requires_grad=learn_coeffs)
        self.step_scale = float(t_base[0] - t_base[-1]) / n
        self.trained = tuple(name for name, p in self.named_parameters() if p.requires_grad)

    def times(self) -> torch.Tensor:
        """The n + 1 solver times (float64): the base grid plus the learned move of the interior."""
        t = self.t_base
        if self.n == 1:
            return t.clone()
        t0, t1 = float(t[0]), float(t[-1])
        move = stick_breaking(self.theta, t0, t1) - stick_breaking(self.theta0, t0, t1)
        return torch.cat([t[:1], t[1:-1] + move, t[-1:]])

    def model_times(self, t: torch.Tensor) -> torch.Tensor:
        """The times the network is asked at (the first n solver times, shifted by ``dt``)."""
        return t[:-1] + self.step_scale * self.dt

    def history(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_i., c_i.): step i's coefficients on points x_0..x_i and predictions x0_0..x0_i."""
        lo = i * (i + 1) // 2
        return self.a[lo : lo + i + 1], self.c[lo : lo + i + 1]

    def learned(self) -> int:
        """Number of learned parameters (the ones this solver trains, frozen or not now)."""
        return sum(p.numel() for name, p in self.named_parameters() if name in self.trained)


def _model_x0(den: Denoiser, x: torch.Tensor, t_model: float, t_solver: float, tm: torch.Tensor | None,
              ts: torch.Tensor | None, cond: torch.Tensor | None, guidance: float) -> torch.Tensor:  # fmt: skip
    """x0 from the network at ``t_model``, read at the solver time ``t_solver`` (one evaluation);
    the times in float64 for float64 states, as :class:`methods.solvers.core.ODEModel` asks them."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tt_m = torch.full((x.shape[0],), t_model, dtype=dtype, device=x.device)
    tt_s = torch.full((x.shape[0],), t_solver, dtype=dtype, device=x.device)
    if tm is not None and tm.requires_grad:
        tt_m = tt_m + (tm - tm.detach()).to(dtype)
    if ts is not None and ts.requires_grad:
        tt_s = tt_s + (ts - ts.detach()).to(dtype)
    pred = den(x, tt_m, cond, guidance)
    return den.x0_eps(x, tt_s, pred)[0]


def sample_generalized(
    den: Denoiser,
    x: torch.Tensor,
    solver: GeneralizedSolver,
    cond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """The generalized DPM-Solver++(2M) with ``solver``'s parameters from noise ``x`` at its first time
    (differentiable in the parameters and ``x`` when autograd is on; see the module docstring)."""
    sch = den.schedule
    t = solver.times()
    tm = solver.model_times(t)
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in solver.parameters())
    t_np = t.detach().cpu().numpy()
    tm_np = tm.detach().cpu().numpy()
    grid = Grid.from_times(sch, t_np)  # exactly the base solver's alpha, sigma and lambda
    lam = grid.lam
    if grad:
        a_t, s_t = sch.alpha_sigma(t[:-1])  # differentiable twins (the data end is never differentiated)
        lam_t = torch.log(a_t) - torch.log(s_t)
        a_next = torch.cat([a_t[1:], t.new_ones(1)])
        s_next = torch.cat([s_t[1:], t.new_zeros(1)])
    xs: list[torch.Tensor] = []
    x0s: list[torch.Tensor] = []
    x0_prev, h_prev, h_prev_t = None, None, None
    for i in range(grid.steps):
        x0 = _model_x0(den, x, float(tm_np[i]), float(t_np[i]), tm[i] if grad else None, t[i] if grad else None, cond,
                       guidance)  # fmt: skip
        xs.append(x)
        x0s.append(x0)
        s_s, a_n, s_n = float(grid.sigma[i]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        h = h_t = None
        if s_n == 0.0:
            x_new = x0
        else:
            h = float(lam[i + 1] - lam[i])
            h_t = lam_t[i + 1] - lam_t[i] if grad else None
            D = x0
            if x0_prev is not None and math.isfinite(h_prev):
                r = h_prev / h
                r_t = h_prev_t / h_t if grad else None
                D = (
                    _st(1 + 1 / (2 * r), 1 + 1 / (2 * r_t) if grad else None) * x0
                    - _st(1 / (2 * r), 1 / (2 * r_t) if grad else None) * x0_prev
                )
            ratio = _st(s_n / s_s, s_next[i] / s_t[i] if grad else None)
            w = _st(a_n * math.expm1(-h), a_next[i] * torch.expm1(-h_t) if grad else None)
            x_new = ratio * x - w * D
        a_i, c_i = solver.history(i)
        for j in range(i + 1):  # the learned history: zero coefficients add exact zeros
            x_new = x_new + (a_i[j] if grad else float(a_i[j])) * xs[j] + (c_i[j] if grad else float(c_i[j])) * x0s[j]
        x0_prev, h_prev, h_prev_t = x0, h, h_t
        x = x_new
    return x


# --- the losses ------------------------------------------------------------------------------


def regression_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """The distillation loss to the teacher's endpoints: mean squared (l2) or absolute (l1) error."""
    return F.mse_loss(out, target) if kind == "l2" else F.l1_loss(out, target)


class Discriminator(nn.Module):
    """GAS's critic, small: an MLP on vectors, a three-layer CNN on images; one logit per sample."""

    def __init__(self, shape: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        if len(shape) == 1:
            self.net = nn.Sequential(
                nn.Linear(shape[0], width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1)
            )
        else:
            c = shape[0]
            self.net = nn.Sequential(
                nn.Conv2d(c, width // 2, 3, 2, 1), nn.SiLU(), nn.Conv2d(width // 2, width, 3, 2, 1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1),
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float()).flatten()


def relativistic_generator_loss(d_fake: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
    """softplus(-(D(fake) - D(real))) per pair (R3GAN's relativistic loss, generator side)."""
    return F.softplus(-(d_fake - d_real))


def relativistic_discriminator_loss(disc: nn.Module, fake: torch.Tensor, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """softplus(-(D(real) - D(fake))) + gamma/2 (R1 + R2): zero-centred gradient penalties on reals and fakes."""
    real = real.detach().float().requires_grad_(True)
    fake = fake.detach().float().requires_grad_(True)
    d_real, d_fake = disc(real), disc(fake)
    loss = F.softplus(-(d_real - d_fake))
    if gamma > 0:
        (g_r,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
        (g_f,) = torch.autograd.grad(d_fake.sum(), fake, create_graph=True)
        loss = loss + gamma / 2 * (g_r.square().flatten(1).sum(1) + g_f.square().flatten(1).sum(1))
    return loss.mean()


class Adversary:
    """The discriminator, its Adam and its losses: kept across optimiser steps (and checkpoints)."""

    def __init__(self, shape: tuple[int, ...], lr: float, gamma: float, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.disc = Discriminator(shape)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.0, 0.99))
        self.gamma = gamma
        self.losses = torch.zeros(0)

    def step(self, fake: torch.Tensor, real: torch.Tensor) -> float:
        self.disc.requires_grad_(True)
        loss = relativistic_discriminator_loss(self.disc, fake, real, self.gamma)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.disc.requires_grad_(False)
        self.losses = torch.cat([self.losses, loss.detach().reshape(1)])
        return float(loss.detach())

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return relativistic_generator_loss(self.disc(fake), self.disc(real.detach())).mean()

    def state(self) -> dict[str, Any]:
        return {"disc": self.disc, "disc_opt": self.opt}


# --- the adapter -----------------------------------------------------------------------------


def base_grid(bundle: ModelBundle, steps: int, schedule: str, rho: float) -> np.ndarray:
    """The base solver's grid: DPM-Solver++(2M)'s (a flow model starts at s = 1 - 1/T)."""
    return S.timesteps(schedule, bundle.denoiser.schedule, steps, pure_noise=False, rho=rho)


def save_solver(out: Any, solver: GeneralizedSolver, info: dict[str, Any]) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in solver.state_dict().items()}
    atomic_write(out / PARAMS_FILE, lambda p: save_file(state, str(p)))
    write_json(out / "solver.json", info)


class LearnedSolverBase(MethodAdapter):
    """What GS, GAS and LD3 share: the teacher's pairs artifact (built by ``gs``, shared by all three),
    the trained-parameters artifact per (model, steps, guidance), and the job's sampler."""

    family = "learned_solver"
    training = "params"
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))

    def _guidance(self, bundle: ModelBundle, guidance: float | None) -> float:
        if bundle.num_classes is None:
            return 1.0
        if guidance is None:
            raise ValueError(f"{self.name} is trained at one guidance scale: give the job's guidance")
        return float(guidance)

    def pairs_spec(self, bundle: ModelBundle, guidance: float) -> ArtifactSpec:
        """The teacher's (noise, endpoint) pairs: one artifact per (teacher, solver, steps, pairs,
        guidance), built by ``gs`` whichever learned solver asks (so they share it)."""
        c = self.config
        teacher = METHODS.get(c["teacher_solver"])()
        if teacher.family != "solver" or teacher.training != "free":
            raise ValueError(f"{self.name}: teacher_solver={c['teacher_solver']!r} is not a training-free solver")
        owner = METHODS.get("gs")(**{k: c[k] for k in PAIR_KNOBS})
        rows = c["pairs"] * teacher.nfe_of(c["teacher_steps"]) * (2 if guidance != 1.0 and bundle.num_classes else 1)
        return artifact_spec(
            owner, bundle, "pairs", {"guidance": guidance}, tuple(teacher.artifacts(bundle, c["teacher_steps"], guidance)),
            budget={"teacher_rows": rows}, knobs=PAIR_KNOBS,
        )  # fmt: skip

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = self._guidance(bundle, guidance)
        c = self.config
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"]}
        params = {"guidance": w, "steps": steps}
        return [artifact_spec(self, bundle, "solver", params, (self.pairs_spec(bundle, w),), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        if spec.name == "pairs":
            parents = {a.key: a for a in ctx.parents.values()}
            teacher_pairs(ctx, c["teacher_solver"], c["teacher_steps"], c["pairs"], float(spec.params["guidance"]), parents)
            return
        steps, w = int(spec.params["steps"]), float(spec.params["guidance"])
        pairs = load_pairs(ctx.parent("pairs"))
        t_base = base_grid(ctx.bundle, steps, c["schedule"], c["rho"])
        if abs(float(pairs["t_start"][0]) - float(t_base[0])) > 1e-6 * max(1.0, abs(float(t_base[0]))):
            raise ValueError(
                f"{self.name}: the teacher {c['teacher_solver']} starts at t = {float(pairs['t_start'][0])}, the solver "
                f"at t = {float(t_base[0])}; choose a teacher solver that starts where DPM-Solver++(2M) does"
            )
        solver, info = self.train(ctx, pairs, t_base, w)
        info.update({"guidance": w, "steps": steps, "base_times": [float(v) for v in t_base],
                     "learned_params": solver.learned()})  # fmt: skip
        info["times"] = [float(v) for v in solver.times().detach()]
        save_solver(ctx.out, solver, info)
        ctx.note(learned_params=solver.learned(), learned_times=info["times"])

    def train(
        self, ctx: BuildContext, pairs: dict[str, torch.Tensor], t_base: np.ndarray, guidance: float
    ) -> tuple[GeneralizedSolver, dict[str, Any]]:
        raise NotImplementedError

    def new_solver(self, t_base: np.ndarray) -> GeneralizedSolver:
        return GeneralizedSolver(t_base)

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next(
            (a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "solver"), None
        )
        if art is None:
            raise ValueError(f"{self.name}: its solver artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        t_base = base_grid(bundle, steps, self.config["schedule"], self.config["rho"])
        solver = self.new_solver(t_base)
        solver.load_state_dict(load_file(str(art.path / PARAMS_FILE)))
        solver.requires_grad_(False).to(device_of(bundle.denoiser.net))
        self.solver = solver
        self.grid = Grid.from_times(bundle.denoiser.schedule, solver.times().cpu().numpy())  # refuses a bad grid here
        w = float(art.record.get("params", {}).get("guidance", 1.0))
        den = bundle.denoiser

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            if bundle.num_classes and abs(float(guidance) - w) > 1e-9:
                raise ValueError(f"{self.name} was trained at guidance {w:g}; it cannot run at {float(guidance):g}")
            return sample_generalized(den, noise, solver, cond, guidance)

        return Prepared(sampler, den, info={"learned_params": solver.learned(), "trained_guidance": w})


COMMON_KNOBS: tuple[Knob, ...] = (
    Knob("schedule", str, "uniform", "base schedule the learned times start from", choices=BASE_SCHEDULES, trains=True),
    Knob("rho", float, 7.0, "Karras rho (schedule=karras only)", low=1.0, high=20.0, trains=True),
    Knob(
        "teacher_solver", str, "dpmpp_2m", "registered deterministic solver that makes the teacher's endpoints", trains=True
    ),  # fmt: skip
    Knob("teacher_steps", int, 25, "steps of the teacher solver per pair", low=1, high=1000, trains=True),
    Knob("pairs", int, 256, "(noise, teacher endpoint) pairs drawn from the teacher", low=2, high=1_000_000, trains=True),
    Knob("seed", int, 0, "seed of the training loop (batch order; the discriminator's initialisation)", low=0, trains=True),
)


@register_method
class GeneralizedSolverMethod(LearnedSolverBase):
    name = "gs"
    paper = (
        "Oganov et al. 2025, GAS: Improving Discretization of Diffusion ODEs via Generalized Adversarial Solver, "
        "arXiv 2510.17699 (Generalized Solver)"
    )
    description = (
        "DPM-Solver++(2M) with learned timesteps, model-time shifts and full-history coefficients, regressed on teacher endpoints"
    )
    knobs = (
        *COMMON_KNOBS,
        Knob("train_steps", int, 100, "optimiser steps", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 16, "pairs per optimiser step", low=1, high=65536, trains=True),
        Knob("lr", float, 5e-3, "Adam learning rate (warm-up, then cosine decay)", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, 0.9, "EMA decay of the parameters (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("loss", str, "l2", "distance to the teacher endpoint", choices=("l2", "l1"), trains=True),
    )
    adversarial = False

    def train(
        self, ctx: BuildContext, pairs: dict[str, torch.Tensor], t_base: np.ndarray, guidance: float
    ) -> tuple[GeneralizedSolver, dict[str, Any]]:
        c = self.config
        bundle = ctx.bundle
        dev = device_of(bundle.denoiser.net)
        z, target = pairs["noise"].to(dev), pairs["x0"].to(dev)
        labels = pairs["labels"].to(dev) if bundle.num_classes else None
        den = bundle.denoiser
        solver = self.new_solver(t_base).to(dev)
        steps = c["train_steps"]
        adv = None
        extra: dict[str, Any] = {}
        if self.adversarial:
            adv = Adversary(tuple(bundle.sample_shape), c["disc_lr"], c["r_gamma"], c["seed"])
            extra = adv.state()
        bs = min(c["batch_size"], len(z))

        def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(z), (bs,), generator=g)
            cond = labels[idx] if labels is not None else None
            out = sample_generalized(den, z[idx], net, cond, guidance)
            total = regression_loss(out, target[idx], c["loss"])
            if adv is not None:
                other = torch.randint(0, len(z), (bs,), generator=g)  # fakes from other training noises
                with torch.no_grad():
                    fake = sample_generalized(den, z[other], net, labels[other] if labels is not None else None, guidance)
                adv.step(fake, target[idx])
                total = total + c["adv_weight"] * adv.generator_loss(out, target[idx])
            return total

        cfg = TrainConfig(steps, bs, c["lr"], min(20, steps // 10), c["ema"], ckpt_every=max(1, steps // 10))
        res = fit(solver, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), extra_state=extra)
        ctx.note_training(res)
        info: dict[str, Any] = {"first_loss": ctx.noted.get("first_loss"), "final_loss": ctx.noted.get("final_loss")}
        if adv is not None and len(adv.losses):
            info["disc_final_loss"] = float(adv.losses[-20:].mean())
            ctx.note(disc_final_loss=info["disc_final_loss"])
        return res.model.requires_grad_(False), info


@register_method
class GeneralizedAdversarialSolver(GeneralizedSolverMethod):
    name = "gas"
    paper = (
        "Oganov et al. 2025, GAS: Improving Discretization of Diffusion ODEs via Generalized Adversarial Solver, "
        "arXiv 2510.17699 (GAS)"
    )
    description = "generalized solver trained with the regression loss plus a relativistic adversarial term (small discriminator)"
    knobs = (
        *GeneralizedSolverMethod.knobs,
        Knob("adv_weight", float, 0.01, "weight of the adversarial generator loss", low=0.0, high=100.0, trains=True),
        Knob("disc_lr", float, 1e-3, "discriminator Adam learning rate", low=1e-7, high=1.0, trains=True),
        Knob(
            "r_gamma", float, 0.2, "R1 + R2 penalty weight gamma (loss + gamma/2 (R1 + R2))", low=0.0, high=100.0, trains=True
        ),  # fmt: skip
    )
    adversarial = True
