"""Latent consistency models (Luo et al. 2023, arXiv 2310.04378): guided consistency distillation,
Algorithm 1 (LCD) of the paper, with the guidance scale w as an input and skipping steps.

The student is the teacher's network with w as an extra input (:class:`bench.models.students.ExtraInputs`:
w embedded like a timestep and added to the timestep embedding, the new layers zero-initialised, so a
fresh student computes the teacher's conditional prediction). It is read through the skip
parametrisation of consistency models (Song et al. 2023, Eq. 7, in LCM's form):

    f_theta(x, t; w, c) = c_skip(t) x + c_out(t) x0_hat(x, t; w, c),
    c_skip = sigma_d^2 / ((k_s tau)^2 + sigma_d^2),  c_out = k_s tau / sqrt((k_s tau)^2 + sigma_d^2),

tau = t - t_data the native time above the data end (t = -1 on a VP model, 0 on a flow), sigma_d =
0.5 and the timestep scaling k_s = 10 (``timestep_scaling``) of LCM's scheduler. At the data end
c_skip = 1 and c_out = 0: f(x, t_data) = x exactly, the boundary condition.

One training example (Algorithm 1, with the DDIM solver of the paper):

- x ~ data (the training digits with their labels; mixture samples on ``gmm``), eps ~ N(0, I),
  w ~ U[w_min, w_max], a pair of adjacent points of the skipping grid t_{n+k} > t_n (the teacher's
  T = 1000 native steps taken ``skip`` = k at a time: t_data, t_data + k, ..., t_start), n uniform;
  x_{t_{n+k}} = alpha x + sigma eps;
- the teacher's guided ODE step: one DDIM step t_{n+k} -> t_n with the classifier-free-guided
  prediction u + w (c - u) at the row's w (the paper's (1 + w) Psi(c) - w Psi(null), its w being
  ours minus 1): one forward of the doubled (cond, null) batch;
- the loss d(f_theta(x_{t_{n+k}}, t_{n+k}; w), f_theta-(x_hat_{t_n}, t_n; w)), f_theta- the target
  network, an EMA of the student (theta- <- mu theta- + (1 - mu) theta after every update, mu =
  ``target_ema``), d the squared error (``loss: l2``) or the pseudo-Huber distance of LCM's code
  (``loss: huber``, c = ``huber_c``).

Sampling is the multistep consistency sampler (LCM's Algorithm 3 and scheduler): at each time
f maps to the data end, then fresh noise brings the estimate to the next time
(:func:`bench.flowmap.sample_flow_map` with gamma 1); the times are points of the skipping grid,
evenly spaced in index (4 steps on the default grid, k = 50: t = 999, 749, 499 and 249 on a VP
teacher). Each step is one network row per sample at any w in [w_min, w_max]: one artifact
serves the whole range (the job's scale is an input), a scale outside it is refused.

Unconditional teachers (``gmm``) have no guidance: the student has no w input, the teacher step is
plain DDIM (w = 1), and LCM is consistency distillation with skipping steps.

Departures: pixel space (no encoder: the embedded teachers are pixel models); what the student
outputs: the teacher's parametrisation, except that an eps teacher's student predicts x0
(``prediction: auto``; LCM's SD students keep eps, but on the 1000-step linear DDPM schedule alpha
at t = 999 is 0.0064, so x0 read from eps there amplifies an eps error 157x; ``prediction: teacher``
keeps eps); the shared training loop (AdamW, warm-up and cosine decay, gradient clipping, an EMA
of the weights for sampling, ``ema``) and small budgets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser, Schedule
from bench.flowmap import sample_flow_map
from bench.io import WeightsError, load_weights
from bench.models.students import ExtraInputs
from bench.students import device_of, new_student, save_student, student_prediction
from bench.training import TrainConfig, fit

SIGMA_DATA = 0.5  # LCM's sigma_data in the boundary scalings

Data = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.to(torch.float64)


def boundary_scalings(tau: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at native time tau above the data end: c_skip(0) = 1, c_out(0) = 0."""
    st = tau.to(torch.float64) * timestep_scaling
    c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
    c_out = st / (st**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def consistency_f(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float,
    cond: torch.Tensor | None,
    w: torch.Tensor | float | None,
    prediction: str,
    schedule: Schedule,
    t_data: float,
    timestep_scaling: float,
) -> torch.Tensor:
    """f(x, t; w, c) = c_skip x + c_out x0_hat: the skip parametrisation around ``net`` (which takes
    ``guidance=w`` when w is not None), its output read as ``prediction``."""
    t = _times(t, x)
    raw = net(x, t, cond) if w is None else net(x, t, cond, guidance=w)
    x0 = Denoiser(net, prediction, schedule).x0_eps(x, t, raw)[0]  # type: ignore[arg-type]
    c_skip, c_out = boundary_scalings(t - t_data, timestep_scaling)
    return _col(c_skip, x) * x + _col(c_out, x) * x0


class ConsistencyNet(nn.Module):
    """A trained LCM student as the network of an x0 denoiser: ``net(x, t, cond, guidance)`` is
    f(x, t; w, c), one pass of the inner network. A conditional student takes the scale as an input
    (guidance-embedded: one row per sample) and refuses one outside [w_min, w_max]."""

    def __init__(
        self,
        inner: nn.Module,
        prediction: str,
        schedule: Schedule,
        t_data: float,
        timestep_scaling: float,
        w_range: tuple[float, float] | None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.prediction, self.schedule, self.t_data = prediction, schedule, float(t_data)
        self.timestep_scaling = float(timestep_scaling)
        self.w_range = w_range
        self.arch = getattr(inner, "arch", "other")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None, guidance: float | None = None
    ) -> torch.Tensor:
        w = None
        if self.w_range is not None:
            w = 1.0 if guidance is None else float(guidance)
            check_range(w, *self.w_range)
        elif guidance is not None and float(guidance) != 1.0:
            raise ValueError(f"this unconditional LCM student has no guidance input; it cannot run at {float(guidance):g}")
        args = (self.prediction, self.schedule, self.t_data, self.timestep_scaling)
        return consistency_f(self.inner, x, t, cond, w, *args)


def check_range(w: float, w_min: float, w_max: float) -> None:
    if not w_min - 1e-9 <= w <= w_max + 1e-9:
        raise ValueError(
            f"this LCM student was distilled for guidance in [{w_min:g}, {w_max:g}]; it cannot run at {w:g} "
            "(set the knobs w_min/w_max to a range that holds it)"
        )


def skipping_grid(schedule: Schedule, t_start: float, skip: int) -> torch.Tensor:
    """The skipping-step grid, ascending from the data end: t_data, t_data + k, ..., t_start (float64)."""
    T = schedule.num_train_timesteps
    if skip < 1 or T % skip:
        raise ValueError(f"skip must divide the teacher's {T} steps, got {skip}")
    return torch.tensor(np.linspace(t_start - T, t_start, T // skip + 1), dtype=torch.float64)


def sampling_times(grid: torch.Tensor, steps: int) -> list[float]:
    """``steps + 1`` descending points of the ascending grid, evenly spaced in index, from its top to the data end."""
    m = len(grid) - 1
    if not 1 <= steps <= m:
        raise ValueError(f"an LCM student on a grid of {m} skipping steps runs at 1 to {m} steps, not {steps}")
    idx = np.round(np.linspace(m, 0, steps + 1)).astype(int)
    return [float(grid[i]) for i in idx]


def guided_x0_eps(
    den: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, w: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (x0, eps) under classifier-free guidance u + w (c - u) with a scale per row (one
    forward of the doubled cond + null batch); a plain pass without a condition or null class."""
    if cond is None or den.null_class is None or w is None:
        pred = den.net(x, t, cond)
    else:
        null = torch.full_like(cond, den.null_class)
        c, u = den.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
        pred = u + _col(w, u) * (c - u)
    return den.x0_eps(x, t, pred)


def teacher_ddim_step(
    den: Denoiser, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor | None, w: torch.Tensor | None
) -> torch.Tensor:
    """The teacher's guided DDIM step t -> s (per-row times and scales): the solver Psi of LCD."""
    x0, eps = guided_x0_eps(den, x, t, cond, w)
    a, sg = den.alpha_sigma(s, x)
    return a * x0 + sg * eps


@torch.no_grad()
def lcm_target(
    den: Denoiser,
    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
    x_hi: torch.Tensor,
    t_hi: torch.Tensor,
    t_lo: torch.Tensor,
    cond: torch.Tensor | None,
    w: torch.Tensor | None,
) -> torch.Tensor:
    """f_theta-(x_hat_{t_n}, t_n; w): the target network's consistency output at the teacher's guided
    DDIM step from x_{t_{n+k}} (``target(x, t, cond, w)`` is f of the target network)."""
    return target(teacher_ddim_step(den, x_hi, t_hi, t_lo, cond, w), t_lo, cond, w)


def consistency_distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """d(a, b): the mean squared error (``l2``) or the pseudo-Huber distance sqrt(d^2 + c^2) - c (``huber``)."""
    diff = a - b.to(a.dtype)
    if kind == "l2":
        return diff.square().mean()
    return ((diff.square() + c * c).sqrt() - c).mean()


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
    raise ValueError(f"{bundle.name}: LCM trains on data; bench has training data for the digits models and gmm only")


@register_method
class LatentConsistencyModel(MethodAdapter):
    name = "lcm"
    family = "consistency"
    training = "finetune"
    paper = "Luo et al. 2023, Latent Consistency Models, arXiv 2310.04378"
    description = (
        "guided consistency distillation: w-conditioned student (zero-initialised w input) matches its EMA target "
        "across the teacher's guided DDIM step over a skipping grid; multistep sampling with re-noising"
    )
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"), guidance=("cfg", "none"))
    knobs = (
        Knob("w_min", float, 1.0, "smallest guidance scale the student serves (u + w (c - u))", low=0.0, high=100.0,
             trains=True),
        Knob("w_max", float, 3.0, "largest guidance scale the student serves", low=0.0, high=100.0, trains=True),
        Knob("skip", int, 50, "skipping interval k: teacher steps (of its 1000) per consistency step (LCM: 20)", low=1, high=1000,
             trains=True),
        Knob("timestep_scaling", float, 10.0, "k_s of the boundary scalings c_skip, c_out (LCM's scheduler: 10)",
             low=1e-3, high=1e4, trains=True),
        Knob("loss", str, "l2", "consistency distance: squared error or LCM's pseudo-Huber", choices=("l2", "huber"),
             trains=True),
        Knob("huber_c", float, 0.001, "c of the pseudo-Huber distance", low=1e-8, high=10.0, trains=True),
        Knob("target_ema", float, 0.9, "EMA rate mu of the target network theta- (LCM: 0.95)", low=0.0, high=0.99999,
             trains=True),
        Knob("prediction", str, "auto", "what the student outputs: auto (x0 for an eps teacher, else the teacher's), "
             "teacher, x0", choices=("auto", "teacher", "x0"), trains=True),
        Knob("train_steps", int, 400, "optimiser steps of the student", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 32, "training examples per optimiser step", low=1, high=65536, trains=True),
        Knob("lr", float, 2e-4, "AdamW learning rate (warm-up, then cosine decay)", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, 0.99, "EMA decay of the weights sampled with (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (batches; an MLP student's initialisation)", low=0, trains=True),
    )  # fmt: skip

    def __init__(self, **knobs: object) -> None:
        super().__init__(**knobs)
        if self.config["w_min"] > self.config["w_max"]:
            raise ValueError(f"w_min ({self.config['w_min']:g}) is above w_max ({self.config['w_max']:g})")

    @property
    def w_range(self) -> tuple[float, float]:
        return float(self.config["w_min"]), float(self.config["w_max"])

    def prediction_of(self, bundle: ModelBundle) -> str:
        p = self.config["prediction"]
        return student_prediction(bundle.kind) if p == "auto" else bundle.kind if p == "teacher" else "x0"

    def new_net(self, bundle: ModelBundle, seed: int = 0) -> nn.Module:
        """A fresh student: the teacher's network (an MLP on ``gmm``), with a zero-initialised w input when conditional."""
        net = new_student(bundle, seed)
        return ExtraInputs(net, ("w",)) if bundle.num_classes is not None else net

    # --- artifacts -----------------------------------------------------------------------------

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        c = self.config
        if guidance is not None and bundle.num_classes is not None:
            check_range(float(guidance), *self.w_range)
        rows = c["train_steps"] * c["batch_size"] * (2 if bundle.num_classes is not None else 1)
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
        return [artifact_spec(self, bundle, "student", None, (), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        den = bundle.denoiser
        conditional = bundle.num_classes is not None
        prediction = self.prediction_of(bundle)
        grid = skipping_grid(den.schedule, bundle.t_start, c["skip"])
        t_data = float(grid[0])
        args = (prediction, den.schedule, t_data, c["timestep_scaling"])
        student = self.new_net(bundle, c["seed"]).train().requires_grad_(True)
        target = self.new_net(bundle, c["seed"])
        target.load_state_dict(student.state_dict())
        target.requires_grad_(False).eval()
        data = training_data(bundle)
        bs, (lo, hi) = c["batch_size"], self.w_range
        m = len(grid) - 1

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            ema_update(target, net, c["target_ema"])
            x0, cond = data(bs, g)
            dev = x0.device
            n = torch.randint(0, m, (bs,), generator=g)
            t_lo, t_hi = grid[n].to(dev), grid[n + 1].to(dev)
            w = (lo + (hi - lo) * torch.rand(bs, generator=g, dtype=torch.float64)).to(dev) if conditional else None
            eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(dev)
            a, s = den.alpha_sigma(t_hi, x0)
            x_hi = a * x0 + s * eps
            tgt = lcm_target(den, lambda x, t, cd, ww: consistency_f(target, x, t, cd, ww, *args), x_hi, t_hi, t_lo, cond, w)
            return consistency_distance(consistency_f(net, x_hi, t_hi, cond, w, *args), tgt, c["loss"], c["huber_c"])

        steps = c["train_steps"]
        cfg = TrainConfig(steps, bs, c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))
        res = fit(student, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), extra_state={"target": target})
        info = {"prediction": prediction, "skip": c["skip"], "timestep_scaling": c["timestep_scaling"],
                "t_start": bundle.t_start, "t_data": t_data, "w_min": lo, "w_max": hi, "conditional": conditional}  # fmt: skip
        save_student(ctx.out, res.model, info)
        ctx.note_training(res)

    # --- the job --------------------------------------------------------------------------------

    def load(self, art: Artifact, bundle: ModelBundle) -> tuple[nn.Module, dict[str, Any]]:
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
            raise ValueError("lcm: its student artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        net, info = self.load(art, bundle)
        sch = bundle.denoiser.schedule
        w_range = (float(info["w_min"]), float(info["w_max"])) if info["conditional"] else None
        f = ConsistencyNet(net, info["prediction"], sch, info["t_data"], info["timestep_scaling"], w_range)
        den = Denoiser(f, "x0", sch, None, guidance_embedded=w_range is not None)
        times = sampling_times(skipping_grid(sch, float(info["t_start"]), int(info["skip"])), steps)

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators, gamma=1.0)

        return Prepared(sampler, den, info={"guidance_range": list(w_range) if w_range else None, "times": times})
