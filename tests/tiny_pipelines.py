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


def run_applicable_caches(bundle, steps: int, guidance: float, classes: list[int]) -> dict[str, dict[str, float]]:
    """Every registered cache whose ``applies_to`` accepts ``bundle``, each at its default knobs on
    ``steps`` steps of its default solver: it must run (calibrating first if it needs to), return
    finite samples of the right shape, and leave the network as it found it (plain Euler/DDIM
    afterwards bit-identical). Returns per cache the fraction of its units computed and the
    largest difference from the uncached samples."""
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
        sampler = ad.prepare(bundle, steps)
        with UnitCounter(ad.units(model)) as uc:
            x = sampler(z, c, guidance, gens)
        assert x.shape == z.shape and torch.isfinite(x).all(), entry.name
        assert uc.called > 0, f"{entry.name}: no unit of the network was entered"
        out[entry.name] = {"fraction": uc.computed / uc.called, "max_diff": float((x - ref).abs().max())}
    again = METHODS.get(plain)().prepare(bundle, steps)(z, c, guidance, gens)
    assert torch.equal(again, ref), "a cache left the network changed"
    assert out, f"no registered cache applies to {caps.describe()}"
    assert all(math.isfinite(v["max_diff"]) for v in out.values())
    return out
