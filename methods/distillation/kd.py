"""Knowledge distillation (Luhman & Luhman 2021, arXiv 2101.02388): a one-step student regressed
on (noise, teacher ODE endpoint) pairs.

Two artifacts, a chain:

1. ``pairs``: N draws of noise x_T (their own seeds, disjoint from any evaluation seed; classes
   cycling) mapped to the teacher's endpoint x_0 = Phi_teacher(x_T) by a registered deterministic
   solver (``teacher_solver`` at ``teacher_steps``) at the job's guidance scale w. Their teacher
   forwards are counted by the harness.
2. ``student``: the teacher's network, copied (an MLP for the analytic ``gmm``), trained to
   minimise E || x0_student(x_T, c) - Phi_teacher(x_T, c) ||^2 over the pairs (the paper's
   regression objective, mean squared error) with the shared training loop.

The student reads its output as x0 on an eps teacher (ill-conditioned at the noisiest level
otherwise; see :mod:`bench.students`) and in the teacher's own parametrisation otherwise; it is
evaluated once, at the teacher's start time, and runs at one guidance scale (the one distilled:
one network row per sample).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.flowmap import sample_flow_map
from bench.registry import METHODS
from bench.students import (
    load_pairs,
    load_student,
    new_student,
    save_student,
    student_denoiser,
    student_prediction,
    teacher_pairs,
)
from bench.training import TrainConfig, fit

PAIR_KNOBS = ["teacher_solver", "teacher_steps", "pairs"]


def kd_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """Luhman & Luhman's regression objective: the squared error to the teacher's endpoint, averaged."""
    return F.mse_loss(student_x0, teacher_x0)


@register_method
class KnowledgeDistillation(MethodAdapter):
    name = "kd"
    family = "distillation"
    training = "finetune"
    paper = "Luhman & Luhman 2021, Knowledge Distillation in Iterative Generative Models for Improved Sampling Speed, arXiv 2101.02388"
    description = "one-step student regressed on (noise, teacher ODE endpoint) pairs; initialised from the teacher"
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    steps_supported = (1,)
    knobs = (
        Knob(
            "teacher_solver", str, "dpmpp_2m", "registered deterministic solver that makes the teacher's endpoints", trains=True
        ),
        Knob("teacher_steps", int, 25, "steps of the teacher solver per pair", low=1, high=1000, trains=True),
        Knob("pairs", int, 2048, "(noise, endpoint) pairs drawn from the teacher", low=1, high=10_000_000, trains=True),
        Knob("train_steps", int, 1500, "optimiser steps of the student", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 64, "pairs per optimiser step", low=1, high=65536, trains=True),
        Knob("lr", float, 2e-4, "AdamW learning rate (warm-up, then cosine decay)", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, 0.995, "EMA decay of the student's weights (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the student's training (batches; an MLP student's initialisation)", low=0, trains=True),
    )

    # --- artifacts -----------------------------------------------------------------------------

    def _guidance(self, bundle: ModelBundle, guidance: float | None) -> float:
        if bundle.num_classes is None:
            return 1.0
        if guidance is None:
            raise ValueError("kd distils the teacher at one guidance scale: give the job's guidance")
        return float(guidance)

    def pairs_spec(self, bundle: ModelBundle, guidance: float) -> ArtifactSpec:
        c = self.config
        solver = METHODS.get(c["teacher_solver"])()
        if solver.family != "solver" or solver.training != "free":
            raise ValueError(f"kd: teacher_solver={c['teacher_solver']!r} is not a training-free solver")
        nfe = getattr(solver, "nfe_of", lambda n: n)(c["teacher_steps"])
        rows = c["pairs"] * nfe * (2 if guidance != 1.0 and bundle.num_classes else 1)
        return artifact_spec(
            self, bundle, "pairs", {"guidance": guidance}, tuple(solver.artifacts(bundle, c["teacher_steps"], guidance)),
            budget={"teacher_rows": rows}, knobs=PAIR_KNOBS,
        )  # fmt: skip

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = self._guidance(bundle, guidance)
        c = self.config
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"]}
        return [artifact_spec(self, bundle, "student", {"guidance": w}, (self.pairs_spec(bundle, w),), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        if spec.name == "pairs":
            parents = {a.key: a for a in ctx.parents.values()}
            teacher_pairs(ctx, c["teacher_solver"], c["teacher_steps"], c["pairs"], float(spec.params["guidance"]), parents)
            return
        bundle = ctx.bundle
        pairs = load_pairs(ctx.parent("pairs"))
        z, target = pairs["noise"], pairs["x0"]
        labels = pairs["labels"] if bundle.num_classes else None
        t0 = float(pairs["t_start"][0])
        student = new_student(bundle, c["seed"])
        den = student_denoiser(bundle, student, student_prediction(bundle.kind), float(spec.params["guidance"]))
        steps = c["train_steps"]
        cfg = TrainConfig(steps, c["batch_size"], c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))
        t = torch.full((c["batch_size"],), t0, dtype=torch.float64)

        def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(z), (c["batch_size"],), generator=g)
            x = z[idx]
            pred = net(x, t, labels[idx] if labels is not None else None)
            x0 = den.x0_eps(x, t0, pred)[0]
            return kd_loss(x0, target[idx])

        res = fit(student, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v))
        save_student(
            ctx.out, res.model, {"prediction": den.prediction, "t_start": t0, "guidance": float(spec.params["guidance"])}
        )
        ctx.note_training(res)

    # --- the job --------------------------------------------------------------------------------

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next(
            (a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "student"), None
        )
        if art is None:
            raise ValueError("kd: its student artifact was not given; prepare(bundle, 1, guidance=w) builds it")
        net, info = load_student(art, bundle, self.config["seed"])
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, info["prediction"], w)
        times = [float(info["t_start"]), den.t_data]

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators)

        return Prepared(sampler, den, info={"distilled_guidance": w})
