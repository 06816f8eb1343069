"""The real tier's video pipelines (bench.models.video_pipelines) on tiny random-weight pipelines of
the real diffusers classes, saved to disk: WanPipeline, LTXPipeline and CogVideoXPipeline become
`diffusers` models whose samples are latent clips (F, C, H, W); bench's default solver from the same
start latents equals each pipeline's own ``__call__`` (output_type="latent"), unguided and with
classifier-free guidance; decoding gives clips (N, F, 3, H, W) in [-1, 1]; a suite naming an absent
video pipeline plans offline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_suite
from tiny_pipelines import _unigram

from bench.models import build_model
from bench.models.pipelines import PipelineError, ShiftedFlowSchedule
from bench.models.video_pipelines import TerminalSNRSchedule
from bench.registry import METHODS
from bench.seeds import generators, noise

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
WORDS = ["<pad>", "</s>", "<unk>", *sorted({w for p in PROMPTS for w in p.split()})]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (tests/conftest.py)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        tokenizer_object=_unigram(WORDS, unk_token="<unk>"), eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_ids=0,
    )  # fmt: skip


def _t5(d_model: int = 16):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    """Wan 2.1 (WanTransformer3DModel, UMT5, AutoencoderKLWan: 8x spatial, 4x temporal) with its hub
    scheduler: UniPC on flow sigmas with flow_shift 3."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    d = tmp_path_factory.mktemp("tiny-wan")
    torch.manual_seed(0)
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0],
    )  # fmt: skip
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=text, transformer=transformer, vae=vae, scheduler=sched)
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


@pytest.fixture(scope="module")
def ltx_dir(tmp_path_factory) -> Path:
    """LTX-Video (LTXVideoTransformer3DModel on packed tokens, T5 with its mask, AutoencoderKLLTXVideo:
    4x spatial, 4x temporal) with LTX's dynamic-shift FlowMatch scheduler (token counts scaled down
    to the tiny clips)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    d = tmp_path_factory.mktemp("tiny-ltx")
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16,
    )  # fmt: skip
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.95, max_shift=2.05
    )
    pipe = LTXPipeline(scheduler=sched, vae=vae, text_encoder=_t5(), tokenizer=_t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory) -> Path:
    """CogVideoX (CogVideoXTransformer3DModel with rotary embeddings, T5, AutoencoderKLCogVideoX: 8x
    spatial, 4x temporal) with CogVideoX-2B's scheduler config: DDIM, v-prediction, SNR shift 3,
    zero terminal SNR, trailing spacing."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    d = tmp_path_factory.mktemp("tiny-cog")
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
    )  # fmt: skip
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    )  # fmt: skip
    sched = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0, steps_offset=0,
        timestep_spacing="trailing",
    )  # fmt: skip
    pipe = CogVideoXPipeline(tokenizer=_t5_tokenizer(), text_encoder=_t5(), vae=vae, transformer=transformer, scheduler=sched)
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory) -> Path:
    """HunyuanVideo (HunyuanVideoTransformer3DModel with embedded guidance, a 2-layer Llama with the
    pipeline's prompt template, CLIP for the pooled embedding, AutoencoderKLHunyuanVideo: 8x spatial,
    4x temporal), FlowMatch Euler at shift 7 as on the hub."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from helpers import clip_tokenizer_files
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel, LlamaTokenizerFast

    d = tmp_path_factory.mktemp("tiny-hunyuan")
    clip_tokenizer_files(d / "tok")
    clip_tok = CLIPTokenizer(str(d / "tok/vocab.json"), str(d / "tok/merges.txt"), model_max_length=77)
    llama_tok = LlamaTokenizerFast(
        tokenizer_object=_unigram(WORDS, unk_token="<unk>"), pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    torch.manual_seed(0)
    llama = LlamaModel(
        LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    )  # fmt: skip
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
                       eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
    )  # fmt: skip
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        spatial_compression_ratio=8, temporal_compression_ratio=4,
    )  # fmt: skip
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=llama_tok, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=clip_tok,
    )  # fmt: skip
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


SIZE = {"height": 32, "width": 32, "num_frames": 9}


def bench_run(b, method: str, steps: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``method`` on prompts 0 and 2 from bench's seeded start latents: (result, start)."""
    gens = generators(0, range(2), "cpu")
    z = noise(gens, b.sample_shape, torch.float32, "cpu")
    return METHODS.get(method)().prepare(b, steps)(z, torch.tensor([0, 2]), guidance, gens), z


def loaded(cls, path: Path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler_at(pipe, n: int) -> None:
    """The pipeline's scheduler replaced by FlowMatch Euler at sigmas linspace(1, 1/n, n) before
    the shift (bench's uniform grid), keeping the shift: WanPipeline calls set_timesteps(n) without
    sigmas, and FlowMatch Euler's own default grid shifts its lowest level twice."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shift = float(pipe.scheduler.config.get("flow_shift", 1.0))
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    plain = sched.set_timesteps
    sched.set_timesteps = lambda num_inference_steps=None, device=None, **kw: plain(
        sigmas=list(np.linspace(1, 1 / num_inference_steps, num_inference_steps)), device=device
    )
    pipe.scheduler = sched


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_wan_euler_equals_the_pipelines_loop(wan_dir, guidance):
    """Wan: bench's 4-step `euler` on the shifted flow (flow_shift 3 from the UniPC config) from the
    same latents equals WanPipeline's loop on FlowMatch Euler at the same levels, guided (two passes
    there, one batched pass here) and not."""
    from diffusers import WanPipeline

    b = build_model("diffusers", pipeline=str(wan_dir), prompts=PROMPTS, device="cpu", **SIZE)
    assert b.sample_shape == (3, 4, 4, 4) and b.data == "video" and b.kind == "flow"
    assert isinstance(b.denoiser.schedule, ShiftedFlowSchedule) and b.denoiser.schedule.shift == 3.0
    caps = b.capabilities
    assert (caps.arch, caps.data, caps.conditioning, caps.guidance) == ("video-dit", "video", "text", "cfg")
    ours, z = bench_run(b, "euler", 4, guidance)
    pipe = loaded(WanPipeline, wan_dir)
    euler_at(pipe, 4)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=z.transpose(1, 2).clone(), num_inference_steps=4, guidance_scale=guidance,
        output_type="latent", **SIZE,
    ).frames  # fmt: skip
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def wan22_dirs(wan_dir, tmp_path_factory) -> dict[str, Path]:
    """Wan 2.2 variants of the tiny Wan: A14B's two experts (a second transformer for the network
    timesteps below boundary_ratio x 1000) and TI2V-5B's per-token timesteps (expand_timesteps)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    d = tmp_path_factory.mktemp("tiny-wan22")
    base = WanPipeline.from_pretrained(wan_dir)
    torch.manual_seed(1)
    low = WanTransformer3DModel.from_config(base.transformer.config)
    parts = {k: v for k, v in base.components.items() if k not in ("transformer_2",)}
    WanPipeline(**parts, transformer_2=low, boundary_ratio=0.8).save_pretrained(d / "experts")
    WanPipeline(**parts, expand_timesteps=True).save_pretrained(d / "ti2v")
    return {"experts": d / "experts", "ti2v": d / "ti2v"}


@pytest.mark.parametrize("variant", ["experts", "ti2v"])
def test_wan22_euler_equals_the_pipelines_loop(wan22_dirs, variant):
    """Wan 2.2: with two experts, bench's network switches to transformer_2 where the pipeline does
    (4 steps at shift 3: network times 1000, 900 on the first, 750, 500 on the second, boundary 800;
    guidance_scale_2 the pipeline's default, the same scale); with expand_timesteps the timestep is
    given per token. Either way bench's `euler` equals WanPipeline's loop, guided."""
    from diffusers import WanPipeline

    path = wan22_dirs[variant]
    b = build_model("diffusers", pipeline=str(path), prompts=PROMPTS, device="cpu", **SIZE)
    net = b.denoiser.net
    calls: list[str] = []
    for name in ("transformer", "transformer_2"):
        if getattr(net, name) is not None:
            getattr(net, name).register_forward_pre_hook(lambda m, a, n=name: calls.append(n))
    ours, z = bench_run(b, "euler", 4, 3.0)
    if variant == "experts":
        assert net.boundary == pytest.approx(800.0) and calls == ["transformer"] * 2 + ["transformer_2"] * 2
    else:
        assert net.expand_timesteps and calls == ["transformer"] * 4
    pipe = loaded(WanPipeline, path)
    euler_at(pipe, 4)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=z.transpose(1, 2).clone(), num_inference_steps=4, guidance_scale=3.0,
        output_type="latent", **SIZE,
    ).frames  # fmt: skip
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ltx_euler_equals_the_pipelines_default_loop(ltx_dir, guidance):
    """LTX-Video: mu from the latent clip's token count (3 frames x 8 x 8 = 192),
    packed tokens, T5 mask, RoPE scaled by the frame rate; bench's `euler` equals LTXPipeline's
    default loop (no sigmas given) from the same latents."""
    from diffusers import LTXPipeline

    from bench.models.video_pipelines import _ltx_pack, _ltx_unpack

    b = build_model("diffusers", pipeline=str(ltx_dir), prompts=PROMPTS, device="cpu", **SIZE)
    assert b.sample_shape == (3, 8, 8, 8)
    mu = 0.95 + (192 - 16) * (2.05 - 0.95) / (256 - 16)  # 3 latent frames x 8 x 8 tokens
    assert b.denoiser.schedule.shift == pytest.approx(math.exp(mu))
    assert b.extra["time_shift"]["how"].startswith("dynamic") and b.extra["video"]["frame_rate"] == 25
    ours, z = bench_run(b, "euler", 4, guidance)
    pipe = loaded(LTXPipeline, ltx_dir)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=_ltx_pack(z.transpose(1, 2).clone(), 1, 1), num_inference_steps=4,
        guidance_scale=guidance, output_type="latent", **SIZE,
    ).frames  # fmt: skip
    torch.testing.assert_close(ours, _ltx_unpack(theirs, 3, 8, 8, 1, 1).transpose(1, 2), rtol=1e-4, atol=1e-5)
    small = build_model("diffusers", pipeline=str(ltx_dir), prompts=PROMPTS, device="cpu", height=16, width=16, num_frames=1)
    assert small.denoiser.schedule.shift == pytest.approx(math.exp(0.95))  # 1 frame x 4 x 4 = base_image_seq_len


@pytest.fixture(scope="module")
def cog15_dir(cog_dir, tmp_path_factory) -> Path:
    """CogVideoX 1.5's transformer layout on the tiny CogVideoX: a temporal patch of 2 (3 latent
    frames are padded to 4 at the front, as the pipeline pads them) and no patch bias."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    d = tmp_path_factory.mktemp("tiny-cog15")
    base = CogVideoXPipeline.from_pretrained(cog_dir)
    torch.manual_seed(2)
    cfg = {**base.transformer.config, "patch_size_t": 2, "patch_bias": False}
    transformer = CogVideoXTransformer3DModel.from_config(cfg)
    CogVideoXPipeline(**{**base.components, "transformer": transformer}).save_pretrained(d / "pipe")
    return d / "pipe"


def test_cogvideox15_pads_frames_as_the_pipeline_and_ddim_equals_its_loop(cog15_dir):
    from diffusers import CogVideoXPipeline

    b = build_model("diffusers", pipeline=str(cog15_dir), prompts=PROMPTS, device="cpu", **SIZE)
    assert b.sample_shape == (4, 4, 4, 4)  # 3 latent frames + 1 of padding for the temporal patch of 2
    ours, z = bench_run(b, "ddim", 4, 6.0)
    pipe = loaded(CogVideoXPipeline, cog15_dir)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=z.clone(), num_inference_steps=4, guidance_scale=6.0, output_type="latent",
        **SIZE,
    ).frames  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert b.extra["decode"](ours).shape == (2, 9, 3, 32, 32)  # the padding frame dropped before decoding


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_cogvideox_ddim_equals_the_pipelines_loop(cog_dir, guidance):
    """CogVideoX-2B's scheduler: bench's VP schedule is the scheduler's own alphas_cumprod (SNR
    shift, then zero terminal SNR: pure noise at t = 999), and bench's `ddim` on the trailing grid
    equals CogVideoXPipeline's loop (frames before channels on both sides)."""
    from diffusers import CogVideoXPipeline

    b = build_model("diffusers", pipeline=str(cog_dir), prompts=PROMPTS, device="cpu", **SIZE)
    sch = b.denoiser.schedule
    assert isinstance(sch, TerminalSNRSchedule) and b.kind == "v" and b.sample_shape == (3, 4, 4, 4)
    a, s = sch.alpha_sigma(torch.tensor([999.0, 998.5, 0.0]))
    assert a[0] == 0 and s[0] == 1 and a[1] == 0 and torch.isfinite(a).all() and torch.isfinite(s).all()
    pipe = loaded(CogVideoXPipeline, cog_dir)
    np.testing.assert_allclose(sch.alphas_cumprod, pipe.scheduler.alphas_cumprod.numpy(), rtol=1e-12, atol=1e-15)
    assert b.capabilities.schedule == "vp" and b.capabilities.arch == "video-dit"
    ours, z = bench_run(b, "ddim", 5, guidance)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=z.clone(), num_inference_steps=5, guidance_scale=guidance, output_type="latent",
        **SIZE,
    ).frames  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_hunyuan_video_euler_equals_the_pipelines_default_loop(hunyuan_dir, guidance):
    """HunyuanVideo: guidance-distilled (the scale x 1000 is an input; one pass per step, no
    unconditional half), static shift 7; bench's `euler` equals HunyuanVideoPipeline's default loop
    from the same latents."""
    from diffusers import HunyuanVideoPipeline

    b = build_model("diffusers", pipeline=str(hunyuan_dir), prompts=PROMPTS, device="cpu", **SIZE)
    assert b.sample_shape == (3, 4, 4, 4) and b.denoiser.schedule.shift == 7.0
    assert b.capabilities.guidance == "embedded" and b.denoiser.rows_per_sample(guidance, True) == 1
    ours, z = bench_run(b, "euler", 4, guidance)
    pipe = loaded(HunyuanVideoPipeline, hunyuan_dir)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=z.transpose(1, 2).clone(), num_inference_steps=4, guidance_scale=guidance,
        output_type="latent", **SIZE,
    ).frames  # fmt: skip
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)
    clips = b.extra["decode"](ours)
    assert clips.shape == (2, 9, 3, 32, 32) and torch.isfinite(clips).all()


@pytest.mark.parametrize("which", ["wan", "ltx", "cog"])
def test_decode_gives_clips_in_range(which, wan_dir, ltx_dir, cog_dir):
    """Latents (N, F, C, h, w) decode to clips (N, 1 + 4 (F - 1), 3, 32, 32) in [-1, 1]."""
    path = {"wan": wan_dir, "ltx": ltx_dir, "cog": cog_dir}[which]
    b = build_model("diffusers", pipeline=str(path), prompts=PROMPTS, device="cpu", **SIZE)
    clips = b.extra["decode"](torch.randn(3, *b.sample_shape))
    assert clips.shape == (3, 9, 3, 32, 32) and clips.dtype == torch.float32
    assert torch.isfinite(clips).all() and clips.abs().max() <= 1


@pytest.mark.parametrize("which", ["wan", "ltx", "cog", "hunyuan"])
def test_bfloat16_runs_close_to_float32(which, wan_dir, ltx_dir, cog_dir, hunyuan_dir):
    """dtype: bfloat16 loads the pipeline in bfloat16 (diffusers keeps some modules in float32: the
    network is fed in the transformer's dtype, not its first parameter's); samples stay float32 and
    land within 3% of the float32 run's scale (measured 0.5-1.6%)."""
    path = {"wan": wan_dir, "ltx": ltx_dir, "cog": cog_dir, "hunyuan": hunyuan_dir}[which]
    solver = "ddim" if which == "cog" else "euler"
    out = {}
    for dtype in ("float32", "bfloat16"):
        b = build_model("diffusers", pipeline=str(path), prompts=PROMPTS, device="cpu", dtype=dtype, **SIZE)
        out[dtype] = bench_run(b, solver, 3, 3.0)[0]
    x, ref = out["bfloat16"], out["float32"]
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert float((x - ref).abs().max()) < 0.03 * float(ref.abs().max())


def test_bad_options_name_the_fix(wan_dir):
    with pytest.raises(PipelineError, match="1 more than a multiple of 4"):
        build_model("diffusers", pipeline=str(wan_dir), prompts=PROMPTS, device="cpu", height=32, width=32, num_frames=8)
    with pytest.raises(PipelineError, match="multiples of 16"):
        build_model("diffusers", pipeline=str(wan_dir), prompts=PROMPTS, device="cpu", height=24, width=32, num_frames=9)
    with pytest.raises(PipelineError, match="frame_rate is LTX"):
        build_model("diffusers", pipeline=str(wan_dir), prompts=PROMPTS, device="cpu", frame_rate=24, **SIZE)


def test_plan_of_an_absent_video_pipeline_works_offline(tmp_path, monkeypatch):
    """A suite naming a hub video pipeline that is not on this machine validates and plans: its jobs
    are listed without ids and the plan names the fetch command."""
    from bench.plan import plan_suite
    from bench.suite import expand, load_suite

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_suite(
        tmp_path / "wan.yaml",
        "models:\n  - {name: diffusers, options: {pipeline: Wan-AI/absent-T2V, prompts: [x], num_frames: 81}}\n"
        "methods: [euler, unipc]\nsteps: [4]\nguidance: [5.0]\nmetrics: []\nn_samples: 2\nbatch_size: 1\n",
    )
    suite = load_suite(path)
    jobs, _ = expand(suite)
    plan = plan_suite(suite, probe=False)
    assert len(plan["jobs"]) == len(jobs) == 2 and all(r["job_id"] is None for r in plan["jobs"])
    (why,) = plan["absent"].values()
    assert "`hf download Wan-AI/absent-T2V`" in why


def test_a_saved_video_pipeline_reports_its_capabilities_before_loading(wan_dir, ltx_dir, cog_dir, hunyuan_dir):
    from bench.models import model_capabilities

    for path, kind, guidance in (
        (wan_dir, "flow", "cfg"), (ltx_dir, "flow", "cfg"), (cog_dir, "v", "cfg"), (hunyuan_dir, "flow", "embedded")
    ):  # fmt: skip
        caps = model_capabilities("diffusers", {"pipeline": str(path)})
        assert (caps.arch, caps.data, caps.prediction, caps.conditioning) == ("video-dit", "video", kind, "text")
        assert caps.guidance == guidance


@pytest.mark.parametrize("name", ["wan", "ltx", "cogvideox"])
def test_the_example_gpu_suites_validate_here(name, tmp_path, monkeypatch):
    """suites/{wan,ltx,cogvideox}.yaml name hub pipelines that are not on this machine: they load,
    expand, and plan offline with the fetch command."""
    from bench.plan import plan_suite
    from bench.suite import expand, load_suite

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = load_suite(Path(__file__).parents[1] / "suites" / f"{name}.yaml")
    jobs, _ = expand(suite)
    plan = plan_suite(suite, probe=False)
    assert len(plan["jobs"]) == len(jobs) > 0
    (why,) = plan["absent"].values()
    assert "hf download" in why


@pytest.mark.parametrize("which", ["wan", "ltx", "cog"])
def test_first_block_cache_and_pab_run_on_the_video_pipelines(which, wan_dir, ltx_dir, cog_dir, tmp_path, monkeypatch):
    """The video caches accept arch video-dit: FirstBlockCache and PAB (diffusers' hooks on the
    pipeline's own transformer blocks and attention layers) run on each tiny video pipeline, 4 steps
    at guidance 3 under its default solver, give finite clips, skip some of the work (PAB: some
    attention calls broadcast), and leave the network as they found it (the plain solver after them
    is bit-identical). FirstBlockCache needs two blocks or more (diffusers' hook: a first block and
    the rest), hence the two-layer tiny transformers."""
    import methods.caching  # noqa: F401  (registers the caches)
    from bench.accounting import UnitCounter
    from methods.caching.base import target_model

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    path = {"wan": wan_dir, "ltx": ltx_dir, "cog": cog_dir}[which]
    b = build_model("diffusers", pipeline=str(path), prompts=PROMPTS, device="cpu", **SIZE)
    plain = "ddim" if which == "cog" else "euler"  # CogVideoX starts at zero SNR: the EDM-frame euler cannot
    ref, z = bench_run(b, plain, 4, 3.0)
    gens = generators(0, range(2), "cpu")
    # FirstBlockCache's default threshold skips nothing on some random-weight nets: a loose one shows the skip
    for name, knobs in (("first_block_cache", {"threshold": 0.5}), ("pab", {})):
        ad = METHODS.get(name)(solver=plain, **knobs)
        assert ad.applies_to.matches(b.capabilities), name
        with UnitCounter(ad.units(target_model(b.denoiser.net))) as uc:
            x = ad.prepare(b, 4)(z, torch.tensor([0, 2]), 3.0, gens)
        assert x.shape == z.shape and torch.isfinite(x).all(), name
        assert 0 < uc.computed < uc.called, (name, uc.computed, uc.called)
    again, _ = bench_run(b, plain, 4, 3.0)
    assert torch.equal(again, ref)


@pytest.mark.parametrize("which", ["wan", "ltx", "cog", "hunyuan"])
def test_taylorseer_skipping_dead_norms_changes_no_bit_on_the_video_pipelines(
    which, wan_dir, ltx_dir, cog_dir, hunyuan_dir, tmp_path, monkeypatch
):
    """On forecast calls TaylorSeer gives the blocks' pre-norms a zero scalar instead of computing them
    (methods/caching/taylorseer.py, DeadNormHook): each real video block class must then still run
    (the placeholder passes through its modulation, slicing and concatenation to the forecast
    sub-layers) and give the same clips bit for bit as with the norms computed. LTX's RMSNorms are not
    LayerNorms and stay computed."""
    import methods.caching  # noqa: F401  (registers the caches)
    from methods.caching.base import target_model
    from methods.caching.taylorseer import TaylorSeer, dead_norms

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    path = {"wan": wan_dir, "ltx": ltx_dir, "cog": cog_dir, "hunyuan": hunyuan_dir}[which]
    b = build_model("diffusers", pipeline=str(path), prompts=PROMPTS, device="cpu", **SIZE)
    solver = "ddim" if which == "cog" else "euler"
    assert (len(dead_norms(target_model(b.denoiser.net))) > 0) == (which != "ltx")
    z = noise(generators(0, range(2), "cpu"), b.sample_shape, b.dtype)
    runs = []
    for skip in (False, True):
        TaylorSeer.skip_dead_norms = skip
        try:
            ad = METHODS.get("taylorseer")(solver=solver, interval=2, warmup=1)
            runs.append(ad.prepare(b, 5)(z.clone(), torch.tensor([0, 2]), 3.0, generators(0, range(2), "cpu")))
        finally:
            TaylorSeer.skip_dead_norms = True
    assert torch.isfinite(runs[1]).all()
    assert torch.equal(runs[0], runs[1])


def test_a_suite_runs_on_a_video_pipeline_end_to_end(wan_dir, tmp_path, monkeypatch):
    """`bench run` on the tiny Wan pipeline: a plain solver and a video cache run through the
    runner and worker, and the stored samples are the decoded clips (N, F, 3, H, W) in [-1, 1]."""
    import json

    import pandas as pd

    from bench.runner import run_suite
    from bench.suite import load_suite

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    opts = {"pipeline": str(wan_dir), "prompts": PROMPTS, "device": "cpu", **SIZE}
    path = write_suite(
        tmp_path / "suite.yaml",
        f"name: tiny-wan\nmodels:\n  - {{name: diffusers, options: {json.dumps(opts)}}}\ntiming: {{warmup: 0}}\n"
        "methods: [euler, pab]\nsteps: [3]\nguidance: [3.0]\nn_samples: 2\nbatch_size: 2\nmetrics: []\n",
    )
    run = run_suite(load_suite(path), "r", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet")
    assert (df["status"] == "ok").all() and sorted(df["method"]) == ["euler", "pab"] and (df["nfe"] == 3).all()
    clips = np.load(run / "jobs" / df["job_id"].iloc[0] / "samples.npy")
    assert clips.shape == (2, 9, 3, 32, 32) and np.isfinite(clips).all() and np.abs(clips).max() <= 1


def test_teacache_refuses_a_video_transformer_without_a_modulated_norm1_and_names_the_fix(wan_dir, tmp_path, monkeypatch):
    """Wan's blocks normalise with an unmodulated FP32LayerNorm and modulate afterwards: TeaCache's
    indicator (norm1(h, emb=temb)) does not exist there, so its calibration fails saying so."""
    import methods.caching  # noqa: F401  (registers the caches)

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    b = build_model("diffusers", pipeline=str(wan_dir), prompts=PROMPTS, device="cpu", **SIZE)
    with pytest.raises(Exception, match="norm1 takes the timestep embedding.*use first_block_cache or magcache"):
        METHODS.get("teacache")(calib_samples=1).prepare(b, 2)
