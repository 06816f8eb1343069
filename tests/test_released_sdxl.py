"""Released SDXL students on a tiny random-weight SDXL teacher (added text/time conditioning): the
LoRA, UNet-file and pipeline forms give what StableDiffusionXLPipeline gives when run as each
model card says, so the student keeps the teacher's SDXL conditioning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_released import make_students, run_counted, start
from tiny_pipelines import PROMPTS, sdxl

from bench.models import build_model
from bench.registry import METHODS


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_students(sdxl_dir, tmp_path_factory) -> Path:
    from diffusers import StableDiffusionXLPipeline

    return make_students(tmp_path_factory.mktemp("sdxl-students"), sdxl_dir, StableDiffusionXLPipeline)


@pytest.fixture(scope="module")
def teacher(sdxl_dir):
    return build_model("diffusers", pipeline=str(sdxl_dir), prompts=PROMPTS, device="cpu")


def their(pipe, z, gens, prompts, **kw) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, latents=z.clone(), generator=gens, output_type="latent", height=16, width=16, **kw).images


def test_lcm_lora_on_sdxl(teacher, sdxl_dir, sdxl_students):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    prep = METHODS.get("lcm_lora")(student=str(sdxl_students / "lora")).prepare(teacher, 4)
    z, gens, theirs_g = start(teacher)
    ours, counter, seen = run_counted(prep, z, torch.tensor([0, 2]), gens)
    assert seen == [999, 759, 499, 259] and counter.rows == 2 * 4
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(sdxl_students / "lora")
    pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    ref = their(pipe, z, theirs_g, [PROMPTS[0], PROMPTS[2]], num_inference_steps=4, guidance_scale=1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_dmd2_unet_and_turbo_pipeline_on_sdxl(teacher, sdxl_dir, sdxl_students):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    prep = METHODS.get("dmd2_sdxl")(student=str(sdxl_students / "dmd2")).prepare(teacher, 4)
    z, gens, theirs_g = start(teacher)
    ours, _, seen = run_counted(prep, z, torch.tensor([1, 0]), gens)
    assert seen == [999, 749, 499, 249]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.unet.load_state_dict(torch.load(sdxl_students / "dmd2" / "dmd2_sdxl_4step_unet_fp16.bin", weights_only=True))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    ref = their(
        pipe, z, theirs_g, [PROMPTS[1], PROMPTS[0]], num_inference_steps=4, timesteps=[999, 749, 499, 249], guidance_scale=0.0
    )
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)

    prep = METHODS.get("sdxl_turbo")(student=str(sdxl_students / "turbo")).prepare(teacher, 1)
    z, gens, theirs_g = start(teacher, seed=1)
    ours, counter, seen = run_counted(prep, z, torch.tensor([2, 1]), gens)
    assert seen == pytest.approx([999.0]) and counter.rows == 2
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_students / "turbo")
    ref = their(pipe, z, theirs_g, [PROMPTS[2], PROMPTS[1]], num_inference_steps=1, guidance_scale=0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2])
def test_hyper_sd_loras_with_ddim_trailing_and_tcd(teacher, sdxl_dir, sdxl_students, tmp_path, steps):
    """Hyper-SD: the N-step LoRA with DDIM (trailing, eta 0), the 1-step LoRA with TCD (eta 1, drawing
    from the per-sample generators); each as the model card's StableDiffusionXLPipeline call."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, TCDScheduler

    name = "Hyper-SDXL-1step-lora.safetensors" if steps == 1 else f"Hyper-SDXL-{steps}steps-lora.safetensors"
    (tmp_path / "hyper").mkdir()
    shutil.copy(sdxl_students / "lora" / "pytorch_lora_weights.safetensors", tmp_path / "hyper" / name)
    prep = METHODS.get("hyper_sd")(student=str(tmp_path / "hyper")).prepare(teacher, steps)
    z, gens, theirs_g = start(teacher)
    ours, counter, seen = run_counted(prep, z, torch.tensor([0, 1]), gens)
    assert counter.rows == 2 * steps
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(tmp_path / "hyper", weight_name=name)
    pipe.fuse_lora()
    if steps == 1:
        pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
        kw = {"eta": 1.0}
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        kw = {}
        assert seen == [999, 499]
    ref = their(pipe, z, theirs_g, [PROMPTS[0], PROMPTS[1]], num_inference_steps=steps, guidance_scale=0.0, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
