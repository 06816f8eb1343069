"""Guidance distillation (Meng et al. 2023, On Distillation of Guided Diffusion Models, arXiv
2210.03142, Section 3.1 and Algorithm 1 for pixel-space models): one student for a whole range of
guidance scales, in two stages.

1. ``w-student``: the teacher's network with the guidance scale w as an extra input
   (:class:`bench.models.students.ExtraInputs`: w embedded like a timestep and added to the
   timestep embedding, the new layers zero-initialised, so a fresh student is the unguided
   teacher) is trained to reproduce the teacher's classifier-free-guided output in one pass:
   Eq. (6), E_{w ~ U[w_min, w_max], t, x} [ w(lambda_t) ||x_hat_student(z_t, w) - x_hat^w_teacher(z_t)||^2 ],
   with x_hat^w_teacher from the guided prediction u + w (c - u) (bench's convention; the paper's
   w is ours minus 1), x ~ the training digits with their labels, t uniform over the schedule
   (the fraction [0.001, 1] of its range: the weight below is unbounded at the data end) and
   the truncated-SNR weighting max(SNR_t, 1) of Salimans & Ho, the one its stage 2 uses.
2. ``student-N``: progressive distillation of that w-conditioned student (its Section 3.1, stage
   two; :mod:`methods.distillation.progressive`, reused), w staying an input: each training row
   draws w ~ U[w_min, w_max], given to teacher and student alike; N halves from ``start_steps``
   down to the job's steps, each stage an artifact built from the previous one.

The student is guidance-embedded: the job's denoiser hands it the job's scale as an input, one
network row per sample per step (the teacher's guided evaluation is two). One artifact chain
serves every w in [w_min, w_max] (its artifacts do not depend on the job's guidance); a job at a
scale outside it is an error naming the range. At ``start_steps`` steps a job runs the stage-1
student itself (deterministic DDIM on the teacher's grid, one pass per step); below, the stage-N
student of progressive distillation.

Knobs: the range (``w_min``, ``w_max``), stage 1's budget (``guide_steps``, ``guide_lr``: its w
embedding starts at zero and needs a larger rate than the fine-tuning of stage 2), and progressive
distillation's (``start_steps``, ``train_steps`` per stage, ``batch_size``, ``lr``, ``ema``, ``seed``).

Departures: the pixel-space algorithm's x-space loss, trained with the shared loop (AdamW, warm-up
and cosine decay, EMA) at small budgets; the student predicts in its teacher's parametrisation
(see :mod:`methods.distillation.progressive` for what that means for eps at the last stages).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from bench.flowmap import sample_flow_map, student_times
from bench.io import WeightsError, load_weights
from bench.models.students import ExtraInputs
from bench.students import device_of, new_student, save_student
from methods.distillation.progressive import (
    BUDGET_KNOBS,
    POWERS,
    Data,
    find_artifact,
    pd_stage_loss,
    stage_steps,
    stage_teacher_rows,
    train_stage,
    training_data,
    truncated_snr_weight,
    weighted_x_loss,
)

T_LOW = 1e-3  # stage-1 times: the fraction [T_LOW, 1] of the schedule's range


class GuidanceRangeNet(nn.Module):
    """A w-conditioned student: ``net(x, t, cond, guidance)`` runs ``inner`` once with the scale as
    its input; a scale outside the range it was distilled for is refused."""

    def __init__(self, inner: nn.Module, w_min: float, w_max: float) -> None:
        super().__init__()
        self.inner = inner
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.arch = getattr(inner, "arch", "other")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float | None = None) -> torch.Tensor:
        w = 1.0 if guidance is None else float(guidance)
        check_range(w, self.w_min, self.w_max)
        return self.inner(x, t, cond, guidance=w)


def check_range(w: float, w_min: float, w_max: float) -> None:
    if not w_min - 1e-9 <= w <= w_max + 1e-9:
        raise ValueError(
            f"guidance_distillation's student was distilled for guidance in [{w_min:g}, {w_max:g}]; it cannot run at "
            f"{w:g} (set the knobs w_min/w_max to a range that holds it)"
        )


def w_student(bundle: ModelBundle, seed: int = 0) -> ExtraInputs:
    """A fresh w-conditioned student: a copy of the teacher's network with w as a zero-initialised input."""
    return ExtraInputs(new_student(bundle, seed), ("w",))


def load_w_student(art: Artifact, bundle: ModelBundle) -> tuple[ExtraInputs, dict[str, Any]]:
    """The w-conditioned student of artifact ``art`` (either stage) on the teacher's device, and its info."""
    import json

    fix = f"rebuild the artifact: delete {art.path} and run again"
    net = w_student(bundle)
    load_weights(net, art.path / "student.safetensors", fix)
    try:
        info = json.loads((art.path / "student.json").read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{art.path / 'student.json'} is missing or corrupt ({e}); {fix}") from e
    return net.eval().requires_grad_(False).to(device_of(bundle.denoiser.net)), info


def cfg_prediction(den: Denoiser, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The teacher's classifier-free-guided prediction u + w (c - u) with a scale per row: one
    forward of the doubled (cond, null) batch, as :class:`bench.denoiser.Denoiser` guides."""
    if den.null_class is None:
        raise ValueError("guidance distillation needs a teacher with classifier-free guidance (a null condition)")
    null = torch.full_like(cond, den.null_class)
    out = den.net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, null]))
    c, u = out.chunk(2)
    wb = w.to(out.dtype).reshape(-1, *([1] * (z.ndim - 1)))
    return u + wb * (c - u)


def guidance_loss(
    den: Denoiser,
    t_start: float,
    data: Data,
    w_range: tuple[float, float],
    batch_size: int,
) -> Callable[[nn.Module, torch.Generator], torch.Tensor]:
    """Stage 1 (Eq. 6): the w-student's x_hat against the teacher's guided x_hat at a w ~ U[w_min, w_max]
    per row, on training data noised to a uniform time, truncated-SNR weighted."""
    lo, hi = w_range
    t_data = den.t_data

    def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
        x0, cond = data(batch_size, g)
        if cond is None:
            raise ValueError("guidance distillation needs class-conditional training data")
        dev = x0.device
        w = (lo + (hi - lo) * torch.rand(batch_size, generator=g, dtype=torch.float64)).to(dev)
        u = T_LOW + (1 - T_LOW) * torch.rand(batch_size, generator=g, dtype=torch.float64)
        t = (t_data + (t_start - t_data) * u).to(dev)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(dev)
        a, s = den.alpha_sigma(t, x0)
        z = a * x0 + s * eps
        with torch.no_grad():
            x_target = den.x0_eps(z, t, cfg_prediction(den, z, t, cond, w))[0]
        x_hat = den.x0_eps(z, t, net(z, t, cond, guidance=w))[0]
        return weighted_x_loss(x_hat, x_target, truncated_snr_weight(den, t, x0))

    return loss


W_STUDENT_KNOBS = ["w_min", "w_max", "guide_steps", "guide_lr", "batch_size", "ema", "seed"]


@register_method
class GuidanceDistillation(MethodAdapter):
    name = "guidance_distillation"
    family = "distillation"
    training = "finetune"
    paper = "Meng et al. 2023, On Distillation of Guided Diffusion Models, arXiv 2210.03142"
    description = (
        "w-conditioned student reproduces the classifier-free-guided output in one pass (stage 1), then progressive "
        "distillation of it (stage 2); one artifact chain serves every w in [w_min, w_max]"
    )
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"), conditioning=("class", "text"), guidance=("cfg",))
    steps_supported = POWERS[:7]  # up to the default start_steps, 64 (the stage-1 student); an instance: its own
    knobs = (
        Knob("w_min", float, 1.0, "smallest guidance scale the student serves (u + w (c - u))", low=0.0, high=100.0,
             trains=True),
        Knob("w_max", float, 4.0, "largest guidance scale the student serves", low=0.0, high=100.0, trains=True),
        Knob("guide_steps", int, 300, "optimiser steps of stage 1 (the w-conditioned student)", low=1, high=10_000_000,
             trains=True),
        Knob("guide_lr", float, 1e-3, "AdamW learning rate of stage 1 (its w embedding starts at zero)", low=1e-7,
             high=1.0, trains=True),
        *BUDGET_KNOBS,
    )  # fmt: skip

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        if self.config["w_min"] > self.config["w_max"]:
            raise ValueError(f"w_min ({self.config['w_min']:g}) is above w_max ({self.config['w_max']:g})")
        self.steps_supported = tuple(n for n in POWERS if n <= self.config["start_steps"])

    @property
    def w_range(self) -> tuple[float, float]:
        return float(self.config["w_min"]), float(self.config["w_max"])

    # --- artifacts -----------------------------------------------------------------------------

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        c = self.config
        if guidance is not None:
            check_range(float(guidance), *self.w_range)
        rows = c["guide_steps"] * c["batch_size"] * 2  # the teacher's guided evaluation: cond + uncond rows
        budget = {"optimizer_steps": c["guide_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
        spec = artifact_spec(self, bundle, "w-student", None, (), budget, knobs=W_STUDENT_KNOBS)
        if steps == c["start_steps"]:
            return [spec]
        for n in stage_steps(c["start_steps"], steps):
            budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"],
                      "teacher_rows": stage_teacher_rows(c, 1)}  # fmt: skip
            spec = artifact_spec(self, bundle, f"student-{n}", {"steps": n}, (spec,), budget)
        return [spec]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        den = bundle.denoiser
        t_start = bundle.t_start
        info = {"prediction": den.prediction, "t_start": t_start, "w_min": c["w_min"], "w_max": c["w_max"]}
        if spec.name == "w-student":
            loss = guidance_loss(den, t_start, training_data(bundle), self.w_range, c["batch_size"])
            stage1 = {**c, "train_steps": c["guide_steps"], "lr": c["guide_lr"]}
            model = train_stage(ctx, w_student(bundle, c["seed"]), loss, stage1, c["seed"])
            save_student(ctx.out, model, info | {"steps": c["start_steps"]})
            return
        n = int(spec.params["steps"])
        parent = "w-student" if 2 * n == c["start_steps"] else f"student-{2 * n}"
        prev, _ = load_w_student(ctx.parent(parent), bundle)
        student = w_student(bundle)
        student.load_state_dict(prev.state_dict())
        student.train().requires_grad_(True)
        ctx.count_as_teacher(prev)

        def teacher(z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, w: torch.Tensor | None) -> torch.Tensor:
            return prev(z, t, cond, guidance=w)

        def run_student(
            net: nn.Module, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, w: torch.Tensor | None
        ) -> torch.Tensor:
            return net(z, t, cond, guidance=w)

        loss = pd_stage_loss(den, n, t_start, training_data(bundle), teacher, run_student, c["batch_size"], self.w_range)
        model = train_stage(ctx, student, loss, c, c["seed"] + n)
        save_student(ctx.out, model, info | {"steps": n})

    # --- the job --------------------------------------------------------------------------------

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        name = "w-student" if steps == self.config["start_steps"] else f"student-{steps}"
        net, info = load_w_student(find_artifact(artifacts, self.name, name), bundle)
        lo, hi = float(info["w_min"]), float(info["w_max"])
        den = Denoiser(GuidanceRangeNet(net, lo, hi), info["prediction"], bundle.denoiser.schedule, None, guidance_embedded=True)
        times = student_times(den, steps, float(info["t_start"]))

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators, gamma=0.0)

        return Prepared(sampler, den, info={"guidance_range": [lo, hi], "stage_steps": steps})
