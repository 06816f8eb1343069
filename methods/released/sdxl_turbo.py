"""SDXL-Turbo (Sauer et al. 2023, Adversarial Diffusion Distillation, arXiv 2311.17042): the released
pipeline run as its model card says: its own scheduler (Euler ancestral, "trailing" spacing), 1-4
steps, guidance_scale 0.0 (no classifier-free guidance). The card's resolution is 512x512: give the
suite's model that size to run it as released."""

from __future__ import annotations

from typing import Any

from bench.adapter import register_method
from methods.released.base import ReleasedStudent, common_knobs, pipeline_scheduler


@register_method
class SDXLTurbo(ReleasedStudent):
    name = "sdxl_turbo"
    family = "distillation"
    paper = "Sauer et al. 2023, Adversarial Diffusion Distillation, arXiv 2311.17042"
    description = "the released SDXL-Turbo pipeline with its own scheduler (Euler ancestral, trailing), no CFG, 1-4 steps"
    student_kind = "pipeline"
    steps_supported = (1, 2, 3, 4)
    knobs = common_knobs("stabilityai/sdxl-turbo", "the SDXL-Turbo pipeline")
    quotes = {}  # the ADD paper states no training cost: "not published"

    def scheduler(self, base_config: dict[str, Any]) -> Any:
        return pipeline_scheduler(base_config)
