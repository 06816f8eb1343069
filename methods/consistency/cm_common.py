"""What the consistency models of Song et al. 2023 (CD, CT) and their successors (iCT, ECT) share:
the skip parametrisation with its boundary condition, the noise levels, the teacher's one-step ODE
solver, the distances, training data, and the adapter that trains and samples a consistency student.

The frame (EDM's, so VP and flow teachers share it): a native state x_t = alpha_t x0 + sigma_t z is
read as y = x_t / alpha_t = x0 + sigma_bar z at the noise level sigma_bar = sigma_t / alpha_t. The
consistency function (Song et al. 2023, Eq. 5 and Appendix C) is

    f(x_t, t) = c_skip(sigma_bar) y + c_out(sigma_bar) F(x_t, t),
    c_skip = sigma_d^2 / ((sigma_bar - eps)^2 + sigma_d^2),
    c_out = sigma_d (sigma_bar - eps) / sqrt(sigma_bar^2 + sigma_d^2),

with sigma_d = 0.5 and eps the smallest noise level of the schedule (sigma_bar at its least-noisy
training time): c_skip(eps) = 1 and c_out(eps) = 0, so f(x, eps) = y exactly (the boundary
condition, in the data frame). F is read from the network:

- ``raw``: the network output is F itself (a network trained from scratch: CT, iCT, and the MLP
  students of the analytic mixture);
- ``eps`` / ``x0`` / ``v`` / ``flow``: the network is a copy of the teacher, its output a prediction
  in the teacher's parametrisation, read as the denoiser D = x0_hat; F is the EDM-preconditioned raw
  output that gives this D (D = c_skip^EDM y + c_out^EDM F, EDM's c_skip and c_out being the ones
  above with eps = 0). Then f = c_skip y + ((sigma_bar - eps) / sigma_bar) (D - c_skip^EDM y): a
  fresh student is its teacher's denoiser everywhere but near eps, as a CD student initialised from
  an EDM teacher is in the paper.

The student runs as an x0-predicting denoiser (its output is f), sampled by the paper's multistep
Algorithm 1 (:func:`bench.flowmap.sample_flow_map` with gamma = 1: jump to the data, re-noise to the
next level).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser, FlowSchedule, Schedule
from bench.flowmap import sample_flow_map
from bench.students import device_of, load_student, new_student, save_student, student_denoiser
from bench.training import TrainConfig, fit

SIGMA_DATA = 0.5  # the paper's sigma_data for images in [-1, 1]
RHO = 7.0  # the Karras discretisation's rho (Song et al. 2023, Section 4 / EDM)
READS = ("raw", "eps", "x0", "v", "flow")

Data = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]
LossFn = Callable[[nn.Module, torch.Generator], torch.Tensor]


# --- noise levels and times ----------------------------------------------------------------------


def level_of(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """sigma_bar = sigma / alpha at native times ``t`` (float64), computed exactly as the
    consistency network computes it (so eps, computed here, makes c_out exactly 0 at t_min)."""
    a, s = schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
    return s / a


def noise_range(schedule: Schedule) -> tuple[float, float]:
    """(eps, sigma_max) in sigma_bar: the least-noisy training time's level (VP t = 0; flow s = 1/T)
    and the noisiest level a consistency student is trained and sampled at (VP t = T - 1; flow
    s = 1 - 1/T, where alpha is still positive)."""
    eps = float(level_of(schedule, torch.tensor([S.t_min(schedule)]))[0])
    smax = float(level_of(schedule, torch.tensor([S.t_max(schedule, pure_noise=False)]))[0])
    return eps, smax


def karras_levels(eps: float, smax: float, n: int, rho: float = RHO) -> torch.Tensor:
    """The N-point discretisation of Song et al. 2023 (Section 4, from EDM): ascending
    sigma_i = (eps^(1/rho) + (i - 1)/(N - 1) (smax^(1/rho) - eps^(1/rho)))^rho, i = 1..N (float64)."""
    if n < 2:
        raise ValueError(f"a consistency discretisation needs N >= 2 levels, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    levels = (eps ** (1 / rho) + i / (n - 1) * (smax ** (1 / rho) - eps ** (1 / rho))) ** rho
    levels[0], levels[-1] = eps, smax  # the ends exactly (the boundary level, the sampler's start)
    return levels


def time_of(schedule: Schedule, levels: torch.Tensor) -> torch.Tensor:
    """Native times of the noise levels ``levels`` (float64, same shape). The ends of
    :func:`noise_range` map to their times exactly (not to an interpolation of them): eps to the
    least-noisy training time, where the boundary condition holds, sigma_max to the sampler's start."""
    lv = torch.as_tensor(levels, dtype=torch.float64)
    eps, smax = noise_range(schedule)
    top = float(S.sigma_bar(schedule, S.t_max(schedule, pure_noise=False)))  # the same level, as numpy computes it
    t = torch.from_numpy(np.asarray(S.time_of_sigma_bar(schedule, np.minimum(lv.cpu().numpy(), top)), dtype=np.float64))
    t = t.reshape(lv.shape)
    t = torch.where(lv <= eps, torch.full_like(t, S.t_min(schedule)), t)
    t = torch.where(lv >= smax, torch.full_like(t, S.t_max(schedule, pure_noise=False)), t)
    return t.to(lv.device)


def perturb(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t z at per-sample native times ``t`` (= alpha_t (x0 + sigma_bar z))."""
    a, s = schedule.alpha_sigma(t.to(torch.float64))
    shape = (-1, *([1] * (x0.ndim - 1)))
    return a.reshape(shape).to(x0.dtype) * x0 + s.reshape(shape).to(x0.dtype) * z


def sampling_times(schedule: Schedule, steps: int, how: str = "uniform") -> list[float]:
    """The native times tau_1 > ... > tau_n of the multistep sampler, then the data end: ``karras``,
    the first n of the n + 1 Karras levels from sigma_max down to eps (the last, eps itself, is where
    f is the identity); ``uniform``, uniform in native time from sigma_max's time to the data."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    eps, smax = noise_range(schedule)
    t_top = float(time_of(schedule, torch.tensor([smax]))[0])
    if how == "uniform":
        ts = np.linspace(t_top, S.t_data(schedule), steps + 1)[:-1]
    elif how == "karras":
        ts = time_of(schedule, karras_levels(eps, smax, steps + 1).flip(0)[:-1]).numpy()
    else:
        raise ValueError(f"unknown sampling schedule {how!r}; use karras or uniform")
    return [float(t) for t in ts] + [S.t_data(schedule)]


# --- the consistency function ----------------------------------------------------------------------


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class ConsistencyNet(nn.Module):
    """``f(x_t, t, cond) -> x0`` estimate: the skip parametrisation around ``inner`` (see the module
    docstring), its output read as ``read`` (``raw`` or a prediction of ``schedule``'s model)."""

    def __init__(self, inner: nn.Module, read: str, schedule: Schedule, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        if read not in READS:
            raise ValueError(f"read must be one of {READS}, got {read!r}")
        if read == "flow" and not isinstance(schedule, FlowSchedule):
            raise ValueError("a flow-velocity read needs a flow schedule")
        self.inner = inner
        self.read = read
        self.schedule = schedule
        self.sigma_data = float(sigma_data)
        self.eps = noise_range(schedule)[0]
        self._conv = None if read == "raw" else Denoiser(inner, read, schedule)
        self.arch = getattr(
            inner, "arch", "unet" if hasattr(inner, "unet") else "dit" if hasattr(inner, "transformer") else "other"
        )

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(alpha, sigma_bar, c_skip, c_out, c_skip^EDM, c_out / c_out^EDM) at native times ``t`` (float64)."""
        a, s = self.schedule.alpha_sigma(t.to(torch.float64))
        sb = s / a
        sd2, e = self.sigma_data**2, self.eps
        c_skip = sd2 / ((sb - e) ** 2 + sd2)
        c_out = self.sigma_data * (sb - e) / torch.sqrt(sb**2 + sd2)
        c_skip_edm = sd2 / (sb**2 + sd2)
        ratio = (sb - e) / sb
        return a, sb, c_skip, c_out, c_skip_edm, ratio

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        a, _, c_skip, c_out, c_skip_edm, ratio = (_bcast(c.to(x.dtype), x) for c in self.coefficients(t))
        out = self.inner(x, t, cond)
        y = x / a
        if self._conv is None:  # F is the network's output
            return c_skip * y + c_out * out.to(x.dtype)
        d = self._conv.x0_eps(x, t, out.to(x.dtype))[0]
        return c_skip * y + ratio * (d - c_skip_edm * y)


# --- the teacher's one-step ODE solver (CD) ----------------------------------------------------------


def _frame(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, k): the ODE's independent variable and the factor that takes x to the frame's state
    z = k x in which dz/du is the slope below: VP, u = sigma_bar, z = x / alpha (EDM); flow, u = s,
    z = x (rectified flow)."""
    a, s = schedule.alpha_sigma(t.to(torch.float64))
    if isinstance(schedule, FlowSchedule):
        return _bcast(s, like).to(like.dtype), torch.ones_like(_bcast(a, like)).to(like.dtype)
    return _bcast(s / a, like).to(like.dtype), _bcast(1 / a, like).to(like.dtype)


def _slope(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0 if isinstance(schedule, FlowSchedule) else eps


@torch.no_grad()
def teacher_step(
    den: Denoiser,
    x: torch.Tensor,
    t_from: torch.Tensor,
    t_to: torch.Tensor,
    cond: torch.Tensor | None,
    guidance: float,
    solver: str = "heun",
) -> torch.Tensor:
    """One step of the teacher's probability-flow ODE from per-sample times ``t_from`` to ``t_to``
    (Phi in Song et al. 2023, Algorithm 2): ``euler`` (= DDIM: one evaluation) or ``heun`` (EDM's
    Algorithm 1 step, two evaluations), in the frame bench's Euler and Heun use (VE sigma_bar on VP,
    s on flow), at classifier-free guidance ``guidance``."""
    sch = den.schedule
    x0, eps = den.x0_eps(x, t_from, den(x, t_from, cond, guidance))
    u0, k0 = _frame(sch, t_from, x)
    u1, k1 = _frame(sch, t_to, x)
    d0 = _slope(sch, x0, eps)
    z1 = k0 * x + (u1 - u0) * d0
    if solver == "euler":
        return z1 / k1
    if solver != "heun":
        raise ValueError(f"unknown teacher solver {solver!r}; use heun or euler")
    x1 = z1 / k1
    x0b, epsb = den.x0_eps(x1, t_to, den(x1, t_to, cond, guidance))
    return (k0 * x + (u1 - u0) * 0.5 * (d0 + _slope(sch, x0b, epsb))) / k1


# --- distances, target network ------------------------------------------------------------------------


def squared_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 distance ||a - b||^2 / d (the paper's L2 metric, averaged over the d entries)."""
    return ((a - b.to(a.dtype)) ** 2).flatten(1).mean(1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c (Song & Dhariwal 2023, Eq. 8);
    c = 0 is the L2 norm ||a - b|| (ECT's default)."""
    sq = ((a - b.to(a.dtype)) ** 2).flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c if c > 0 else torch.sqrt(sq)


@torch.no_grad()
def ema_update(target: nn.Module, net: nn.Module, mu: float) -> None:
    """theta^- <- stopgrad(mu theta^- + (1 - mu) theta) (Song et al. 2023, Algorithms 2 and 3)."""
    for pt, p in zip(target.parameters(), net.parameters(), strict=True):
        pt.lerp_(p.detach(), 1.0 - mu)


# --- networks and data -------------------------------------------------------------------------------


def fresh_network(bundle: ModelBundle, seed: int) -> nn.Module:
    """A network of the teacher's architecture with fresh (seeded) weights, for training from scratch;
    a seeded MLP for a teacher without weights."""
    net = bundle.denoiser.net
    if not any(True for _ in net.parameters()):
        return new_student(bundle, seed)
    out = copy.deepcopy(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in out.modules():
            if m is not out and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return out.train().requires_grad_(True)


def training_data(bundle: ModelBundle) -> Data:
    """What a consistency model of ``bundle`` trains on: the training digits (labels as the
    condition) or samples of the analytic mixture, drawn from the loop's generator."""
    dev = device_of(bundle.denoiser.net)
    mix = bundle.extra.get("mixture")
    if mix is not None:
        return lambda n, g: (mix.sample(n, g).to(dev, bundle.dtype), None)
    if bundle.name in ("digits-unet", "digits-dit"):
        from bench.data import digits

        x, y = digits("train")

        def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
            idx = torch.randint(0, len(x), (n,), generator=g)
            return x[idx].to(dev), y[idx].to(dev)

        return draw
    raise ValueError(f"{bundle.name}: consistency training draws data; bench has training data for the digits models "
                     "and gmm only")  # fmt: skip


def gaussian_like(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)


# --- the adapter ---------------------------------------------------------------------------------------


def budget_knobs(lr: float, batch_size: int = 32, ema: float = 0.995) -> tuple[Knob, ...]:
    """The training budget's knobs (besides ``train_steps``) with a method's defaults."""
    return (
        Knob("batch_size", int, batch_size, "training examples per optimiser step", low=1, high=65536, trains=True),
        Knob("lr", float, lr, "AdamW learning rate (warm-up, then cosine decay)", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, ema, "EMA decay of the weights that are sampled (0: the raw weights)", low=0.0, high=0.99999,
             trains=True),
        Knob("seed", int, 0, "seed of the training (batches, noise; a fresh network's initialisation)", low=0, trains=True),
    )  # fmt: skip


SAMPLING_KNOB = Knob(
    "sampling",
    str,
    "uniform",
    "times of the multistep sampler: uniform in native time, or the Karras levels (rho 7) between sigma_max and eps",
    choices=("uniform", "karras"),
)


READ_KNOB = Knob(
    "read",
    str,
    "teacher",
    "how the teacher copy's output is read: teacher (its own parametrisation: the fresh student is the teacher's "
    "denoiser) or x0 (well-conditioned at the noisiest level of an eps teacher, where x0 = (x - sigma eps) / alpha "
    "amplifies an eps error 1/alpha = 157x, but the fresh student is not the teacher)",
    choices=("teacher", "x0"),
    trains=True,
)


class ConsistencyAdapter(MethodAdapter):
    """A consistency student: one artifact (``student``), trained with the shared loop on the
    subclass's loss, sampled with the multistep consistency sampler (NFE = steps)."""

    family = "consistency"
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"), data=("image", "vector"), conditioning=("class", "none"))
    from_teacher: ClassVar[bool] = True  # the student starts as a copy of the teacher's network
    distils_guidance: ClassVar[bool] = False  # True: the artifact is trained at the job's guidance scale

    # --- what a subclass provides -------------------------------------------------------------

    def make_loss(self, bundle: ModelBundle, net: ConsistencyNet, data: Data, guidance: float) -> tuple[LossFn, dict[str, Any]]:
        """The loss for the shared loop and the state it keeps across steps (saved with checkpoints)."""
        raise NotImplementedError

    def teacher_rows_per_step(self, bundle: ModelBundle, guidance: float) -> int:
        return 0

    # --- artifacts ----------------------------------------------------------------------------

    def _guidance(self, bundle: ModelBundle, guidance: float | None) -> float:
        if bundle.num_classes is None:
            return 1.0
        if not self.distils_guidance:
            if guidance not in (None, 1.0):
                raise ValueError(f"{self.name} is trained from data without guidance: it runs at guidance 1 only")
            return 1.0
        if guidance is None:
            raise ValueError(f"{self.name} distils the teacher at one guidance scale: give the job's guidance")
        return float(guidance)

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = self._guidance(bundle, guidance)
        c = self.config
        budget = {
            "optimizer_steps": c["train_steps"],
            "batch_size": c["batch_size"],
            "teacher_rows": c["train_steps"] * self.teacher_rows_per_step(bundle, w),
        }
        return [artifact_spec(self, bundle, "student", {"guidance": w}, (), budget)]

    def student(self, bundle: ModelBundle) -> ConsistencyNet:
        """A fresh student: the teacher's network (read in its parametrisation, or as x0 with the
        ``read`` knob) or a network trained from scratch (read raw)."""
        has_weights = any(True for _ in bundle.denoiser.net.parameters())
        if self.from_teacher and has_weights:
            read = bundle.kind if self.config.get("read", "teacher") == "teacher" else "x0"
            return ConsistencyNet(new_student(bundle, self.config["seed"]), read, bundle.denoiser.schedule)
        return ConsistencyNet(fresh_network(bundle, self.config["seed"]), "raw", bundle.denoiser.schedule)

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        w = float(spec.params["guidance"])
        net = self.student(bundle)
        loss, extra = self.make_loss(bundle, net, training_data(bundle), w)
        steps = c["train_steps"]
        cfg = TrainConfig(steps, c["batch_size"], c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))
        res = fit(net, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), extra)
        eps, smax = noise_range(bundle.denoiser.schedule)
        info = {"read": net.read, "guidance": w, "sigma_data": net.sigma_data, "eps": eps, "sigma_max": smax}
        save_student(ctx.out, res.model.inner, info)
        ctx.note_training(res)

    # --- the job --------------------------------------------------------------------------------

    def load(self, bundle: ModelBundle, artifacts: Mapping[str, Artifact]) -> tuple[ConsistencyNet, dict[str, Any]]:
        art = next(
            (a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "student"), None
        )
        if art is None:
            raise ValueError(f"{self.name}: its student artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        inner, info = load_student(art, bundle, self.config["seed"])
        net = ConsistencyNet(inner, info["read"], bundle.denoiser.schedule, info["sigma_data"])
        return net.eval().requires_grad_(False), info

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        net, info = self.load(bundle, artifacts)
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, "x0", w)
        times = sampling_times(bundle.denoiser.schedule, steps, self.config["sampling"])

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators, gamma=1.0)

        return Prepared(sampler, den, info={"distilled_guidance": w, "times": times})


def lognormal_weights(levels: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """p(n) for n = 1..N-1 (Song & Dhariwal 2023, Eq. 10): the lognormal(p_mean, p_std) mass between
    sigma_n and sigma_{n+1}, normalised (float64)."""
    cdf = torch.erf((torch.log(levels) - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


__all__ = [
    "ConsistencyAdapter",
    "ConsistencyNet",
    "budget_knobs",
    "READ_KNOB",
    "SAMPLING_KNOB",
    "SIGMA_DATA",
    "ema_update",
    "fresh_network",
    "karras_levels",
    "level_of",
    "lognormal_weights",
    "noise_range",
    "perturb",
    "pseudo_huber",
    "sampling_times",
    "squared_l2",
    "teacher_step",
    "time_of",
    "training_data",
]
