"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Algorithm 2): a student,
initialised from its teacher, learns to do in one deterministic DDIM step what its teacher does
in two; the student becomes the next stage's teacher, and N halves (``start_steps`` 64 -> 32 ->
... -> 1).

Stage N (a student for N steps) trains on the student's grid t_0 > ... > t_N (native times uniform
from the sampler's start to the data end, :func:`bench.flowmap.student_times`); the teacher's grid
of 2N steps adds the midpoints. One training example (Algorithm 2, step by step):

- x ~ data (the training digits with their labels; mixture samples on ``gmm``), eps ~ N(0, I),
  a grid point t = t_i, i uniform in {0, ..., N-1}, its midpoint t' and the next point t'';
  z_t = alpha_t x + sigma_t eps;
- two DDIM steps of the teacher: z_t' = alpha_t' x_hat(z_t) + sigma_t' eps_hat(z_t), then
  z_t'' from z_t' the same way;
- the x-target, the x~ that makes one DDIM step from z_t land on z_t'':
  x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
  (at the last grid point, t'' = data, it is the teacher's two-step endpoint);
- the loss, with the paper's truncated-SNR weighting:
  max(||x - x_hat||^2, ||eps - eps_hat||^2) = max(SNR_t, 1) ||x~ - x_hat_student(z_t)||^2,
  SNR = alpha^2 / sigma^2 (averaged over pixels and the batch).

Each stage is its own artifact (``student-N``), its parent the stage before (the first stage's
teacher is the model itself); a job at N steps uses stage N and reports the chain's cost (every
stage's optimiser steps and teacher rows: the later stages' teacher is the previous student, whose
forwards are counted as teacher forwards). The student samples with deterministic DDIM over its
grid (:func:`bench.flowmap.sample_flow_map`, gamma 0): N network evaluations.

Parametrisation: the student predicts what its teacher predicts (eps on ``digits-unet``, flow
velocity on ``digits-dit``); the loss is always in x. What eps does at the last stage (the paper's
Section 3, why it moves to v): the one step from the first grid point (t = 999, alpha = 0.0064 on
the 1000-step linear DDPM schedule) reads x_hat = (z - sigma eps_hat) / alpha, so an eps error is
amplified about 157x into the image, and the truncated-SNR weight there is 1: the one-step eps
student has to output eps to 1/157 of the image's precision, and does not. Measured on
``digits-unet`` (start_steps 16, 200 steps of 32 per stage): its 2- and 4-step students match or
beat the teacher's DDIM at the same steps, its 1-step student is far worse than the teacher's
1-step DDIM (FID 22.6 against 7.9). A flow-velocity student has no such amplification
(x_hat = z - sigma v_hat) and its 1-step student beats the teacher's. On ``gmm``, whose analytic
teacher has no weights, the first student is an MLP trained from scratch
(:func:`bench.students.new_student`).

Guidance: as knowledge distillation, a stage is distilled at the job's guidance scale w (the
artifact holds it). The first stage's teacher step at w is a classifier-free-guided evaluation
(cond and uncond rows); every student runs one pass per step with w in its weights
(:func:`bench.students.student_denoiser`: one row per sample) and refuses another w.

Departures: each stage trains with the shared loop (AdamW, warm-up then cosine decay, and an EMA of
the student, which is what the next stage starts from and distils) at small per-stage budgets (the
paper's are tens of thousands of updates per stage); times are the schedule's native grid rather
than t = i / N in [0, 1].
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from bench.flowmap import sample_flow_map, student_times
from bench.students import device_of, load_student, new_student, save_student, student_denoiser
from bench.training import TrainConfig, fit

# (z, t, cond, w) -> the teacher's prediction; w: per-row guidance scales (None: the stage's fixed scale)
Teacher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
# (net, z, t, cond, w) -> the student's prediction
Student = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
# (n, g) -> (x0, cond): n training samples drawn with g
Data = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]

MAX_START_STEPS = 1024


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def stage_steps(start_steps: int, steps: int) -> list[int]:
    """The step counts of the stages from ``start_steps`` down to ``steps``: start/2, start/4, ..., steps."""
    if not is_power_of_two(start_steps) or start_steps < 2:
        raise ValueError(f"start_steps must be a power of two of at least 2, got {start_steps}")
    if not is_power_of_two(steps) or steps >= start_steps:
        below = "/".join(str(2**k) for k in range(int(math.log2(start_steps))))
        raise ValueError(f"progressive distillation from {start_steps} steps runs at {below} steps, not {steps}")
    out, n = [], start_steps // 2
    while n >= steps:
        out.append(n)
        n //= 2
    return out


def teacher_grid(den: Denoiser, n: int, t_start: float) -> torch.Tensor:
    """The teacher's 2n-step grid (float64): the student's n-step grid is its even entries."""
    return torch.tensor(student_times(den, 2 * n, t_start), dtype=torch.float64)


def ddim_step(den: Denoiser, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from t to s with the prediction ``pred`` at (z, t)."""
    x0, eps = den.x0_eps(z, t, pred)
    a, sg = den.alpha_sigma(s, z)
    return a * x0 + sg * eps


@torch.no_grad()
def two_step_x_target(
    den: Denoiser,
    teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_next: torch.Tensor,
) -> torch.Tensor:
    """Algorithm 2's x~: two teacher DDIM steps t -> t' -> t'', then the x whose one DDIM step from
    z_t lands on z_t'' (``teacher(z, t)`` gives the teacher's prediction in ``den``'s parametrisation)."""
    z_mid = ddim_step(den, z, t, t_mid, teacher(z, t))
    z_next = ddim_step(den, z_mid, t_mid, t_next, teacher(z_mid, t_mid))
    a, s = den.alpha_sigma(t, z)
    a2, s2 = den.alpha_sigma(t_next, z)
    r = s2 / s
    return (z_next - r * z) / (a2 - r * a)


def truncated_snr_weight(den: Denoiser, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """max(SNR_t, 1), SNR = alpha^2 / sigma^2: Salimans & Ho's truncated-SNR weighting of the x error."""
    a, s = den.alpha_sigma(t, like)
    return torch.clamp(a**2 / s**2, min=1.0)


def weighted_x_loss(x_hat: torch.Tensor, x_target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mean over samples of weight * the mean squared error over the sample's entries."""
    err = (x_hat - x_target.to(x_hat.dtype)) ** 2
    return (weight.to(err.dtype).flatten() * err.flatten(1).mean(1)).mean()


def training_data(bundle: ModelBundle) -> Data:
    """What a student of ``bundle`` trains on: the training digits (their labels as the condition),
    samples of the analytic mixture, or a model's own sampler ``bundle.extra["training_data"]``
    (``(n, g) -> (x0, cond)``); on the teacher's device."""
    dev = device_of(bundle.denoiser.net)
    own = bundle.extra.get("training_data")
    if own is not None:

        def draw_own(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
            x0, cond = own(n, g)
            return x0.to(dev), (cond.to(dev) if cond is not None else None)

        return draw_own
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
    raise ValueError(f"{bundle.name}: progressive distillation trains on data; bench has training data for the digits "
                     "models and gmm only")  # fmt: skip


def pd_stage_loss(
    den: Denoiser,
    n: int,
    t_start: float,
    data: Data,
    teacher: Teacher,
    student: Student,
    batch_size: int,
    w_range: tuple[float, float] | None = None,
) -> Callable[[nn.Module, torch.Generator], torch.Tensor]:
    """The loss of stage ``n`` (Algorithm 2; see the module docstring) for the shared training loop.
    With ``w_range`` every row also draws a guidance scale w uniformly from it, given to teacher and
    student (guidance distillation's second stage)."""
    grid = teacher_grid(den, n, t_start)

    def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
        x0, cond = data(batch_size, g)
        dev = x0.device
        w = None
        if w_range is not None:
            lo, hi = w_range
            w = (lo + (hi - lo) * torch.rand(batch_size, generator=g, dtype=torch.float64)).to(dev)
        i = torch.randint(0, n, (batch_size,), generator=g)
        t, t_mid, t_next = grid[2 * i].to(dev), grid[2 * i + 1].to(dev), grid[2 * i + 2].to(dev)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(dev)
        a, s = den.alpha_sigma(t, x0)
        z = a * x0 + s * eps
        x_target = two_step_x_target(den, lambda zz, tt: teacher(zz, tt, cond, w), z, t, t_mid, t_next)
        x_hat = den.x0_eps(z, t, student(net, z, t, cond, w))[0]
        return weighted_x_loss(x_hat, x_target, truncated_snr_weight(den, t, x0))

    return loss


def stage_config(c: Mapping[str, Any]) -> TrainConfig:
    """The shared loop's settings for one stage from the budget knobs."""
    steps = int(c["train_steps"])
    return TrainConfig(steps, int(c["batch_size"]), float(c["lr"]), min(100, steps // 10), float(c["ema"]),
                       ckpt_every=max(1, steps // 20))  # fmt: skip


def train_stage(
    ctx: BuildContext,
    net: nn.Module,
    loss: Callable[[nn.Module, torch.Generator], torch.Tensor],
    c: Mapping[str, Any],
    seed: int,
) -> nn.Module:
    """Train ``net`` with the shared loop (checkpointed in ``ctx``); the trained (EMA) network."""
    res = fit(net, loss, stage_config(c), seed, ctx, lambda s, k, v: ctx.progress(s, k, v))
    ctx.note_training(res)
    return res.model


def stage_teacher_rows(c: Mapping[str, Any], cfg_rows: int) -> int:
    """Teacher rows of a stage: two teacher evaluations per example, ``cfg_rows`` rows each."""
    return int(c["train_steps"]) * int(c["batch_size"]) * 2 * cfg_rows


def find_artifact(artifacts: Mapping[str, Artifact], method: str, name: str) -> Artifact:
    art = next((a for a in artifacts.values() if a.record.get("method") == method and a.record.get("name") == name), None)
    if art is None:
        raise ValueError(f"{method}: its artifact {name!r} was not given; prepare(bundle, steps, guidance=w) builds it")
    return art


POWERS = tuple(2**k for k in range(int(math.log2(MAX_START_STEPS))))

BUDGET_KNOBS = (
    Knob("start_steps", int, 64, "the teacher's DDIM step count the first stage halves (a power of two)", low=2,
         high=MAX_START_STEPS, trains=True),
    Knob("train_steps", int, 300, "optimiser steps per stage", low=1, high=10_000_000, trains=True),
    Knob("batch_size", int, 32, "training examples per optimiser step", low=1, high=65536, trains=True),
    Knob("lr", float, 3e-4, "AdamW learning rate (warm-up, then cosine decay), per stage", low=1e-7, high=1.0, trains=True),
    Knob("ema", float, 0.99, "EMA decay of the student's weights (0: none); the EMA is the next teacher", low=0.0,
         high=0.99999, trains=True),
    Knob("seed", int, 0, "seed of the training batches (an MLP student's initialisation)", low=0, trains=True),
)  # fmt: skip


@register_method
class ProgressiveDistillation(MethodAdapter):
    name = "progressive"
    family = "distillation"
    training = "finetune"
    paper = "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models, arXiv 2202.00512"
    description = (
        "student initialised from its teacher learns two teacher DDIM steps in one (x-target, truncated-SNR weight); "
        "N halves from start_steps, each stage an artifact built from the previous one"
    )
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    steps_supported = POWERS[:6]  # below the default start_steps, 64; an instance has those below its own
    knobs = BUDGET_KNOBS

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.steps_supported = tuple(n for n in POWERS if n < self.config["start_steps"])

    # --- artifacts -----------------------------------------------------------------------------

    def _guidance(self, bundle: ModelBundle, guidance: float | None) -> float:
        if bundle.num_classes is None:
            return 1.0
        if guidance is None:
            raise ValueError("progressive distils the teacher at one guidance scale: give the job's guidance")
        return float(guidance)

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = self._guidance(bundle, guidance)
        c = self.config
        cfg_rows = 2 if w != 1.0 and bundle.num_classes else 1
        spec: ArtifactSpec | None = None
        for n in stage_steps(c["start_steps"], steps):
            rows = stage_teacher_rows(c, cfg_rows if spec is None else 1)
            budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
            parents = (spec,) if spec is not None else ()
            spec = artifact_spec(self, bundle, f"student-{n}", {"guidance": w, "steps": n}, parents, budget)
        assert spec is not None
        return [spec]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        den = bundle.denoiser
        n, w = int(spec.params["steps"]), float(spec.params["guidance"])
        t_start = bundle.t_start
        if not spec.parents:  # the first stage: the model is the teacher (classifier-free guided at w)

            def teacher(z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, _w: object) -> torch.Tensor:
                return den(z, t, cond, w)

            student = new_student(bundle, c["seed"])
        else:  # the previous stage's student is the teacher (one pass, w in its weights)
            prev, _ = load_student(ctx.parent(f"student-{2 * n}"), bundle, c["seed"])
            student = copy.deepcopy(prev).train().requires_grad_(True)
            ctx.count_as_teacher(prev)

            def teacher(z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, _w: object) -> torch.Tensor:
                return prev(z, t, cond)

        def run_student(net: nn.Module, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, _w: object):
            return net(z, t, cond)

        loss = pd_stage_loss(den, n, t_start, training_data(bundle), teacher, run_student, c["batch_size"])
        model = train_stage(ctx, student, loss, c, c["seed"] + n)
        save_student(ctx.out, model, {"prediction": den.prediction, "t_start": t_start, "guidance": w, "steps": n})

    # --- the job --------------------------------------------------------------------------------

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = find_artifact(artifacts, self.name, f"student-{steps}")
        net, info = load_student(art, bundle, self.config["seed"])
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, info["prediction"], w)
        times = student_times(den, steps, float(info["t_start"]))

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators, gamma=0.0)

        return Prepared(sampler, den, info={"distilled_guidance": w, "stage_steps": steps})
