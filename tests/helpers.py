"""Small builders shared by tests: random-weight digits bundles and tiny suites."""

from __future__ import annotations

import torch

from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.models import ModelBundle
from bench.models.digits_nets import NULL_CLASS, DigitsDiT, DigitsUNet
from bench.suite import Job, ModelSpec, Suite


def random_bundle(kind: str = "eps", seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    if kind == "eps":
        net, sch = DigitsUNet().eval(), VPSchedule.linear()
    else:
        net, sch = DigitsDiT().eval(), FlowSchedule()
    return ModelBundle(f"random-{kind}", Denoiser(net, kind, sch, NULL_CLASS), (1, 16, 16), "image", 10, weights_hash="random")


def tiny_suite(metrics=(), warmup: int = 0, **kw) -> Suite:
    return Suite(
        name="t",
        source="test",
        models=[],
        methods=[],
        steps=[],
        guidance=[],
        metrics=list(metrics),
        warmup=warmup,
        bootstrap=5,
        **kw,
    )


def job(method: str, steps: int, guidance: float, n: int, bs: int, model: str = "x", knobs=()) -> Job:
    return Job(ModelSpec(model), method, tuple(knobs), steps, guidance, 0, n, bs)
