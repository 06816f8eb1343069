"""Class-conditional DiT (DiTPipeline) in the real tier, on a tiny random-weight DiT: ImageNet labels as
the condition with the null class 1000 for classifier-free guidance, the learned variance dropped as the
pipeline drops it, bench's `ddim` reproducing the pipeline's DDIM loop, and every transformer cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_pipelines import dit, run_applicable_caches

from bench.models import build_model
from bench.models.pipelines import PipelineError, pipeline_capabilities
from bench.registry import METHODS
from bench.seeds import generators

LABELS = [1, 7, 999]
# TeaCache reads Flux-style blocks' timestep-modulated norm; DiT's, PixArt's and SANA's blocks get their
# modulation elsewhere (adaptive norm outside the block's norm1 call), and it says so
TEACACHE_REFUSES = {"teacache": "TeaCache needs a first block with a timestep-modulated norm"}


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    return dit(tmp_path_factory.mktemp("tiny-dit"))


@pytest.fixture(scope="module")
def bundle(dit_dir):
    return build_model("diffusers", pipeline=str(dit_dir), class_labels=LABELS, device="cpu")


def test_dit_is_class_conditional(bundle, dit_dir):
    net = bundle.denoiser.net
    assert bundle.kind == "eps" and bundle.sample_shape == (4, 8, 8) and bundle.num_classes == 3
    assert net.table.tolist() == [*LABELS, 1000] and bundle.denoiser.null_class == 3  # row 3: DiT's null class
    assert net.learned_sigma and "prompts" not in bundle.extra and bundle.extra["class_labels"] == LABELS
    caps = bundle.capabilities
    assert (caps.arch, caps.conditioning, caps.guidance) == ("dit", "class", "cfg")
    assert pipeline_capabilities(str(dit_dir)) == caps
    every = build_model("diffusers", pipeline=str(dit_dir), class_labels="all", device="cpu")
    assert every.num_classes == 1000 and every.denoiser.net.table[-1] == 1000
    assert bundle.extra["decode"](torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_bench_ddim_reproduces_the_dit_loop(bundle, dit_dir, guidance):
    """DiTPipeline draws its latents from the generator (no latents argument) and returns decoded
    images: the same latents are drawn here, and its final latents are read at the VAE's input."""
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline.from_pretrained(dit_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    decoded: list[torch.Tensor] = []
    vae_decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: decoded.append(z.clone()) or vae_decode(z, *a, **k)
    pipe(class_labels=[LABELS[0], LABELS[2]], guidance_scale=guidance, generator=torch.Generator().manual_seed(5),
         num_inference_steps=4, output_type="pt")  # fmt: skip
    theirs = decoded[0] * pipe.vae.config.scaling_factor
    z = torch.randn((2, *bundle.sample_shape), generator=torch.Generator().manual_seed(5))
    ours = METHODS.get("ddim")().prepare(bundle, 4)(z, torch.tensor([0, 2]), guidance, generators(0, range(2), "cpu"))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_caches_run_on_dit(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    out = run_applicable_caches(bundle, 6, 4.0, [0, 1], refused=TEACACHE_REFUSES)
    assert "first_block_cache" in out and "delta_dit" in out and "magcache" in out and len(out) >= 10, sorted(out)
    assert out["fora"]["fraction"] < 1


def test_dit_input_errors(dit_dir):
    with pytest.raises(PipelineError, match="class-conditional: give `class_labels"):
        build_model("diffusers", pipeline=str(dit_dir), prompts=["a cat"], device="cpu")
    with pytest.raises(PipelineError, match=r"class_labels must be in 0\.\.999"):
        build_model("diffusers", pipeline=str(dit_dir), class_labels=[1000], device="cpu")


def test_plan_reads_the_pipelines_configs(dit_dir, tmp_path):
    """`bench plan` decides what applies from the pipelines' configs alone (no model built): on DiT
    (class-conditional, a transformer) the UNet cache is left out, the DiT caches and solvers kept;
    on SDXL (a UNet) the other way round."""
    from conftest import write_suite
    from tiny_pipelines import sdxl

    from bench.suite import expand, load_suite

    sdxl_dir = sdxl(tmp_path / "sdxl")
    path = write_suite(
        tmp_path / "two.yaml",
        f"models: [{{name: diffusers, options: {{pipeline: '{dit_dir}', class_labels: [1, 2]}}}},\n"
        f"         {{name: diffusers, options: {{pipeline: '{sdxl_dir}', prompts: [a cat]}}}}]\n"
        "methods: [ddim, euler, deepcache, fora, first_block_cache]\nsteps: [4]\nguidance: [2.0]\nmetrics: [psnr]\n"
        "reference: [{method: ddim, steps: 4}]\n",
    )
    jobs, skipped = expand(load_suite(path))
    planned = {d: {j.method for j in jobs if j.model.options["pipeline"] == str(d)} for d in (dit_dir, sdxl_dir)}
    assert planned[dit_dir] == {"ddim", "euler", "fora", "first_block_cache"}
    assert planned[sdxl_dir] == {"ddim", "euler", "deepcache"}
    assert skipped


def test_a_suite_runs_on_dit(dit_dir, tmp_path):
    """The harness end to end on the class-conditional pipeline: samples decoded by its VAE,
    a DiT cache skipping blocks, NFE one guided call per step."""
    import numpy as np
    import pandas as pd
    from conftest import write_suite

    from bench.runner import run_suite
    from bench.suite import load_suite

    path = write_suite(
        tmp_path / "dit.yaml",
        f"name: tiny-dit\nmodels: [{{name: diffusers, options: {{pipeline: '{dit_dir}', class_labels: [1, 2, 3], "
        "device: cpu}}]\nmethods: [ddim, {name: fora, knobs: {interval: [2]}}]\nsteps: [4]\nguidance: [4.0]\n"
        "n_samples: 4\nbatch_size: 2\nmetrics: [psnr]\nreference: [{method: ddim, steps: 4}]\ntiming: {warmup: 0}\n",
    )
    run = run_suite(load_suite(path), "r", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet").set_index("method")
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert (df["nfe"] == 4).all() and np.isinf(df.loc["ddim", "psnr"]) and np.isfinite(df.loc["fora", "psnr"])
    assert df.loc["fora", "units_fraction"] < 1
    samples = np.load(run / "jobs" / df["job_id"].iloc[0] / "samples.npy")
    assert samples.shape == (4, 3, 16, 16) and samples.min() >= -1 and samples.max() <= 1
