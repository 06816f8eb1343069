"""SDXL-Lightning (Lin et al. 2024, Progressive Adversarial Diffusion Distillation, arXiv 2402.13929):
the released N-step UNet (or LoRA) swapped into the SDXL teacher, sampled as the model card says:
EulerDiscreteScheduler with "trailing" spacing, guidance_scale 0, the step count the checkpoint was
distilled for; the experimental 1-step UNet predicts x0 (prediction_type "sample")."""

from __future__ import annotations

from typing import Any

from bench.adapter import Knob, register_method
from methods.released.base import ReleasedStudent, ReleasedWeightsError, common_knobs


@register_method
class SDXLLightning(ReleasedStudent):
    name = "sdxl_lightning"
    family = "distillation"
    paper = "Lin et al. 2024, SDXL-Lightning: Progressive Adversarial Diffusion Distillation, arXiv 2402.13929"
    description = "released SDXL-Lightning N-step UNet/LoRA, Euler with trailing timesteps, no CFG (1, 2, 4, 8 steps)"
    steps_supported = (1, 2, 4, 8)
    knobs = (
        *common_knobs("ByteDance/SDXL-Lightning", "the SDXL-Lightning repo (or a weights file)"),
        Knob("form", str, "unet", "which release: the full UNet or the LoRA (2, 4, 8 steps)", choices=("unet", "lora")),
        Knob("lora_scale", float, 1.0, "scale a LoRA is fused at", low=0.0, high=2.0),
    )
    quotes = {}  # the paper states no training cost: "not published"

    @property
    def student_kind(self) -> str:  # type: ignore[override]
        return self.config["form"]

    def weight_file(self, steps: int) -> str:
        if self.config["form"] == "lora" and steps == 1:
            raise ReleasedWeightsError("SDXL-Lightning's 1-step model is released as a UNet only: use form: unet")
        return f"sdxl_lightning_{steps}step_{self.config['form']}.safetensors"

    def scheduler(self, base_config: dict[str, Any]) -> Any:
        from diffusers import EulerDiscreteScheduler

        extra = {"prediction_type": "sample"} if self._steps == 1 else {}
        return EulerDiscreteScheduler.from_config(base_config, timestep_spacing="trailing", **extra)

    def make(self, bundle, steps, artifacts):  # the 1-step model's prediction type depends on the steps
        self._steps = steps
        return super().make(bundle, steps, artifacts)
