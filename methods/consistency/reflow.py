"""Reflow (Liu, Gong & Liu 2022, arXiv 2209.03003): rectified flow on the teacher's own couplings,
the 2-rectified flow, sampled with Euler at few steps.

Two artifacts, a chain:

1. ``pairs`` (knowledge distillation's artifact, shared with ``kd`` when the knobs agree: kd's
   defaults are 2048 pairs of DPM-Solver++(2M) at 25 steps; these are 1024 at 10 steps, the budget
   measured on digits-dit): couplings
   (z, x_0 = Phi_teacher(z)) of N noise draws by a registered deterministic solver
   (``teacher_solver`` at ``teacher_steps``) at the job's guidance, their teacher forwards on record.
2. ``rectified``: the teacher's network, copied, trained on those couplings with the rectified-flow
   objective (the paper's eq. 1, Algorithm 1 with the coupling (X_0, X_1) = (z, Phi(z))): for t uniform,
   x_t on the interpolation between the coupled pair and the regression target its velocity. On a
   flow teacher, x_t = (1 - t) x_0 + t z and the target is z - x_0: the straight line.

Sampling runs the student's ODE from the teacher's start time with N uniform steps of its own
parametrisation's first-order step (:func:`bench.flowmap.sample_flow_map` at gamma 0): the Euler step
on a flow model. When the couplings are learned exactly the paths are straight and one step is exact.

On an eps (or v, x0) teacher the same chain runs in the teacher's own parametrisation and schedule:
x_t = alpha_t x_0 + sigma_t z and the target is what the teacher predicts there (z for eps). This is
rectified flow in the teacher's ODE frame: x_t / alpha_t = x_0 + (sigma_t / alpha_t) z is a straight
line in the noise level sigma/alpha, along which the DDIM step (the Euler step of that frame, which is
what the sampler takes) is exact when eps is constant, i.e. when the coupling is learned. Its one-step
sampling reads x_0 = (x - sigma eps) / alpha at alpha ~ 0.006 on the digits schedule, which amplifies
the student's eps error ~157 times: few-step sampling is where it is useful (InstaFlow's distilled
student, ``instaflow``, predicts x_0 instead).

Departures: the 2-rectified flow is initialised from the teacher and fine-tuned (as InstaFlow does),
rather than trained from scratch; t is uniform over the teacher's native times.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from bench.flowmap import sample_flow_map, student_times
from bench.registry import METHODS
from bench.students import (
    load_pairs,
    load_student,
    new_student,
    prediction_target,
    save_student,
    student_denoiser,
)
from bench.training import TrainConfig, fit

PAIR_KNOBS = ("teacher_solver", "teacher_steps", "pairs")


def coupling_batch(den: Denoiser, z: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)``: the point at native time t on the interpolation of each coupled pair
    (z, x_0) in the teacher's schedule, x_t = alpha_t x_0 + sigma_t z, and the prediction of the
    teacher's parametrisation there (z - x_0 for a flow velocity: the straight line's)."""
    a, s = den.alpha_sigma(t, x0)
    return a * x0 + s * z, prediction_target(den.prediction, x0, z, a, s)


def reflow_times(bundle: ModelBundle, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` native times uniform over [0, t_start] (float64)."""
    return bundle.t_start * torch.rand(n, generator=g, dtype=torch.float64)


def check_guidance(bundle: ModelBundle, guidance: float | None, name: str) -> float:
    if bundle.num_classes is None:
        return 1.0
    if guidance is None:
        raise ValueError(f"{name} rectifies the teacher's ODE at one guidance scale: give the job's guidance")
    return float(guidance)


@register_method
class Reflow(MethodAdapter):
    name = "reflow"
    family = "consistency"
    training = "finetune"
    paper = (
        "Liu, Gong & Liu 2022, Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow, "
        "arXiv 2209.03003"
    )
    description = (
        "2-rectified flow: the teacher fine-tuned on the straight interpolation between its own ODE couplings "
        "(noise, endpoint); Euler sampling at few steps"
    )
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    knobs = (
        Knob("teacher_solver", str, "dpmpp_2m", "registered deterministic solver that makes the couplings", trains=True),
        Knob("teacher_steps", int, 10, "steps of the teacher solver per coupling", low=1, high=1000, trains=True),
        Knob("pairs", int, 1024, "couplings (noise, teacher endpoint) drawn from the teacher", low=1, high=10_000_000,
             trains=True),
        Knob("train_steps", int, 300, "optimiser steps of the 2-rectified flow", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 64, "couplings per optimiser step", low=1, high=65536, trains=True),
        Knob("lr", float, 2e-4, "AdamW learning rate (warm-up, then cosine decay)", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, 0.995, "EMA decay of the weights (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (batches, times; an MLP student's initialisation)", low=0,
             trains=True),
    )  # fmt: skip

    # --- artifacts -----------------------------------------------------------------------------

    def couplings_spec(self, bundle: ModelBundle, guidance: float) -> ArtifactSpec:
        """Knowledge distillation's pairs artifact with this method's coupling knobs."""
        kd = METHODS.get("kd")(**{k: self.config[k] for k in PAIR_KNOBS})
        return kd.pairs_spec(bundle, guidance)

    def rectified_spec(self, bundle: ModelBundle, guidance: float) -> ArtifactSpec:
        c = self.config
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"]}
        return artifact_spec(self, bundle, "rectified", {"guidance": guidance}, (self.couplings_spec(bundle, guidance),),
                             budget)  # fmt: skip

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        return [self.rectified_spec(bundle, check_guidance(bundle, guidance, self.name))]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        pairs = load_pairs(ctx.parent("pairs"))
        z, x0 = pairs["noise"], pairs["x0"]
        labels = pairs["labels"] if bundle.num_classes else None
        w = float(spec.params["guidance"])
        student = new_student(bundle, c["seed"])
        den = student_denoiser(bundle, student, bundle.kind, w)
        steps = c["train_steps"]
        cfg = TrainConfig(steps, c["batch_size"], c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(z), (c["batch_size"],), generator=g)
            t = reflow_times(bundle, len(idx), g)
            xt, target = coupling_batch(den, z[idx], x0[idx], t)
            pred = net(xt, t, labels[idx] if labels is not None else None)
            return F.mse_loss(pred, target.to(pred.dtype))

        res = fit(student, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v))
        save_student(ctx.out, res.model, {"prediction": bundle.kind, "t_start": bundle.t_start, "guidance": w})
        ctx.note_training(res)

    # --- the job --------------------------------------------------------------------------------

    def load(self, art: Artifact, bundle: ModelBundle) -> tuple[Denoiser, dict]:
        """The 2-rectified flow of artifact ``art`` as the denoiser a job (or InstaFlow) runs."""
        net, info = load_student(art, bundle, self.config["seed"])
        return student_denoiser(bundle, net, info["prediction"], float(info["guidance"])), info

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next(
            (a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "rectified"),
            None,
        )
        if art is None:
            raise ValueError("reflow: its rectified artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        den, info = self.load(art, bundle)
        times = student_times(den, steps, float(info["t_start"]))

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators)

        return Prepared(sampler, den, info={"distilled_guidance": float(info["guidance"])})
