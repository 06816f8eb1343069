"""Text-image metrics of the real tier: CLIP score (open_clip), PickScore (transformers) and CMMD
(open_clip embeddings against a reference set).

CLIP score and PickScore need the prompt of every sample (``MetricContext.prompts``): the digits
models are conditioned on class labels, not text, so there these metrics refuse to run (their
offline stand-in is ``class_acc``). Each loads its weights from the catalogue and fails with the
fetch command when they are absent.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from bench.metrics.base import MetricContext, Statistic, register_metric
from bench.metrics.formulas import clip_score_from_embeddings, pickscore_from_embeddings, rbf_mean
from bench.metrics.refs import FeatureSpace, load, note_reference, register_space, require_features, sha_file


@dataclass(frozen=True)
class OpenClipSpec:
    """An open_clip model: architecture name, catalogue entry of its weights, QuickGELU, and the
    checkpoint file inside the entry when the entry is a snapshot directory."""

    arch: str
    weights: str
    quick_gelu: bool
    checkpoint: str | None = None


CLIP_SCORE_MODELS = {
    "clip_score": OpenClipSpec("ViT-B-32", "clip-vit-b-32-openai", True),
    "clip_score_l14": OpenClipSpec("ViT-L-14", "clip-vit-l-14-openai", True),
    "clip_score_g14": OpenClipSpec("ViT-g-14", "clip-vit-g-14-laion2b", False, "open_clip_pytorch_model.bin"),
}
CMMD_MODEL = OpenClipSpec("ViT-L-14-336", "clip-vit-l-14-336-openai", True)
CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0


@lru_cache(maxsize=2)
def _open_clip(arch: str, checkpoint: str, quick_gelu: bool):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint, force_quick_gelu=quick_gelu)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def open_clip_model(spec: OpenClipSpec, metric: str | None = None):
    """(model, image preprocess, tokenizer) of ``spec``, its weights from the catalogue."""
    from bench.weights import require

    path = require(spec.weights, metric)
    if spec.checkpoint:
        path = path / spec.checkpoint
    return _open_clip(spec.arch, str(path), spec.quick_gelu)


def _pil(images: torch.Tensor | list[np.ndarray]) -> list:
    from PIL import Image

    from bench.metrics.inception import to_hwc_uint8

    return [Image.fromarray(im) for im in to_hwc_uint8(images)]


@torch.no_grad()
def open_clip_image_embeddings(model, preprocess, images, batch: int = 32, device: str = "cpu") -> np.ndarray:
    """Image embeddings (float64, not normalised) through the model's own preprocessing."""
    pil = _pil(images)
    out = []
    for lo in range(0, len(pil), batch):
        x = torch.stack([preprocess(im) for im in pil[lo : lo + batch]]).to(device)
        out.append(model.encode_image(x).double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def open_clip_text_embeddings(model, tokenizer, prompts: list[str], batch: int = 64, device: str = "cpu") -> np.ndarray:
    out = []
    for lo in range(0, len(prompts), batch):
        out.append(model.encode_text(tokenizer(prompts[lo : lo + batch]).to(device)).double().cpu())
    return torch.cat(out).numpy()


def _prompts(ctx: MetricContext, metric: str) -> list[str]:
    if ctx.prompts is None:
        raise ValueError(
            f"{metric} scores (image, prompt) pairs and {ctx.bundle.name} gives its samples no prompts "
            "(digits models are conditioned on class labels: their text-free stand-in is class_acc)"
        )
    if len(ctx.prompts) != len(ctx.samples):
        raise ValueError(f"{metric}: {len(ctx.prompts)} prompts for {len(ctx.samples)} samples")
    return list(ctx.prompts)


def _text_embeddings_unique(encode, prompts: list[str]) -> np.ndarray:
    unique = sorted(set(prompts))
    emb = encode(unique)
    row = {p: i for i, p in enumerate(unique)}
    return emb[[row[p] for p in prompts]]


def clip_score_values(
    spec: OpenClipSpec, images, prompts: list[str], metric: str | None = None, device: str = "cpu"
) -> np.ndarray:
    """100 * max(cos, 0) of each (image, prompt) pair with the open_clip model of ``spec``."""
    model, preprocess, tokenizer = open_clip_model(spec, metric)
    model.to(device)
    img = open_clip_image_embeddings(model, preprocess, images, device=device)
    txt = _text_embeddings_unique(lambda ps: open_clip_text_embeddings(model, tokenizer, ps, device=device), prompts)
    return clip_score_from_embeddings(img, txt)


def _clip_metric(name: str, label: str):
    spec = CLIP_SCORE_MODELS[name]

    @register_metric(
        name,
        higher_is_better=True,
        data="image",
        consumes=("images", "prompts"),
        weights=f"open_clip {spec.arch} ({spec.weights})",
        requires=(spec.weights,),
        description=f"CLIP score 100*max(cos,0) of (image, prompt) pairs with {label}",
    )
    def metric(ctx: MetricContext) -> Statistic:
        prompts = _prompts(ctx, name)
        if f"{name}_values" not in ctx.cache:
            ctx.cache[f"{name}_values"] = clip_score_values(CLIP_SCORE_MODELS[name], ctx.samples, prompts, name, ctx.device)
        v = ctx.cache[f"{name}_values"]
        return Statistic(lambda idx: v[idx].mean(), len(v), (0.0, 100.0))

    return metric


clip_score = _clip_metric("clip_score", "OpenAI CLIP ViT-B/32 (as MLPerf)")
clip_score_l14 = _clip_metric("clip_score_l14", "OpenAI CLIP ViT-L/14")
clip_score_g14 = _clip_metric("clip_score_g14", "LAION CLIP ViT-g/14")


# --- PickScore ---------------------------------------------------------------------------------

PICKSCORE_MODEL, PICKSCORE_PROCESSOR = "pickscore-v1", "clip-vit-h-14-processor"


@lru_cache(maxsize=1)
def _pickscore(model_dir: str, processor_dir: str):
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(processor_dir)


def pickscore_model(metric: str | None = "pickscore"):
    """(transformers CLIPModel, processor): PickScore_v1 with the CLIP-ViT-H-14 processor."""
    from bench.weights import require

    return _pickscore(str(require(PICKSCORE_MODEL, metric)), str(require(PICKSCORE_PROCESSOR, metric)))


def _embeds(out) -> torch.Tensor:
    """transformers <5 returns the projected embeddings; 5 a model output holding them as pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def pickscore_values(model, processor, images, prompts: list[str], batch: int = 16, device: str = "cpu") -> np.ndarray:
    """PickScore exp(logit_scale) * cos of each (image, prompt) pair."""
    pil = _pil(images)
    model.to(device)
    img = []
    for lo in range(0, len(pil), batch):
        px = processor(images=pil[lo : lo + batch], return_tensors="pt")["pixel_values"].to(device)
        img.append(_embeds(model.get_image_features(pixel_values=px)).double().cpu())

    def encode(ps: list[str]) -> np.ndarray:
        t = processor(text=ps, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        return (
            _embeds(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])).double().cpu().numpy()
        )

    txt = _text_embeddings_unique(encode, prompts)
    return pickscore_from_embeddings(torch.cat(img).numpy(), txt, float(model.logit_scale))


@register_metric(
    "pickscore",
    higher_is_better=True,
    data="image",
    consumes=("images", "prompts"),
    weights="PickScore_v1 (transformers CLIPModel) with the CLIP-ViT-H-14-laion2B processor",
    requires=(PICKSCORE_MODEL, PICKSCORE_PROCESSOR),
    description="PickScore (Kirstain et al. 2023): exp(logit_scale) * cos of (image, prompt) pairs",
)
def pickscore(ctx: MetricContext) -> Statistic:
    prompts = _prompts(ctx, "pickscore")
    if "pickscore_values" not in ctx.cache:
        ctx.cache["pickscore_values"] = pickscore_values(*pickscore_model(), ctx.samples, prompts, device=ctx.device)
    v = ctx.cache["pickscore_values"]
    return Statistic(lambda idx: v[idx].mean(), len(v))


# --- CMMD --------------------------------------------------------------------------------------


def cmmd_embeddings(images, metric: str | None = None, device: str = "cpu") -> np.ndarray:
    """L2-normalised CLIP ViT-L/14-336 image embeddings (open_clip's preprocessing)."""
    model, preprocess, _ = open_clip_model(CMMD_MODEL, metric)
    model.to(device)
    e = open_clip_image_embeddings(model, preprocess, images, device=device)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _cmmd_network_id() -> str:
    from bench.weights import require

    return sha_file(require(CMMD_MODEL.weights))


def _cmmd_extract(images: torch.Tensor | list[np.ndarray], device: str = "cpu") -> np.ndarray:
    return cmmd_embeddings(images, device=device)


CMMD_SPACE = register_space(
    FeatureSpace("clip-l14-336", "L2-normalised CLIP ViT-L/14-336 image embeddings (CMMD)", _cmmd_extract, _cmmd_network_id)
)


@register_metric(
    "cmmd",
    higher_is_better=False,
    data="image",
    consumes=("images", "reference"),
    weights="OpenAI CLIP ViT-L/14-336 (open_clip)",
    requires=(CMMD_MODEL.weights,),
    description="CMMD (Jayasumana et al. 2024): 1000 * RBF-MMD^2 (sigma 10) of CLIP embeddings to the reference set",
)
def cmmd(ctx: MetricContext) -> Statistic:
    open_clip_model(CMMD_MODEL, "cmmd")  # the weights first: their absence is the error to report
    name = ctx.refset or ctx.bundle.extra.get("refset")
    if not name:
        raise ValueError(
            "cmmd needs a reference set: add `reference_set: NAME` to the suite and run `bench ref build NAME --images DIR --features clip-l14-336`"
        )
    ref = require_features(note_reference(ctx.cache, load(name, CMMD_SPACE.name)), "cmmd")
    if "cmmd_emb" not in ctx.cache:
        ctx.cache["cmmd_emb"] = cmmd_embeddings(ctx.samples, "cmmd", ctx.device)
    gen = ctx.cache["cmmd_emb"]
    k_yy = rbf_mean(ref, ref, CMMD_SIGMA)  # fixed across resamples: computed once
    return Statistic(
        lambda idx: CMMD_SCALE * (rbf_mean(gen[idx], gen[idx], CMMD_SIGMA) + k_yy - 2 * rbf_mean(gen[idx], ref, CMMD_SIGMA)),
        len(gen),
        (0.0, np.inf),
    )


# --- prompts -----------------------------------------------------------------------------------


def parti_prompts(category: str | None = None) -> list[str]:
    """PartiPrompts (from the weights catalogue, ``bench weights fetch partiprompts``), optionally one category."""
    from bench.weights import require

    path: Path = require("partiprompts")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r["Prompt"] for r in rows if category is None or r["Category"] == category]
