"""LCM (Luo et al. 2023, arXiv 2310.04378): a released latent-consistency UNet, guidance-distilled
(the scale w is its input, ``time_cond_proj_dim``), sampled by LCMScheduler's multistep consistency
sampling: timesteps on the skipping-step grid t_k = k * (T / original_inference_steps) - 1, each step
the consistency function f = c_skip x + c_out x0_hat, then fresh noise to the next timestep.
The model card's call: LatentConsistencyModelPipeline, 4 steps, guidance_scale 8.0."""

from __future__ import annotations

from typing import Any

from bench.adapter import Knob, register_method
from methods.released.base import QuotedCost, ReleasedStudent, common_knobs


@register_method
class LCMUNet(ReleasedStudent):
    name = "lcm_unet"
    family = "consistency"
    paper = "Luo et al. 2023, Latent Consistency Models, arXiv 2310.04378"
    description = "a released LCM UNet (guidance scale as input) with LCMScheduler's multistep consistency sampling"
    student_kind = "unet"
    knobs = (
        *common_knobs("SimianLuo/LCM_Dreamshaper_v7", "the LCM UNet (a diffusers model, in `subfolder`)"),
        Knob("subfolder", str, "unet", "the UNet's folder in the student repo ('' = its root, as latent-consistency/lcm-sdxl)"),
        Knob("guidance_scale", float, 8.0, "w, the LCM's guidance input (model card: 8.0)", low=1.0, high=30.0),
        Knob("original_inference_steps", int, 50, "N of LCM's skipping-step grid (T/N apart)", low=1, high=1000),
    )
    quotes = {
        "SimianLuo/LCM_Dreamshaper_v7": QuotedCost(
            32.0,
            "Luo et al. 2023, arXiv 2310.04378, abstract and project page latent-consistency-models.github.io: "
            "about 32 A100 GPU-hours (4,000 iterations) for the 2-4-step 768x768 LCM distilled from Dreamshaper-v7",
        )
    }

    def scheduler(self, base_config: dict[str, Any]) -> Any:
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(base_config, original_inference_steps=self.config["original_inference_steps"])
