"""FLUX.1-schnell (Black Forest Labs 2024; distilled with latent adversarial diffusion distillation,
Sauer et al. 2024, arXiv 2403.12015): the released pipeline run as FluxPipeline runs it: its own
FlowMatchEulerDiscreteScheduler on sigmas linspace(1, 1/N, N) (then 0), 1-4 steps, no guidance
(schnell is neither guidance-embedded nor run with classifier-free guidance)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.adapter import register_method
from bench.bundle import Applies
from methods.released.base import ReleasedStudent, common_knobs, pipeline_scheduler


@register_method
class FluxSchnell(ReleasedStudent):
    name = "flux_schnell"
    family = "distillation"
    paper = (
        "Sauer et al. 2024, Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation, arXiv 2403.12015"
    )
    description = "the released FLUX.1-schnell pipeline: flow-matching Euler on FluxPipeline's sigmas, no guidance, 1-4 steps"
    student_kind = "pipeline"
    # its teacher is FLUX.1-dev (guidance-distilled: the scale is an input), not any flow transformer
    applies_to = Applies(arch=("dit",), conditioning=("text",), schedule=("flow",), guidance=("embedded",))
    steps_supported = (1, 2, 3, 4)
    knobs = common_knobs("black-forest-labs/FLUX.1-schnell", "the FLUX.1-schnell pipeline")
    quotes = {}  # Black Forest Labs publish no training cost: "not published"

    def scheduler(self, base_config: dict[str, Any]) -> Any:
        return pipeline_scheduler(base_config)

    def set_steps(self, sched: Any, steps: int, device: Any) -> None:
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        if sched.config.get("use_dynamic_shifting"):
            raise ValueError("flux_schnell: the student's scheduler uses dynamic shifting, which FLUX.1-schnell's does not")
        sched.set_timesteps(sigmas=sigmas, device=device)
