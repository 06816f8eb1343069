"""The real tier's `diffusers` model on a tiny random-weight Stable Diffusion pipeline saved to disk:
bench's sampler reproduces the pipeline's own loop, a suite runs end to end (solvers and DeepCache,
latents decoded for the metrics), and what cannot run says why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_suite
from helpers import clip_tokenizer_files

from bench.models import build_model
from bench.models.pipelines import PipelineError
from bench.registry import METHODS
from bench.runner import run_suite
from bench.seeds import generators, noise
from bench.suite import load_suite

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A Stable Diffusion pipeline of the real classes with tiny random weights, saved like the hub's."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny-sd")
    clip_tokenizer_files(d / "tok")
    tok = CLIPTokenizer(str(d / "tok/vocab.json"), str(d / "tok/merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae, text, tok, unet, sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


def tiny_flow_vae():
    """A 2x-downsampling VAE with a shift and scale, as the flow pipelines' VAEs have."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=16, shift_factor=0.06, scaling_factor=1.5,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    """A Stable Diffusion 3 pipeline of the real classes with tiny random weights and no T5 encoder
    (SD3's own low-memory option), saved like the hub's; shift 1 so its steps are plain."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny-sd3")
    clip_tokenizer_files(d / "tok")
    tok = CLIPTokenizer(str(d / "tok/vocab.json"), str(d / "tok/merges.txt"), model_max_length=16)
    torch.manual_seed(0)

    def clip_text() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        )  # fmt: skip

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    )  # fmt: skip
    vae = tiny_flow_vae()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=clip_text(), tokenizer=tok, text_encoder_2=clip_text(), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    """A FLUX.1-dev-style pipeline (guidance-distilled transformer, CLIP + T5 encoders) with tiny
    random weights, saved like the hub's; its T5 tokenizer is a small Unigram vocabulary."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    d = tmp_path_factory.mktemp("tiny-flux")
    clip_tokenizer_files(d / "tok")
    tok = CLIPTokenizer(str(d / "tok/vocab.json"), str(d / "tok/merges.txt"), model_max_length=16)
    words = ["<pad>", "</s>", "<unk>", *sorted({w for p in PROMPTS for w in p.split()})]
    raw = Tokenizer(models.Unigram([(w, -1.0) for w in words], unk_id=2))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok2 = T5TokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    )  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 2, 2),
    )  # fmt: skip
    vae = tiny_flow_vae()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=clip, tokenizer=tok,
        text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


@pytest.fixture(scope="module")
def bundle(sd_dir):
    return build_model("diffusers", pipeline=str(sd_dir), prompts=PROMPTS, device="cpu")


def pipeline_suite(tmp_path: Path, pipe_dir: Path, body: str) -> Path:
    """A suite of the `diffusers` model on ``pipe_dir`` with PROMPTS, no warm-up, and ``body``."""
    head = (
        f'name: tiny-{pipe_dir.parent.name}\nmodels:\n  - {{name: diffusers, options: {{pipeline: "{pipe_dir}", '
        f"prompts: {json.dumps(PROMPTS)}, device: cpu}}}}\ntiming: {{warmup: 0}}\n"
    )
    return write_suite(tmp_path / "suite.yaml", head + body)


def test_the_bundle_reads_schedule_prompts_and_shapes_from_the_pipeline(bundle, sd_dir):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_pretrained(sd_dir / "scheduler")
    sch = bundle.denoiser.schedule
    np.testing.assert_allclose(sch.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-5)  # scaled_linear; float32 there
    assert bundle.kind == "eps" and bundle.num_classes == 3 and bundle.denoiser.null_class == 3
    assert bundle.sample_shape == (4, 8, 8) and bundle.extra["prompts"] == PROMPTS
    assert bundle.extra["decode"](torch.zeros(2, 4, 8, 8)).shape == (2, 3, 16, 16)
    again = build_model("diffusers", pipeline=str(sd_dir), prompts=PROMPTS, device="cpu")
    assert again.weights_hash == bundle.weights_hash


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_bench_ddim_reproduces_the_pipelines_own_loop(bundle, sd_dir, guidance):
    """The same latents through StableDiffusionPipeline (DDIM, trailing spacing, eta 0) and through
    bench's `ddim` adapter on the bundle: the same final latents, guided and unguided."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    gens = generators(0, range(2), "cpu")
    z = noise(gens, bundle.sample_shape, torch.float32, "cpu")
    cond = torch.tensor([1, 2])
    ours = METHODS.get("ddim")().prepare(bundle, 4)(z, cond, guidance, gens)
    theirs = pipe(
        [PROMPTS[1], PROMPTS[2]], latents=z.clone(), num_inference_steps=4, guidance_scale=guidance, output_type="latent"
    ).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def euler_at_guidance_3(b) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """bench's 4-step `euler` on prompts 0 and 2 at guidance 3: the result, the start latents, and
    the times the network was called at (for the pipeline's ``sigmas``)."""
    seen: list[float] = []
    handle = b.denoiser.net.register_forward_pre_hook(lambda m, a: seen.append(float(a[1].flatten()[0])))
    gens = generators(0, range(2), "cpu")
    z = noise(gens, b.sample_shape, torch.float32, "cpu")
    try:
        return METHODS.get("euler")().prepare(b, 4)(z, torch.tensor([0, 2]), 3.0, gens), z, seen
    finally:
        handle.remove()


def test_an_sd3_pipeline_is_a_flow_model_and_bench_euler_reproduces_its_loop(sd3_dir):
    """SD3 without T5: a flow model whose condition is (token embeddings, pooled embedding); bench's
    `euler` from the same latents at the same sigmas gives the pipeline's own Euler result."""
    from diffusers import StableDiffusion3Pipeline

    b = build_model("diffusers", pipeline=str(sd3_dir), prompts=PROMPTS, device="cpu")
    assert b.kind == "flow" and b.sample_shape == (4, 8, 8) and b.extra["pipeline_time_shift"] == 1.0
    net = b.denoiser.net
    assert net.table.shape[0] == net.pooled.shape[0] == 4  # 3 prompts + the negative one
    ours, z, seen = euler_at_guidance_3(b)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=z.clone(), sigmas=[t / 1000 for t in seen], guidance_scale=3.0,
        height=16, width=16, output_type="latent",
    ).images  # fmt: skip
    assert len(seen) == 4 and seen[0] == pytest.approx(1000.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_flux_guidance_is_embedded_and_bench_euler_reproduces_its_loop(flux_dir):
    """FLUX.1-dev style: packed 2x2 latent tokens, and guidance as an input of one pass per step
    (no uncond half); bench's `euler` from the same latents at the same sigmas gives FluxPipeline's."""
    from diffusers import FluxPipeline

    from bench.models.digits_nets import pack, unpack

    b = build_model("diffusers", pipeline=str(flux_dir), prompts=PROMPTS, device="cpu", height=16)
    assert b.kind == "flow" and b.sample_shape == (4, 8, 8) and b.denoiser.guidance_embedded
    assert b.denoiser.rows_per_sample(3.0, True) == 1
    ours, z, seen = euler_at_guidance_3(b)
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=pack(z.clone()), sigmas=[t / 1000 for t in seen], guidance_scale=3.0,
        height=16, width=16, output_type="latent",
    ).images  # fmt: skip
    assert len(seen) == 4
    torch.testing.assert_close(ours, unpack(theirs, *b.sample_shape), rtol=1e-4, atol=1e-5)


def test_caches_on_flux_and_guided_nfe_counts_one_pass(flux_dir, tmp_path):
    """At guidance 3 a guidance-distilled model spends one pass per step: NFE = steps. FORA and
    FirstBlockCache (diffusers' hook) skip blocks and spend fewer FLOPs than Euler."""
    path = pipeline_suite(
        tmp_path,
        flux_dir,
        """
methods: [euler, {name: fora, knobs: {interval: [2]}}, {name: first_block_cache, knobs: {threshold: [0.2]}}]
steps: [6]
guidance: [3.0]
n_samples: 4
batch_size: 2
metrics: [psnr]
reference: [{method: euler, steps: 6}]
""",
    )
    path.write_text(path.read_text().replace("device: cpu}", "device: cpu, height: 16}"))
    run = run_suite(load_suite(path), "r", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet").set_index("method")
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert (df["nfe"] == 6).all() and (df["network_calls"] == 6 * 2).all()  # 2 batches, one pass per step
    for m in ("fora", "first_block_cache"):
        assert df.loc[m, "units_fraction"] < 1 and df.loc[m, "flops"] < df.loc["euler", "flops"], m


def test_a_suite_runs_solvers_and_deepcache_on_the_pipeline(sd_dir, tmp_path, monkeypatch):
    import bench.models.pipelines as pipelines

    loads = []
    real_load = pipelines.load_pipeline
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    path = pipeline_suite(
        tmp_path,
        sd_dir,
        """
methods: [ddim, dpmpp_2m, {name: deepcache, knobs: {interval: [2]}}]
steps: [4]
guidance: [1.0, 3.0]
n_samples: 6
batch_size: 3
metrics: [psnr, ssim]
optional_metrics: [clip_score]
reference: [{method: ddim, steps: 4}]
""",
    )
    run = run_suite(load_suite(path), "r", tmp_path / "res", progress=False)
    assert len(loads) == 1  # planning and the local executor share one loaded pipeline
    df = pd.read_parquet(run / "results.parquet")
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert len(df) == 6 and (df["nfe"] == 4).all()
    samples = np.load(run / "jobs" / df["job_id"].iloc[0] / "samples.npy")
    assert samples.shape == (6, 3, 16, 16) and samples.min() >= -1 and samples.max() <= 1  # decoded images
    assert (df["decode_s_per_image"] > 0).all()
    ref = df[df["method"] == "ddim"]
    assert np.isinf(ref["psnr"]).all()  # the reference against itself
    cached = df[df["method"] == "deepcache"].iloc[0]
    assert cached["units_fraction"] < 1 and cached["flops"] < ref["flops"].iloc[0]
    assert df["missing_metrics"].eq("clip_score").all()  # weights absent here: recorded missing, never a number
    assert df["clip_score"].isna().all() and df["error"].str.contains("bench weights fetch").all()


def test_dit_caches_run_on_the_sd3_pipeline(sd3_dir, tmp_path, monkeypatch):
    """FORA and Block Caching (calibrated here, into a fresh $BENCH_HOME) on SD3's joint blocks,
    whose last block ends the text stream: both skip blocks, and spend fewer FLOPs than Euler."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    path = pipeline_suite(
        tmp_path,
        sd3_dir,
        """
methods: [euler, {name: fora, knobs: {interval: [2]}}, block_caching]
steps: [6]
guidance: [2.0]
n_samples: 4
batch_size: 2
metrics: [psnr]
reference: [{method: euler, steps: 6}]
""",
    )
    run = run_suite(load_suite(path), "r", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet").set_index("method")
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert (df["nfe"] == 6).all() and np.isinf(df.loc["euler", "psnr"])
    for m in ("fora", "block_caching"):
        assert df.loc[m, "units_fraction"] < 1 and df.loc[m, "flops"] < df.loc["euler", "flops"], m
        assert np.isfinite(df.loc[m, "psnr"]), m
    assert df.loc["block_caching", "train_cost_s"] > 0  # its calibration, recorded as training cost


def test_what_cannot_run_says_why(sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match=r"not in the local Hugging Face cache: fetch it with `hf download someone/absent`"):
        build_model("diffusers", pipeline="someone/absent", prompts=["x"])
    # a suite naming that pipeline is still valid offline: its kind is unknown until it is fetched,
    # so every method is planned (a solver for eps and a cache for flow alike)
    from bench.suite import expand

    absent = write_suite(tmp_path / "absent.yaml", "models: [{name: diffusers, options: {pipeline: someone/absent, "
                         "prompts: [x]}}]\nmethods: [ddim, fora]\nsteps: [4]\nguidance: [2.0]\nmetrics: [psnr]\n"
                         "reference: [{method: ddim, steps: 4}]\n")  # fmt: skip
    jobs, skipped = expand(load_suite(absent))
    assert sorted(j.method for j in jobs) == ["ddim", "fora"] and not skipped
    with pytest.raises(PipelineError, match="no such directory"):
        build_model("diffusers", pipeline=str(tmp_path / "nowhere"), prompts=["x"])
    with pytest.raises(PipelineError, match="needs `prompts"):
        build_model("diffusers", pipeline=str(sd_dir))
    with pytest.raises(PipelineError, match=r"prompts must be a list of strings, e.g. prompts: \['a cat'\]"):
        build_model("diffusers", pipeline=str(sd_dir), prompts="a cat")
    with pytest.raises(ValueError, match="float8"):  # the deployment options' check (bench.models.options)
        build_model("diffusers", pipeline=str(sd_dir), prompts=["x"], dtype="float8")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=4,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1)  # fmt: skip
    DDPMPipeline(unet, DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(PipelineError, match=r"DDPMPipeline \(UNet2DModel\) is not supported yet"):
        build_model("diffusers", pipeline=str(tmp_path / "ddpm"), prompts=["x"])
