"""FLUX.1-schnell as a released student of a (tiny, random-weight) FLUX.1-dev teacher: a pipeline
whose transformer takes no guidance, run as FluxPipeline runs it (Euler on sigmas linspace(1, 1/N,
N), no guidance): the same latents as the pipeline, one pass per step on the student's network."""

from __future__ import annotations

import pytest
import torch
from test_pipelines import PROMPTS, flux_dir  # noqa: F401  (the tiny FLUX.1-dev teacher)
from test_released import run_counted, start

from bench.models import build_model
from bench.models.digits_nets import pack, unpack
from bench.registry import METHODS


@pytest.fixture(scope="module")
def schnell_dir(flux_dir, tmp_path_factory):  # noqa: F811
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(flux_dir)
    torch.manual_seed(7)
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
    d = tmp_path_factory.mktemp("tiny-schnell") / "pipe"
    pipe.save_pretrained(d)
    return d


@pytest.mark.parametrize("steps", [1, 4])
def test_flux_schnell_runs_fluxpipelines_euler_without_guidance(flux_dir, schnell_dir, steps):  # noqa: F811
    from diffusers import FluxPipeline

    teacher = build_model("diffusers", pipeline=str(flux_dir), prompts=PROMPTS, device="cpu", height=16)
    prep = METHODS.get("flux_schnell")(student=str(schnell_dir)).prepare(teacher, steps)
    assert not prep.denoiser.guidance_embedded and prep.denoiser.rows_per_sample(3.5, True) == 1
    z, gens, _ = start(teacher)
    ours, counter, seen = run_counted(prep, z, torch.tensor([0, 2]), gens)
    assert seen == pytest.approx([1000.0 * (1 - i / steps) for i in range(steps)]) and counter.rows == 2 * steps
    pipe = FluxPipeline.from_pretrained(schnell_dir)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([PROMPTS[0], PROMPTS[2]], latents=pack(z.clone()), num_inference_steps=steps, guidance_scale=0.0,
                  height=16, width=16, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, unpack(theirs, *teacher.sample_shape), rtol=1e-4, atol=1e-5)
