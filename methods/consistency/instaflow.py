"""InstaFlow (Liu, Zhang, Ma, Peng & Liu 2023, arXiv 2309.06380): a one-step student distilled from
the 2-rectified flow of the teacher (reflow, then distil).

Four artifacts, a chain (the first two are ``reflow``'s, shared with it when the knobs agree):

1. ``kd:pairs``: couplings (z, Phi_teacher(z)) from the teacher's ODE, its teacher NFE on record;
2. ``reflow:rectified``: the 2-rectified flow, the teacher fine-tuned on those couplings
   (:mod:`methods.consistency.reflow`);
3. ``instaflow:rf_pairs``: the 2-rectified flow's own couplings (z, Phi_2RF(z)) of the same noise
   draws, made by a registered solver (``rf_solver`` at ``rf_steps``; its paths are nearly straight,
   so Euler at few steps); the 2-rectified flow's forwards are counted as the stage's teacher rows;
4. ``instaflow:student``: the 2-rectified flow's network, copied, trained to map z to Phi_2RF(z) in one
   evaluation at the teacher's start time (the paper's distillation stage, Sec. 3.2: regress the
   one-step output on the 2-RF's ODE endpoint, initialised from the 2-RF).

The student reads its output in the teacher's parametrisation on a flow teacher (x_0 = z - v(z, 1)),
and as x_0 on an eps teacher (as :mod:`methods.distillation.kd` does; eps is ill-conditioned at the
noisiest level). Departures: the distillation loss is the mean squared error rather than LPIPS
(whose weights are not available offline); the 2-rectified flow is fine-tuned from the teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.flowmap import sample_flow_map
from bench.io import load_weights
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
from methods.consistency.reflow import check_guidance
from methods.distillation.kd import kd_loss

REFLOW_KNOBS = {  # instaflow knob -> the reflow knob it sets
    "teacher_solver": "teacher_solver",
    "teacher_steps": "teacher_steps",
    "pairs": "pairs",
    "reflow_steps": "train_steps",
    "reflow_lr": "lr",
    "batch_size": "batch_size",
    "ema": "ema",
    "seed": "seed",
}


class _StudentTeacher:
    """A build context whose bundle runs the 2-rectified flow instead of the teacher (for
    :func:`bench.students.teacher_pairs`); everything else is the real context's."""

    def __init__(self, ctx: BuildContext, bundle: ModelBundle) -> None:
        self._ctx = ctx
        self.bundle = bundle

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


@register_method
class InstaFlow(MethodAdapter):
    name = "instaflow"
    family = "consistency"
    training = "finetune"
    paper = (
        "Liu, Zhang, Ma, Peng & Liu 2023, InstaFlow: One Step is Enough for High-Quality Diffusion-Based "
        "Text-to-Image Generation, arXiv 2309.06380"
    )
    description = "one-step student distilled from the 2-rectified flow (reflow) of the teacher; initialised from it"
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    steps_supported = (1,)
    knobs = (
        Knob("teacher_solver", str, "dpmpp_2m", "registered deterministic solver that makes the teacher's couplings",
             trains=True),
        Knob("teacher_steps", int, 10, "steps of the teacher solver per coupling", low=1, high=1000, trains=True),
        Knob("pairs", int, 1024, "couplings drawn from the teacher (and from the 2-rectified flow)", low=1,
             high=10_000_000, trains=True),
        Knob("reflow_steps", int, 300, "optimiser steps of the 2-rectified flow", low=1, high=10_000_000, trains=True),
        Knob("reflow_lr", float, 2e-4, "AdamW learning rate of the 2-rectified flow", low=1e-7, high=1.0, trains=True),
        Knob("rf_solver", str, "euler", "registered deterministic solver that runs the 2-rectified flow's ODE",
             trains=True),
        Knob("rf_steps", int, 4, "steps of rf_solver per distillation pair", low=1, high=1000, trains=True),
        Knob("train_steps", int, 300, "optimiser steps of the one-step student", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 64, "pairs per optimiser step (both stages)", low=1, high=65536, trains=True),
        Knob("lr", float, 2e-4, "AdamW learning rate of the one-step student", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, 0.995, "EMA decay of the weights (both stages; 0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (both stages)", low=0, trains=True),
    )  # fmt: skip

    # --- artifacts -----------------------------------------------------------------------------

    def reflow(self) -> MethodAdapter:
        """The ``reflow`` method whose 2-rectified flow this student distils."""
        return METHODS.get("reflow")(**{r: self.config[k] for k, r in REFLOW_KNOBS.items()})

    def rf_pairs_spec(self, bundle: ModelBundle, guidance: float) -> ArtifactSpec:
        c = self.config
        rf = self.reflow()
        solver = METHODS.get(c["rf_solver"])()
        if solver.family != "solver" or solver.training != "free":
            raise ValueError(f"instaflow: rf_solver={c['rf_solver']!r} is not a training-free solver")
        rows = c["pairs"] * getattr(solver, "nfe_of", lambda n: n)(c["rf_steps"])
        parents = (rf.rectified_spec(bundle, guidance), *solver.artifacts(bundle, c["rf_steps"], guidance))
        return artifact_spec(self, bundle, "rf_pairs", {"guidance": guidance}, parents, budget={"teacher_rows": rows},
                             knobs=["rf_solver", "rf_steps"])  # fmt: skip

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = check_guidance(bundle, guidance, self.name)
        c = self.config
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"]}
        # one parent: a second one (the 2-RF itself) would make a diamond whose shared ancestor the
        # record's chain cost counts twice
        return [artifact_spec(self, bundle, "student", {"guidance": w}, (self.rf_pairs_spec(bundle, w),), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        if spec.name == "rf_pairs":
            self._build_rf_pairs(spec, ctx)
        else:
            self._build_student(spec, ctx)

    def _build_rf_pairs(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        w = float(spec.params["guidance"])
        den, _ = self.reflow().load(ctx.parent("rectified"), ctx.bundle)
        ctx.count_as_teacher(den.net)  # the 2-rectified flow is this stage's teacher
        view = dataclasses.replace(ctx.bundle, denoiser=den)
        others = {a.key: a for n, a in ctx.parents.items() if n != "rectified"}
        teacher_pairs(_StudentTeacher(ctx, view), c["rf_solver"], c["rf_steps"], c["pairs"], w, others)  # type: ignore[arg-type]

    def _build_student(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        rf_pairs = ctx.parent("rf_pairs")
        pairs = load_pairs(rf_pairs)
        z, target = pairs["noise"], pairs["x0"]
        labels = pairs["labels"] if bundle.num_classes else None
        t0 = float(pairs["t_start"][0])
        w = float(spec.params["guidance"])
        student = new_student(bundle, c["seed"])
        rectified = rf_pairs.path.parent / rf_pairs.record["parents"]["rectified"]  # the 2-RF, in the same store
        load_weights(student, rectified / "student.safetensors", f"rebuild the artifact {rectified}")  # from the 2-RF
        den = student_denoiser(bundle, student, student_prediction(bundle.kind), w)
        steps = c["train_steps"]
        cfg = TrainConfig(steps, c["batch_size"], c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))
        t = torch.full((c["batch_size"],), t0, dtype=torch.float64)

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(z), (c["batch_size"],), generator=g)
            x = z[idx]
            pred = net(x, t, labels[idx] if labels is not None else None)
            return kd_loss(den.x0_eps(x, t0, pred)[0], target[idx])

        res = fit(student, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v))
        save_student(ctx.out, res.model, {"prediction": den.prediction, "t_start": t0, "guidance": w})
        ctx.note_training(res)

    # --- the job --------------------------------------------------------------------------------

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next(
            (a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "student"), None
        )
        if art is None:
            raise ValueError("instaflow: its student artifact was not given; prepare(bundle, 1, guidance=w) builds it")
        net, info = load_student(art, bundle, self.config["seed"])
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, info["prediction"], w)
        times = [float(info["t_start"]), den.t_data]

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators)

        return Prepared(sampler, den, info={"distilled_guidance": w})
