"""Tiny random-weight pipelines of the real diffusers classes (SDXL, PixArt-alpha/sigma, SANA, DiT),
saved like the hub's, and a check that runs every registered cache that applies to a bundle.

Shared by tests/test_pipelines_*.py (and by anyone who needs, say, a tiny SDXL to stand in for a
real one). Each builder writes ``<dir>/pipe`` and returns that path."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from helpers import clip_tokenizer_files

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
WORDS = sorted({w for p in PROMPTS for w in p.split()} | {"a", "photo", "of"})


def _clip_tokenizer(d: Path):
    from transformers import CLIPTokenizer

    clip_tokenizer_files(d / "tok")
    return CLIPTokenizer(str(d / "tok/vocab.json"), str(d / "tok/merges.txt"), model_max_length=16)


def _clip_config(tok, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    kw = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **kw,
    )  # fmt: skip


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=16,
    )  # fmt: skip


def _unigram(words: list[str], **special):
    """A small Unigram vocabulary over ``words`` (T5's and Gemma's tokenizers are Unigram/BPE
    models; a word-level Unigram is enough for random weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.Unigram([(w, -1.0) for w in words], unk_id=words.index(special["unk_token"])))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return raw


def sdxl(d: Path) -> Path:
    """StableDiffusionXLPipeline: a UNet with added text/time conditioning (pooled text embedding
    and the 6 size/crop ids), CLIP + CLIP-with-projection encoders; the hub's Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = _clip_tokenizer(d)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=16 + 6 * 4,
        cross_attention_dim=32, norm_num_groups=4,
    )  # fmt: skip
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(tok, 16)), text_encoder_2=CLIPTextModelWithProjection(
            _clip_config(tok, 16, 16)), tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched,
    )  # fmt: skip
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


def run_applicable_caches(
    bundle, steps: int, guidance: float, classes: list[int], refused: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Every registered cache whose ``applies_to`` accepts ``bundle``, each at its default knobs on
    ``steps`` steps of its default solver: it must run (calibrating first if it needs to), return
    finite samples of the right shape, and leave the network as it found it (plain Euler/DDIM
    afterwards bit-identical). ``refused`` names caches that must instead fail with an error
    containing the given text (a known limitation, said clearly). Returns per cache the fraction
    of its units computed and the largest difference from the uncached samples."""
    import pytest

    import methods.caching  # noqa: F401  (registers the caches)
    from bench.accounting import UnitCounter
    from bench.registry import METHODS
    from bench.seeds import generators, noise
    from methods.caching.base import target_model

    caps = bundle.capabilities
    model = target_model(bundle.denoiser.net)
    gens = generators(0, range(len(classes)), "cpu")
    z = noise(gens, bundle.sample_shape, torch.float32, "cpu")
    c = torch.tensor(classes)
    plain = "euler" if bundle.kind == "flow" else "ddim"
    ref = METHODS.get(plain)().prepare(bundle, steps)(z, c, guidance, gens)
    out: dict[str, dict[str, float]] = {}
    for entry in METHODS:
        cls = entry.obj
        if getattr(cls, "family", "") != "caching" or not cls.applies_to.matches(caps):
            continue
        ad = cls()
        if entry.name in (refused or {}):
            with pytest.raises(Exception, match=refused[entry.name]):
                ad.prepare(bundle, steps)(z, c, guidance, gens)
            continue
        sampler = ad.prepare(bundle, steps)
        with UnitCounter(ad.units(model)) as uc:
            x = sampler(z, c, guidance, gens)
        assert x.shape == z.shape and torch.isfinite(x).all(), entry.name
        assert uc.called > 0, f"{entry.name}: no unit of the network was entered"
        out[entry.name] = {"fraction": uc.computed / uc.called, "max_diff": float((x - ref).abs().max())}
    again = METHODS.get(plain)().prepare(bundle, steps)(z, c, guidance, gens)
    assert torch.equal(again, ref), "a cache left the network changed"
    assert out, f"no registered cache applies to {caps.describe()}"
    assert not set(refused or {}) - set(METHODS.names()), refused
    assert all(math.isfinite(v["max_diff"]) for v in out.values())
    return out


def _t5(d_model: int):
    """A one-layer T5 encoder and a T5 tokenizer over WORDS (PixArt's text side)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = ["<pad>", "</s>", "<unk>", *WORDS]
    tok = T5TokenizerFast(
        tokenizer_object=_unigram(words, unk_token="<unk>"), eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_ids=0,
    )  # fmt: skip
    return T5EncoderModel(T5Config(vocab_size=len(words), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)), tok


def pixart(d: Path, sigma: bool = False) -> Path:
    """PixArtAlphaPipeline (or PixArtSigmaPipeline): a PixArtTransformer2DModel predicting eps and a
    learned variance (8 output channels for 4 latent ones), a T5 encoder; DPM-Solver++ as the hub's."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    text, tok = _t5(16)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=tok, text_encoder=text, vae=_vae(), transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


def sana(d: Path) -> Path:
    """SanaPipeline: a SanaTransformer2DModel, a Gemma2 text encoder (Gemma tokenizer over WORDS), the
    deep-compression autoencoder (2x here), and DPM-Solver++ on flow sigmas with SANA's flow_shift 3.
    SanaPipeline needs sizes divisible by 32: 32x32 pixels, 16x16 latents."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    torch.manual_seed(0)
    words = ["<pad>", "<eos>", "<bos>", "<unk>", *WORDS]
    tok = GemmaTokenizerFast(
        tokenizer_object=_unigram(words, unk_token="<unk>"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    text = Gemma2Model(
        Gemma2Config(
            head_dim=8, hidden_size=16, intermediate_size=32, max_position_embeddings=2048, num_attention_heads=2,
            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(words), attn_implementation="eager",
            pad_token_id=0, bos_token_id=2, eos_token_id=1,
        )
    )  # fmt: skip
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=3, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
        sample_size=16,
    )  # fmt: skip
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )  # fmt: skip
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer, scheduler=sched)
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


def dit(d: Path) -> Path:
    """DiTPipeline: a class-conditional Transformer2DModel (adaptive-norm-zero over 1000 ImageNet
    classes + the null class 1000, learned variance), a VAE and DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline, Transformer2DModel

    torch.manual_seed(0)
    transformer = Transformer2DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )  # fmt: skip
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"
