"""LCM-LoRA (Luo et al. 2023, arXiv 2311.05556): latent-consistency distillation as a LoRA, loaded
into the teacher and fused, sampled by LCMScheduler (multistep consistency sampling on the
skipping-step grid). The authors' call: 4 steps, guidance_scale 1.0 (no classifier-free guidance;
they allow 1.0-2.0, the `guidance_scale` knob)."""

from __future__ import annotations

from typing import Any

from bench.adapter import Knob, register_method
from methods.released.base import ReleasedStudent, common_knobs


@register_method
class LCMLoRA(ReleasedStudent):
    name = "lcm_lora"
    family = "consistency"
    paper = "Luo et al. 2023, LCM-LoRA: A Universal Stable-Diffusion Acceleration Module, arXiv 2311.05556"
    description = "the released LCM-LoRA fused into the teacher, LCMScheduler's multistep consistency sampling"
    student_kind = "lora"
    knobs = (
        *common_knobs("latent-consistency/lcm-lora-sdxl", "the LCM-LoRA (lcm-lora-sdv1-5 for SD 1.5 teachers)"),
        Knob("lora_scale", float, 1.0, "scale the LoRA is fused at (fuse_lora's lora_scale)", low=0.0, high=2.0),
        Knob(
            "guidance_scale", float, 1.0, "classifier-free guidance of the student (authors: 1.0, up to 2.0)", low=1.0, high=3.0
        ),
        Knob("original_inference_steps", int, 50, "N of LCM's skipping-step grid (T/N apart)", low=1, high=1000),
    )
    quotes = {}  # the LCM-LoRA report states no training cost: "not published"

    def weight_file(self, steps: int) -> str:
        return "pytorch_lora_weights.safetensors"

    def scheduler(self, base_config: dict[str, Any]) -> Any:
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(base_config, original_inference_steps=self.config["original_inference_steps"])
