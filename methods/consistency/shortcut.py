"""Shortcut models (Frans, Hafner, Levine & Abbeel 2025, arXiv 2410.12557): one velocity network
conditioned on the step size d, trained with flow matching and self-consistency, sampled in 1, 2, 4
or 8 steps.

The network s(x_t, t, d) is the teacher's velocity network with one new input, the step size d
(:class:`bench.models.students.ExtraInputs` with ``("d",)``, its embedding zero-initialised, so a
fresh student is its teacher at every d). In bench's flow frame (x_t = (1 - t) x_0 + t eps, t = 1
noise, velocity eps - x_0, native time 1000 t) a step of size d is x_{t-d} = x_t - d s(x_t, t, d).
The training batch is the paper's Algorithm 1 (Sec. 3, eqs. 5-6):

- flow-matching rows (a fraction 1 - ``sc_fraction``): d = 0, t on the grid of the finest step 1/M
  (M = ``max_steps``), target eps - x_0 from a data sample and fresh noise;
- self-consistency rows (``sc_fraction``; the paper's 1/8): a shortcut 2d drawn uniformly among the
  log2 M sizes 1, 1/2, ..., 2/M, t on its grid (t - 2d >= 0), and the target
  s_target = (s(x_t, t, d) + s(x'_{t-d}, t - d, d)) / 2 with x'_{t-d} = x_t - d s(x_t, t, d),
  computed without gradient; the finest half-step d = 1/M is queried at d = 0 (the flow-matching
  level), as in the paper's code, where the finest level is the flow-matching one.

One mean squared error over both kinds of rows. Sampling at N steps runs x <- x - (1/N) s(x, t, 1/N)
from t = 1 (:func:`bench.flowmap.sample_flow_map` with a flow-map network whose second time is
t - d: the DDIM step of a flow-velocity prediction is exactly this Euler step).

Departures: the student starts from the teacher's weights (the paper trains from scratch;
``training: finetune``), so its flow-matching part starts converged; the self-consistency targets come
from the online network by default (``target_ema`` = 0; the paper uses its EMA weights, 0.999), since
an EMA target delays each of the log2 M levels of the bootstrap by its horizon and the budgets here
are short; no clipping of the targets; d is embedded in native time units (1000 d) like a timestep
rather than as the paper's log2 level; no classifier-free guidance in training, so the student runs
at guidance 1 only. Flow teachers only (``applies_to`` prediction=flow): the step-size-conditioned
velocity is defined on the straight flow path; an eps teacher would first need its ODE rewritten in
the flow frame with a velocity head (x_0 = (x - sigma eps)/alpha is ill-conditioned at the noisiest
level, sigma/alpha ~ 157 on the digits schedule), which would no longer start from the teacher.
Trained from data (the embedded digits' training split, or the analytic mixture's samples): no
teacher forward is spent.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.flowmap import sample_flow_map
from bench.io import WeightsError, load_weights
from bench.models.students import ExtraInputs
from bench.students import device_of, new_student, save_student, student_denoiser
from bench.training import TrainConfig, fit

T_NATIVE = 1000.0  # native time of pure noise on a flow schedule: t_native = 1000 t

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


class ShortcutNet(nn.Module):
    """``net(x, t, cond, s=s)``: the shortcut velocity s(x_t, t, d) with step d = t - s, so that the
    flow-map sampler's jump from t to s is the shortcut step; training calls it with ``d`` directly."""

    def __init__(self, inner: ExtraInputs) -> None:
        super().__init__()
        self.inner = inner
        self.arch = inner.arch

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        s: torch.Tensor | None = None,
        d: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if d is None:
            if s is None:
                raise ValueError("a shortcut network needs the step size d or the time s it jumps to")
            d = t - s
        return self.inner(x, t, cond, d=d)


def new_shortcut_student(bundle: ModelBundle, seed: int = 0) -> ShortcutNet:
    """The teacher's network (an MLP for the analytic mixture) with a zero-initialised step-size input."""
    return ShortcutNet(ExtraInputs(new_student(bundle, seed), ("d",)))


def training_data(bundle: ModelBundle) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]:
    """``draw(n, g) -> (x0, labels)``: training samples of the model's data (the digits' training
    split; the analytic mixture's exact samples), drawn with the generator ``g``."""
    mix = bundle.extra.get("mixture")
    if mix is not None:
        return lambda n, g: (mix.sample(n, g).to(bundle.dtype), None)
    if bundle.name in ("digits-unet", "digits-dit"):
        from bench.data import digits

        x, y = digits("train")

        def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
            idx = torch.randint(0, len(x), (n,), generator=g)
            return x[idx].to(bundle.dtype), y[idx]

        return draw
    raise ValueError(f"{bundle.name}: trained from data, which bench has only for the digits models and the mixture")


def self_consistency_target(
    s_fn: Velocity, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, d_in: torch.Tensor, cond: torch.Tensor | None
) -> torch.Tensor:
    """The paper's eq. 5 target for the shortcut of size 2d at t (native times, per row):
    (s(x_t, t, d) + s(x'_{t-d}, t - d, d)) / 2 with x'_{t-d} = x_t - (d / 1000) s(x_t, t, d).
    ``d_in`` is the step size the network is asked at (d, or 0 at the flow-matching level)."""
    scale = (d / T_NATIVE).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    s1 = s_fn(x, t, cond, d_in)
    x_mid = x - scale * s1
    s2 = s_fn(x_mid, t - d, cond, d_in)
    return (s1 + s2) / 2


def shortcut_times(
    n: int, n_sc: int, max_steps: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Times and step sizes of one batch (native units, float64): ``(t, d_in, half, sc)``.

    Rows [0, n - n_sc) are flow matching: t = 1000 j / M (j uniform in 1..M), d_in = 0. Rows
    [n - n_sc, n) are self-consistency: level k uniform in 0..log2 M - 1, shortcut 2d = 1000 / 2^k,
    t = j 2d (j uniform in 1..2^k), d_in = 2d (what the network is trained at), ``half`` = d (the
    half-step of its target; queried at 0 when d is the finest step 1000 / M)."""
    levels = int(round(math.log2(max_steps)))
    t = torch.empty(n, dtype=torch.float64)
    d_in = torch.zeros(n, dtype=torch.float64)
    half = torch.zeros(n, dtype=torch.float64)
    n_fm = n - n_sc
    t[:n_fm] = T_NATIVE * torch.randint(1, max_steps + 1, (n_fm,), generator=g).double() / max_steps
    if n_sc:
        k = torch.randint(0, levels, (n_sc,), generator=g)
        full = T_NATIVE / 2.0 ** k.double()
        j = (torch.rand(n_sc, generator=g, dtype=torch.float64) * 2.0 ** k.double()).floor() + 1
        t[n_fm:] = j * full
        d_in[n_fm:] = full
        half[n_fm:] = full / 2
    return t, d_in, half, torch.arange(n) >= n_fm


def shortcut_loss(
    net: ShortcutNet,
    target_net: ShortcutNet,
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    g: torch.Generator,
    sc_fraction: float,
    max_steps: int,
) -> torch.Tensor:
    """One batch of the shortcut objective (see the module docstring): flow matching at d = 0 plus
    self-consistency at 2d, one mean squared error."""
    n = x0.shape[0]
    n_sc = int(round(sc_fraction * n))
    t, d_in, half, sc = shortcut_times(n, n_sc, max_steps, g)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    tf = (t / T_NATIVE).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - tf) * x0 + tf * eps
    target = eps - x0
    if n_sc:
        finest = T_NATIVE / max_steps
        q = torch.where(half[sc] <= finest + 1e-9, torch.zeros_like(half[sc]), half[sc])
        c_sc = cond[sc] if cond is not None else None

        def s_fn(x: torch.Tensor, tt: torch.Tensor, c: torch.Tensor | None, dd: torch.Tensor) -> torch.Tensor:
            return target_net(x, tt, c, d=dd)

        with torch.no_grad():
            target = target.clone()
            target[sc] = self_consistency_target(s_fn, xt[sc], t[sc], half[sc], q, c_sc).to(target.dtype)
    pred = net(xt, t, cond, d=d_in)
    return F.mse_loss(pred, target)


def load_extra_student(
    art: Artifact, bundle: ModelBundle, make: Callable[[ModelBundle, int], nn.Module], seed: int = 0
) -> tuple[nn.Module, dict]:
    """A saved student with extra inputs (``make`` builds its empty structure) on the teacher's
    device, and its ``student.json``."""
    fix = f"rebuild the artifact: delete {art.path} and run again"
    net = make(bundle, seed)
    load_weights(net, art.path / "student.safetensors", fix)
    try:
        info = json.loads((art.path / "student.json").read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{art.path / 'student.json'} is missing or corrupt ({e}); {fix}") from e
    return net.eval().requires_grad_(False).to(device_of(bundle.denoiser.net)), info


def check_unguided(name: str, guidance: float | None) -> None:
    if guidance is not None and float(guidance) != 1.0:
        raise ValueError(
            f"{name} is trained on data without classifier-free guidance; it runs at guidance 1, not {float(guidance):g}"
        )


def flow_times(steps: int, t_start: float = T_NATIVE) -> list[float]:
    """``steps + 1`` uniform native times from noise to data."""
    return [float(v) for v in np.linspace(t_start, 0.0, steps + 1)]


@register_method
class ShortcutModel(MethodAdapter):
    name = "shortcut"
    family = "consistency"
    training = "finetune"
    paper = "Frans, Hafner, Levine & Abbeel 2025, One Step Diffusion via Shortcut Models, arXiv 2410.12557"
    description = (
        "step-size-conditioned velocity (zero-initialised d input on the teacher); flow matching at d = 0 plus "
        "self-consistency s(x,t,2d) = mean of two d-steps; 1/2/4/8-step sampling"
    )
    applies_to = Applies(prediction=("flow",))
    steps_supported = (1, 2, 4, 8)
    knobs = (
        Knob("train_steps", int, 800, "optimiser steps", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 64, "samples per optimiser step", low=2, high=65536, trains=True),
        Knob("lr", float, 2e-4, "AdamW learning rate (warm-up, then cosine decay)", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, 0.995, "EMA decay of the weights sampled with (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (batches, times, noise; an MLP student's initialisation)", low=0,
             trains=True),
        Knob("sc_fraction", float, 0.25, "fraction of each batch trained on self-consistency targets (paper: 1/8)",
             low=0.0, high=1.0, trains=True),
        Knob("max_steps", int, 128, "M: the finest step 1/M (flow matching); shortcuts 2/M ... 1",
             choices=(16, 32, 64, 128, 256), trains=True),
        Knob("target_ema", float, 0.0, "EMA decay of the network giving the self-consistency targets (0: the online one)",
             low=0.0, high=0.99999, trains=True),
    )  # fmt: skip

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        check_unguided(self.name, guidance)
        c = self.config
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"]}
        return [artifact_spec(self, bundle, "student", {}, (), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        draw = training_data(bundle)
        student = new_shortcut_student(bundle, c["seed"]).to(device_of(bundle.denoiser.net)).train().requires_grad_(True)
        target = copy.deepcopy(student).requires_grad_(False) if c["target_ema"] > 0 else None
        steps = c["train_steps"]
        cfg = TrainConfig(steps, c["batch_size"], c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            if target is not None:  # the bootstrap network follows the online one
                with torch.no_grad():
                    for pt, p in zip(target.parameters(), net.parameters(), strict=True):
                        pt.lerp_(p, 1 - c["target_ema"])
            x0, y = draw(c["batch_size"], g)
            return shortcut_loss(net, target or net, x0, y, g, c["sc_fraction"], c["max_steps"])

        extra = {"target": target} if target is not None else None
        res = fit(student, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), extra_state=extra)
        save_student(ctx.out, res.model, {"prediction": "flow", "max_steps": c["max_steps"]})
        ctx.note_training(res)

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next((a for a in artifacts.values() if a.record.get("method") == self.name), None)
        if art is None:
            raise ValueError("shortcut: its student artifact was not given; prepare(bundle, steps, guidance=1) builds it")
        net, _ = load_extra_student(art, bundle, new_shortcut_student, self.config["seed"])
        den = student_denoiser(bundle, net, "flow", 1.0, second_time=True)
        times = flow_times(steps, bundle.t_start)

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators)

        return Prepared(sampler, den)
