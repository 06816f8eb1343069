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


def tiny_flux_model():
    """A random-weight diffusers FluxTransformer2DModel of 2 double and 2 single blocks (8 channels, 16 tokens)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).eval()


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
