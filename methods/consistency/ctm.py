"""Consistency trajectory models (Kim et al. 2023, arXiv 2310.02279): a student that jumps from any
time t to any earlier time s along the teacher's probability-flow ODE, trained with the soft
consistency loss and the denoising score matching term (the paper's L_CTM + lambda_DSM L_DSM,
Section 4, without its GAN term), sampled with gamma-sampling (its Algorithm 1).

The jump (Eq. 4), in the variance-exploding frame x / alpha with noise level sigma_bar = sigma / alpha
(EDM's sigma, the paper's t):

    G_theta(x_t, t, s) = (sigma_bar_s / sigma_bar_t) x_t + (1 - sigma_bar_s / sigma_bar_t) g_theta(x_t, t, s),

g_theta the student's data estimate at (x_t, t, s). In bench's frame x = alpha x_bar this is
G = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) g, a DDIM step with g as x0
(:meth:`bench.denoiser.Denoiser.jump` of a ``second_time`` denoiser computes the same map), and
G(x, t, t) = x exactly for any g. The student is the teacher's network with the second time s as an
extra input (:class:`bench.models.students.ExtraInputs`, zero-initialised: a fresh student's g is the
teacher's x0 estimate, its jump the teacher's DDIM step); g is its output read as x0.

One training example (the paper's Eq. 8 and 9, with its code's choices for the discretisation):

- x ~ data (training digits with their labels; mixture samples on ``gmm``), eps ~ N(0, I);
- the teacher's grid: ``scales`` = N noise levels of EDM's rho = 7 schedule over the model's range
  (the first moved to the sampler's start time), then the data end; a number of solver steps k in
  {1, ..., ``heun_steps``} drawn per batch with probability proportional to k (the code's
  "weighted" strategy), t = grid[n] with n uniform, u = grid[n + k], s = grid[m] with m uniform in
  [n + k, N] (s may be the data end); x_t = alpha_t x + sigma_t eps;
- the target: the teacher's k Heun steps t -> u at the artifact's guidance w (EDM's second-order
  solver in sigma_bar on a VP teacher, in the flow time on a flow teacher), then the target
  network's jump u -> s, then its jump s -> data: x_target = G-(G-(Solver(x_t, t, u), u, s), s, 0);
- the estimate: the student's jump t -> s, then the target network's jump s -> data (gradients flow
  through its input, not its weights): x_est = G-(G_theta(x_t, t, s), s, 0);
- L_CTM = ||x_est - x_target||^2 (mean), plus ``dsm_weight`` times the DSM loss of the student's
  diagonal g_theta(x_t, t, t) on data: the teacher's own training loss (its parametrisation's
  target, times uniform over the schedule; :func:`bench.students.denoising_loss`).

The target network theta- is an EMA of the student (``target_ema``), updated after every step. The
student is distilled at the job's guidance scale (one artifact per w, like knowledge distillation);
it runs one pass per jump, w in its weights. Sampling (``gamma``, not a training knob): the grid's
points evenly spaced in index, and at each step a jump to sigma_bar = sqrt(1 - gamma^2) sigma_bar_next,
then fresh noise up to the next level (:func:`bench.flowmap.sample_flow_map`, whose update is the
paper's Algorithm 1 in the VE frame): gamma = 0 deterministic jumps, gamma = 1 consistency-model
multistep sampling.

Departures: the squared error in data space instead of LPIPS (its weights are not available
offline); no GAN term; the DSM term in the teacher's parametrisation and time distribution (the
paper: EDM's loss and lognormal sigma), on data at the job's w = 1 only in spirit: with guidance the
consistency target is the guided ODE while the DSM term still fits the conditional data
(``dsm_weight: 0`` turns it off); at most ``heun_steps`` (default 3) solver steps per target
instead of up to N - 1 (teacher evaluations dominate a CPU step); the shared training loop (AdamW,
warm-up and cosine decay, an EMA of the weights for sampling) and small budgets.

What g is: the student's output read in its teacher's parametrisation (``prediction: teacher``, the
default), so that a fresh student's g is the teacher's denoiser and its jumps the teacher's DDIM
steps, as the paper initialises CTM from its teacher. This matters more for CTM than for a one-step
student: the soft consistency loss compares both sides after the target network's jump to data,
which is meaningless until that jump is; read as x0 (``prediction: x0`` or ``auto`` on an eps
teacher, :mod:`bench.students`), the eps network starts from nonsense on both sides and 200 steps
left the digits-unet student at FID 35 (against 7.9 for the teacher's one DDIM step). The price on an
eps teacher: the one-step jump from t = 999 reads x0 = (x - sigma eps) / alpha with alpha = 0.0064,
which amplifies an eps error 157x.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser, FlowSchedule, Schedule
from bench.flowmap import sample_flow_map
from bench.io import WeightsError, load_weights
from bench.models.students import ExtraInputs
from bench.students import denoising_loss, device_of, new_student, save_student, student_denoiser, student_prediction
from bench.training import TrainConfig, fit

Data = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.to(torch.float64)


def ctm_grid(schedule: Schedule, t_start: float, scales: int) -> torch.Tensor:
    """N = ``scales`` descending native times of EDM's rho = 7 schedule (the first moved to the
    sampler's start ``t_start``), then the data end: N + 1 points, float64."""
    if scales < 2:
        raise ValueError(f"scales must be at least 2, got {scales}")
    grid = S.karras(schedule, scales)
    grid[0] = max(float(grid[0]), float(t_start))
    return torch.tensor(grid, dtype=torch.float64)


def jump(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float,
    s: torch.Tensor | float,
    cond: torch.Tensor | None,
    prediction: str,
    schedule: Schedule,
) -> torch.Tensor:
    """G(x_t, t, s) = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) g(x_t, t, s), g the
    output of ``net(x, t, cond, s=s)`` read as x0 by ``prediction``; rows with s = t return x_t exactly."""
    t, s = _times(t, x), _times(s, x)
    raw = net(x, t, cond, s=s)
    den = Denoiser(net, prediction, schedule)  # type: ignore[arg-type]
    g = den.x0_eps(x, t, raw)[0]
    a_t, sg_t = den.alpha_sigma(t, x)
    a_s, sg_s = den.alpha_sigma(s, x)
    same = _col((s >= t).to(torch.float64), x) > 0
    ratio = torch.where(same, torch.ones_like(sg_s), sg_s / torch.where(sg_t > 0, sg_t, torch.ones_like(sg_t)))
    return ratio * x + (a_s - a_t * ratio) * g


def _ode_frame(den: Denoiser, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ODE's time tau, the factor y = x / scale) of the frame the teacher's Heun step runs in:
    sigma_bar and x / alpha on a VP teacher (EDM's), the flow time s and x itself on a flow teacher."""
    a, sg = den.alpha_sigma(t, x)
    if isinstance(den.schedule, FlowSchedule):
        return sg, torch.ones_like(a)
    return sg / a, a


@torch.no_grad()
def teacher_heun(
    den: Denoiser, x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, cond: torch.Tensor | None, w: float
) -> torch.Tensor:
    """One Heun step of the teacher's (guided) probability-flow ODE from t1 to t2 (per-row times); an
    Euler step where t2 is the data end (EDM's Algorithm 1). dy/dtau = eps_hat (VP: y = x / alpha,
    tau = sigma_bar) or eps_hat - x0_hat (flow: y = x, tau = s)."""
    flow = isinstance(den.schedule, FlowSchedule)

    def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0, eps = den.x0_eps(x, t, den(x, t, cond, w))
        return eps - x0 if flow else eps

    tau1, k1 = _ode_frame(den, t1, x)
    tau2, k2 = _ode_frame(den, t2, x)
    y1, dt = x / k1, tau2 - tau1
    d1 = drift(x, t1)
    euler = y1 + dt * d1
    d2 = drift(k2 * euler, t2)
    heun = y1 + dt * 0.5 * (d1 + d2)
    return k2 * torch.where(tau2 > 0, heun, euler)


@torch.no_grad()
def teacher_solve(
    den: Denoiser, x: torch.Tensor, grid: torch.Tensor, n: torch.Tensor, k: int, cond: torch.Tensor | None, w: float
) -> torch.Tensor:
    """The teacher's k Heun steps along the grid from grid[n] to grid[n + k] (per-row start indices)."""
    for j in range(k):
        x = teacher_heun(den, x, grid[n + j].to(x.device), grid[n + j + 1].to(x.device), cond, w)
    return x


@torch.no_grad()
def ctm_target(
    den: Denoiser,
    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    grid: torch.Tensor,
    n: torch.Tensor,
    k: int,
    m: torch.Tensor,
    cond: torch.Tensor | None,
    w: float,
) -> torch.Tensor:
    """The soft consistency target G-(G-(Solver(x_t, t, u), u, s), s, 0) with t = grid[n], u = grid[n + k],
    s = grid[m] (``target(x, t, s)`` is the target network's jump)."""
    dev = x_t.device
    x_u = teacher_solve(den, x_t, grid, n, k, cond, w)
    s = grid[m].to(dev)
    x_s = target(x_u, grid[n + k].to(dev), s)
    return target(x_s, s, torch.full_like(s, float(grid[-1])))


def ctm_estimate(
    student: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    t_data: float,
) -> torch.Tensor:
    """G-(G_theta(x_t, t, s), s, 0): the student's jump, mapped to data by the target network (with
    gradients through its input)."""
    return target(student(x_t, t, s), s, torch.full_like(s, t_data))


def heun_step_count(g: torch.Generator, k_max: int) -> int:
    """k in {1, ..., k_max} with probability proportional to k."""
    p = torch.arange(1, k_max + 1, dtype=torch.float64)
    return int(torch.multinomial(p / p.sum(), 1, generator=g)) + 1


@torch.no_grad()
def ema_update(target: nn.Module, net: nn.Module, mu: float) -> None:
    """theta- <- mu theta- + (1 - mu) theta (a no-op while they are equal: before the first update)."""
    for pt, p in zip(target.parameters(), net.parameters(), strict=True):
        pt.lerp_(p.detach(), 1.0 - mu)


def training_data(bundle: ModelBundle) -> Data:
    """What the student trains on: the training digits with their labels, or samples of the mixture."""
    dev = device_of(bundle.denoiser.net)
    mix = bundle.extra.get("mixture")
    if mix is not None:
        return lambda n, g: (mix.sample(n, g).to(dev), None)
    if bundle.name in ("digits-unet", "digits-dit"):
        from bench.data import digits

        x, y = digits("train")

        def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
            idx = torch.randint(0, len(x), (n,), generator=g)
            return x[idx].to(dev), y[idx].to(dev)

        return draw
    raise ValueError(f"{bundle.name}: CTM trains on data; bench has training data for the digits models and gmm only")


@register_method
class ConsistencyTrajectoryModel(MethodAdapter):
    name = "ctm"
    family = "consistency"
    training = "finetune"
    paper = "Kim et al. 2023, Consistency Trajectory Model, arXiv 2310.02279"
    description = (
        "anytime-to-anytime jumps G(x_t, t, s) (a zero-initialised second-time input on the teacher's network) "
        "trained with the soft consistency loss through the teacher's Heun solver plus DSM; gamma-sampling"
    )
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"), guidance=("cfg", "none"))
    knobs = (
        Knob("scales", int, 10, "N: noise levels of the teacher's EDM (rho 7) grid (CTM on CIFAR-10: 18)", low=2, high=10_000, trains=True),
        Knob("heun_steps", int, 3, "most teacher Heun steps t -> u per target (k drawn with p ~ k; CTM: N - 1)", low=1, high=10_000,
             trains=True),
        Knob("dsm_weight", float, 1.0, "lambda_DSM: weight of the denoising score matching term (0: off)", low=0.0,
             high=1e4, trains=True),
        Knob("target_ema", float, 0.9, "EMA rate mu of the target network theta-", low=0.0, high=0.99999, trains=True),
        Knob("prediction", str, "teacher", "how g is read from the student's output: teacher (its parametrisation: a "
             "fresh student is the teacher), x0, auto (x0 for an eps teacher)", choices=("teacher", "auto", "x0"),
             trains=True),
        Knob("train_steps", int, 200, "optimiser steps of the student", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 32, "training examples per optimiser step", low=1, high=65536, trains=True),
        Knob("lr", float, 2e-4, "AdamW learning rate (warm-up, then cosine decay)", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, 0.99, "EMA decay of the weights sampled with (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (batches; an MLP student's initialisation)", low=0, trains=True),
        Knob("gamma", float, 0.0, "gamma of the sampler: 0 deterministic jumps, 1 consistency-model re-noising", low=0.0,
             high=1.0),
    )  # fmt: skip

    def __init__(self, **knobs: object) -> None:
        super().__init__(**knobs)
        if self.config["heun_steps"] >= self.config["scales"]:
            raise ValueError(f"heun_steps ({self.config['heun_steps']}) must be below scales ({self.config['scales']})")

    def prediction_of(self, bundle: ModelBundle) -> str:
        p = self.config["prediction"]
        return student_prediction(bundle.kind) if p == "auto" else bundle.kind if p == "teacher" else "x0"

    @staticmethod
    def new_net(bundle: ModelBundle, seed: int = 0) -> ExtraInputs:
        """A fresh student: the teacher's network (an MLP on ``gmm``) with a zero-initialised second-time input."""
        return ExtraInputs(new_student(bundle, seed), ("s",))

    def _guidance(self, bundle: ModelBundle, guidance: float | None) -> float:
        if bundle.num_classes is None:
            return 1.0
        if guidance is None:
            raise ValueError("ctm distils the teacher at one guidance scale: give the job's guidance")
        return float(guidance)

    # --- artifacts -----------------------------------------------------------------------------

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        c = self.config
        w = self._guidance(bundle, guidance)
        k = c["heun_steps"]
        mean_k = (2 * k + 1) / 3  # E[k] with p ~ k: sum k^2 / sum k
        rows = int(c["train_steps"] * c["batch_size"] * 2 * mean_k) * (2 if w != 1.0 and bundle.num_classes else 1)
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
        return [artifact_spec(self, bundle, "student", {"guidance": w}, (), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        den = bundle.denoiser
        w = float(spec.params["guidance"])
        prediction = self.prediction_of(bundle)
        grid = ctm_grid(den.schedule, bundle.t_start, c["scales"])
        big_n, t_data, k_max = c["scales"], float(grid[-1]), c["heun_steps"]
        student = self.new_net(bundle, c["seed"]).train().requires_grad_(True)
        target = self.new_net(bundle, c["seed"])
        target.load_state_dict(student.state_dict())
        target.requires_grad_(False).eval()
        sden = Denoiser(student, prediction, den.schedule)  # type: ignore[arg-type]
        data = training_data(bundle)
        bs, lam = c["batch_size"], c["dsm_weight"]

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            ema_update(target, net, c["target_ema"])
            x0, cond = data(bs, g)
            dev = x0.device
            k = heun_step_count(g, k_max)
            n = torch.randint(0, big_n - k, (bs,), generator=g)
            m = n + k + (torch.rand(bs, generator=g, dtype=torch.float64) * (big_n - n - k + 1)).long()
            t, s = grid[n].to(dev), grid[m].to(dev)
            eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(dev)
            a, sg = den.alpha_sigma(t, x0)
            x_t = a * x0 + sg * eps

            def g_target(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return jump(target, x, t, s, cond, prediction, den.schedule)

            def g_student(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return jump(net, x, t, s, cond, prediction, den.schedule)

            tgt = ctm_target(den, g_target, x_t, grid, n, k, m, cond, w)
            est = ctm_estimate(g_student, g_target, x_t, t, s, t_data)
            total = F.mse_loss(est, tgt.to(est.dtype))
            if lam > 0:
                total = total + lam * denoising_loss(sden, lambda x, tt, cd: net(x, tt, cd, s=tt), x0, cond, g)
            return total

        steps = c["train_steps"]
        cfg = TrainConfig(steps, bs, c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))
        res = fit(student, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), extra_state={"target": target})
        info = {"prediction": prediction, "scales": big_n, "t_start": float(grid[0]), "guidance": w}
        save_student(ctx.out, res.model, info)
        ctx.note_training(res)

    # --- the job --------------------------------------------------------------------------------

    def load(self, art: Artifact, bundle: ModelBundle) -> tuple[nn.Module, dict]:
        import json

        fix = f"rebuild the artifact: delete {art.path} and run again"
        net = self.new_net(bundle, self.config["seed"])
        load_weights(net, art.path / "student.safetensors", fix)
        try:
            info = json.loads((art.path / "student.json").read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"{art.path / 'student.json'} is missing or corrupt ({e}); {fix}") from e
        return net.eval().requires_grad_(False).to(device_of(bundle.denoiser.net)), info

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next(
            (a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "student"), None
        )
        if art is None:
            raise ValueError("ctm: its student artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        net, info = self.load(art, bundle)
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, info["prediction"], w, second_time=True)
        grid = ctm_grid(bundle.denoiser.schedule, float(info["t_start"]), int(info["scales"]))
        times = sampling_times(grid, steps)
        gamma = float(self.config["gamma"])

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators, gamma=gamma)

        return Prepared(sampler, den, info={"distilled_guidance": w, "times": times, "gamma": gamma})


def sampling_times(grid: torch.Tensor, steps: int) -> list[float]:
    """``steps + 1`` points of the descending grid, evenly spaced in index, from its start to the data end."""
    n = len(grid) - 1
    if not 1 <= steps <= n:
        raise ValueError(f"a CTM student on a grid of {n} levels runs at 1 to {n} steps, not {steps}")
    idx = np.round(np.linspace(0, n, steps + 1)).astype(int)
    return [float(grid[i]) for i in idx]
