"""PixArt-alpha/sigma and SANA in the real tier, on tiny random-weight pipelines of the real classes:
T5 / Gemma2 token embeddings with their attention masks, PixArt's learned variance dropped as its
pipeline drops it, SANA's flow sigmas with flow_shift; bench's `dpmpp_2m` reproduces each pipeline's
DPM-Solver++ loop from the same latents, and every transformer cache runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pipelines_dit import TEACACHE_REFUSES
from tiny_pipelines import PROMPTS, pixart, run_applicable_caches, sana

from bench.models import build_model
from bench.models.pipelines import ShiftedFlowSchedule, pipeline_capabilities, pipeline_kind
from bench.registry import METHODS
from bench.seeds import generators, noise


@pytest.fixture(scope="module")
def pixart_dirs(tmp_path_factory) -> dict[str, Path]:
    return {v: pixart(tmp_path_factory.mktemp(f"tiny-pixart-{v}"), sigma=v == "sigma") for v in ("alpha", "sigma")}


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory) -> Path:
    return sana(tmp_path_factory.mktemp("tiny-sana"))


def dpmpp_2m(b, classes: list[int], guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    gens = generators(0, range(len(classes)), "cpu")
    z = noise(gens, b.sample_shape, torch.float32, "cpu")
    return METHODS.get("dpmpp_2m")().prepare(b, 4)(z, torch.tensor(classes), guidance, gens), z


@pytest.mark.parametrize("variant", ["alpha", "sigma"])
def test_bench_dpmpp_2m_reproduces_the_pixart_loop(pixart_dirs, variant):
    """PixArt's DPM-Solver++(2M) on bench's trailing grid (its hub config spaces 'linspace'),
    resolution binning off (bench samples at the size it is given)."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    d = pixart_dirs[variant]
    b = build_model("diffusers", pipeline=str(d), prompts=PROMPTS, device="cpu")
    net = b.denoiser.net
    assert b.kind == "eps" and b.sample_shape == (4, 8, 8) and net.learned_sigma and net.family == "pixart"
    assert net.table.shape == (4, 120 if variant == "alpha" else 300, 16) and net.mask.shape == net.table.shape[:2]
    assert pipeline_capabilities(str(d)) == b.capabilities and b.capabilities.arch == "dit"
    ours, z = dpmpp_2m(b, [1, 2], 4.5)
    pipe = DiffusionPipeline.from_pretrained(d)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        [PROMPTS[1], PROMPTS[2]], latents=z.clone(), num_inference_steps=4, guidance_scale=4.5, height=16, width=16,
        output_type="latent", use_resolution_binning=False,
    ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_caches_run_on_pixart(pixart_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    b = build_model("diffusers", pipeline=str(pixart_dirs["sigma"]), prompts=PROMPTS, device="cpu")
    out = run_applicable_caches(b, 4, 4.5, [0, 1], refused=TEACACHE_REFUSES)
    assert "first_block_cache" in out and len(out) >= 10, sorted(out)


@pytest.fixture(scope="module")
def sana_bundle(sana_dir):
    return build_model("diffusers", pipeline=str(sana_dir), prompts=PROMPTS, device="cpu")


def test_bench_dpmpp_2m_reproduces_the_sana_loop(sana_bundle, sana_dir):
    """SANA's DPM-Solver++ on flow sigmas (flow_shift 3) from the same latents, its default grid
    and its Gemma2 prompt encoding (with the pipeline's default complex human instruction). diffusers
    casts those flow timesteps to integers for the network (1000 s truncated) while stepping with
    the exact sigmas; bench calls the network at the exact 1000 s. Against the pipeline with exact
    timesteps bench agrees to float precision; against the stock pipeline the truncation shows."""
    from diffusers import SanaPipeline

    b = sana_bundle
    assert b.kind == "flow" and isinstance(b.denoiser.schedule, ShiftedFlowSchedule) and b.denoiser.schedule.shift == 3.0
    assert b.sample_shape == (4, 16, 16) and b.extra["decode"](torch.zeros(1, 4, 16, 16)).shape == (1, 3, 32, 32)
    assert pipeline_kind(str(sana_dir)) == "flow" and pipeline_capabilities(str(sana_dir)) == b.capabilities
    ours, z = dpmpp_2m(b, [0, 2], 4.5)
    pipe = SanaPipeline.from_pretrained(sana_dir)
    pipe.set_progress_bar_config(disable=True)

    def run() -> torch.Tensor:
        return pipe(
            [PROMPTS[0], PROMPTS[2]], latents=z.clone(), num_inference_steps=4, guidance_scale=4.5, height=32,
            width=32, output_type="latent", use_resolution_binning=False,
        ).images  # fmt: skip

    stock = run()
    set_timesteps = pipe.scheduler.set_timesteps

    def exact_timesteps(*a, **k) -> None:
        set_timesteps(*a, **k)
        pipe.scheduler.timesteps = pipe.scheduler.sigmas[:-1] * pipe.scheduler.config.num_train_timesteps

    pipe.scheduler.set_timesteps = exact_timesteps
    torch.testing.assert_close(ours, run(), rtol=1e-4, atol=1e-5)
    gap = float((ours - stock).abs().max() / stock.abs().max())
    assert 0 < gap < 0.05, gap


def test_caches_run_on_sana(sana_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    # ToCa caches token-wise sub-layers called on one (B, N, D) tensor; SANA's feed-forward is a
    # convolution over the (B, N, D) tokens reshaped to the image grid (GLUMBConv), and it says so
    refused = {**TEACACHE_REFUSES, "toca": "ToCa token-caches sub-layers called with one"}
    out = run_applicable_caches(sana_bundle, 4, 4.5, [0, 1], refused=refused)
    assert "first_block_cache" in out and "magcache" in out and len(out) >= 9, sorted(out)
