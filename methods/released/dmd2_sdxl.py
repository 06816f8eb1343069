"""DMD2 (Yin et al. 2024, Improved Distribution Matching Distillation, arXiv 2405.14867): the released
SDXL generator (4-step or 1-step UNet, or the 4-step LoRA) in the SDXL teacher, sampled as the
authors' README says: LCMScheduler with their timesteps [999, 749, 499, 249] (4 steps) or [399]
(1 step), guidance_scale 0."""

from __future__ import annotations

from typing import Any

from bench.adapter import Knob, register_method
from methods.released.base import ReleasedStudent, ReleasedWeightsError, common_knobs

TIMESTEPS = {4: [999, 749, 499, 249], 1: [399]}


@register_method
class DMD2SDXL(ReleasedStudent):
    name = "dmd2_sdxl"
    family = "distillation"
    paper = "Yin et al. 2024, Improved Distribution Matching Distillation for Fast Image Synthesis, arXiv 2405.14867"
    description = "released DMD2 SDXL generator (UNet or LoRA) with LCMScheduler at the authors' timesteps, no CFG (1 or 4 steps)"
    steps_supported = (1, 4)
    knobs = (
        *common_knobs("tianweiy/DMD2", "the DMD2 repo (or a weights file)"),
        Knob("form", str, "unet", "which release: the full UNet (1 or 4 steps) or the 4-step LoRA", choices=("unet", "lora")),
        Knob("lora_scale", float, 1.0, "scale a LoRA is fused at (README: 1.0)", low=0.0, high=2.0),
    )
    quotes = {}  # no training cost stated in the README or the paper's SDXL section that we could cite: "not published"

    @property
    def student_kind(self) -> str:  # type: ignore[override]
        return self.config["form"]

    def weight_file(self, steps: int) -> str:
        if self.config["form"] == "lora":
            if steps != 4:
                raise ReleasedWeightsError("DMD2's SDXL LoRA is the 4-step one: run it at 4 steps, or use form: unet")
            return "dmd2_sdxl_4step_lora_fp16.safetensors"
        return f"dmd2_sdxl_{steps}step_unet_fp16.bin"

    def timesteps(self, steps: int) -> list[int] | None:
        return TIMESTEPS[steps]

    def scheduler(self, base_config: dict[str, Any]) -> Any:
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(base_config)
