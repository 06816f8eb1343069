"""SDXL in the real tier, on a tiny random-weight StableDiffusionXLPipeline: the added text/time
conditioning (pooled embedding, size and crop ids) as the pipeline builds it, bench's `euler`
reproducing the pipeline's Euler loop from the same latents, and the UNet cache running on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_pipelines import PROMPTS, run_applicable_caches, sdxl

from bench.models import build_model
from bench.models.pipelines import PipelineError, pipeline_capabilities, pipeline_kind
from bench.registry import METHODS
from bench.seeds import generators, noise


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def bundle(sdxl_dir):
    return build_model("diffusers", pipeline=str(sdxl_dir), prompts=PROMPTS, device="cpu")


def their_euler(sdxl_dir: Path, z: torch.Tensor, prompts: list[str], guidance: float, **kw) -> torch.Tensor:
    """StableDiffusionXLPipeline's own loop from latents ``z``, its Euler scheduler on bench's
    'trailing' grid (the hub's config says 'leading', which skips the noisiest step). On a
    trailing grid diffusers' Euler scales the start latents by sigma_max, not by
    sqrt(sigma_max^2 + 1) as on its leading grid (the VP noise of unit variance that bench starts
    from), so they are given rescaled to the same start."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    ab = pipe.scheduler.alphas_cumprod[-1].double()
    sigma_max = ((1 - ab) / ab).sqrt()
    start = z.double() * (sigma_max**2 + 1).sqrt() / sigma_max
    return pipe(
        prompts, latents=start.float(), num_inference_steps=4, guidance_scale=guidance, height=16, width=16,
        output_type="latent", **kw,
    ).images  # fmt: skip


def ours(b, classes: list[int], guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    gens = generators(0, range(len(classes)), "cpu")
    z = noise(gens, b.sample_shape, torch.float32, "cpu")
    return METHODS.get("euler")().prepare(b, 4)(z, torch.tensor(classes), guidance, gens), z


def test_sdxl_bundle_has_its_added_conditioning(bundle, sdxl_dir):
    net = bundle.denoiser.net
    assert bundle.kind == "eps" and bundle.sample_shape == (4, 8, 8) and bundle.capabilities.arch == "unet"
    assert net.table.shape == (4, 16, 32)  # 3 prompts + the negative one; both encoders' states side by side
    assert net.pooled.shape == (4, 16) and net.time_ids.tolist() == [[16.0, 16, 0, 0, 16, 16]] * 4
    assert not net.table[3].any() and not net.pooled[3].any()  # SDXL's empty negative prompt: zero embeddings
    assert pipeline_kind(str(sdxl_dir)) == "eps"
    assert pipeline_capabilities(str(sdxl_dir)) == bundle.capabilities


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_bench_euler_reproduces_the_sdxl_loop(bundle, sdxl_dir, guidance):
    x, z = ours(bundle, [1, 2], guidance)
    theirs = their_euler(sdxl_dir, z, [PROMPTS[1], PROMPTS[2]], guidance)
    torch.testing.assert_close(x, theirs, rtol=1e-4, atol=1e-5)


def test_size_and_crop_conditioning_and_a_negative_prompt(sdxl_dir, bundle):
    """original size, crop corner and target size reach the UNet as the pipeline passes them, and
    a non-empty negative prompt is encoded (not zeroed): bench equals the pipeline, and differs
    from the default conditioning."""
    kw = {"original_size": [32, 24], "crops_coords_top_left": [4, 2], "target_size": [16, 16]}
    b = build_model("diffusers", pipeline=str(sdxl_dir), prompts=PROMPTS, device="cpu", negative_prompt="a photo", **kw)
    assert b.denoiser.net.time_ids[0].tolist() == [32.0, 24, 4, 2, 16, 16] and b.denoiser.net.pooled[3].any()
    x, z = ours(b, [0, 2], 3.0)
    theirs = their_euler(
        sdxl_dir, z, [PROMPTS[0], PROMPTS[2]], 3.0, negative_prompt="a photo", **{k: tuple(v) for k, v in kw.items()}
    )
    torch.testing.assert_close(x, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x, ours(bundle, [0, 2], 3.0)[0], atol=1e-4)
    assert b.identity != bundle.identity


def test_caches_run_on_sdxl(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    out = run_applicable_caches(bundle, 4, 3.0, [0, 1])
    assert set(out) == {"deepcache"} and out["deepcache"]["fraction"] < 1


def test_sdxl_only_options_are_refused_elsewhere(sdxl_dir):
    with pytest.raises(PipelineError, match="shift applies to flow-matching pipelines"):
        build_model("diffusers", pipeline=str(sdxl_dir), prompts=PROMPTS, device="cpu", shift=3.0)
