"""Hyper-SD (Ren et al. 2024, Trajectory Segmented Consistency Model, arXiv 2404.13686): the released
SDXL LoRAs fused into the teacher, sampled as the model card says: the N-step LoRA (2, 4, 8) with
DDIMScheduler and "trailing" spacing, the unified 1-step LoRA with TCDScheduler (eta 1.0), guidance 0."""

from __future__ import annotations

from typing import Any

from bench.adapter import Knob, register_method
from methods.released.base import ReleasedStudent, common_knobs


@register_method
class HyperSD(ReleasedStudent):
    name = "hyper_sd"
    family = "consistency"
    paper = "Ren et al. 2024, Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis, arXiv 2404.13686"
    description = "released Hyper-SDXL LoRAs: N-step LoRA with DDIM trailing (2, 4, 8), 1-step LoRA with TCD; no CFG"
    student_kind = "lora"
    steps_supported = (1, 2, 4, 8)
    knobs = (
        *common_knobs("ByteDance/Hyper-SD", "the Hyper-SD repo (or a LoRA file)"),
        Knob("lora_scale", float, 1.0, "scale the LoRA is fused at (the card's fuse_lora())", low=0.0, high=2.0),
        Knob("eta", float, 1.0, "TCD's gamma/eta of the 1-step LoRA (card: 1.0; lower: more detail)", low=0.0, high=1.0),
    )
    quotes = {}  # the paper states no training cost: "not published"

    def weight_file(self, steps: int) -> str:
        return "Hyper-SDXL-1step-lora.safetensors" if steps == 1 else f"Hyper-SDXL-{steps}steps-lora.safetensors"

    def scheduler(self, base_config: dict[str, Any]) -> Any:
        from diffusers import DDIMScheduler, TCDScheduler

        if self._steps == 1:
            return TCDScheduler.from_config(base_config)
        return DDIMScheduler.from_config(base_config, timestep_spacing="trailing")

    def step_kwargs(self) -> dict[str, Any]:
        return {"eta": self.config["eta"]} if self._steps == 1 else {"eta": 0.0}

    def make(self, bundle, steps, artifacts):  # the scheduler depends on the steps
        self._steps = steps
        return super().make(bundle, steps, artifacts)
