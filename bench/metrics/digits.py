"""Offline image metrics on the digits classifier: FID, KID (as clean-fid computes them), class adherence."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from cleanfid.fid import frechet_distance, kernel_distance

from bench.data import digits
from bench.metrics import MetricContext, MetricValue, percentile_ci, register_metric

FEATURES = "digits-features (committed: bench/assets/digits-features.safetensors)"


@lru_cache(maxsize=1)
def classifier() -> torch.nn.Module:
    from bench.models import digits_classifier

    return digits_classifier()


@torch.no_grad()
def features_and_probs(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """64-d penultimate features (float64) and class probabilities of [-1,1] images."""
    net = classifier()
    x = images.float().clamp(-1, 1)
    feats, probs = [], []
    for chunk in x.split(512):
        f = net.features(chunk)
        feats.append(f)
        probs.append(torch.softmax(net.head(f), 1))
    return torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()


@lru_cache(maxsize=4)
def reference_features(split: str = "train") -> np.ndarray:
    """Features of the real digits the teachers were trained on (the FID reference set)."""
    return features_and_probs(digits(split)[0])[0]


def _gen(ctx: MetricContext) -> tuple[np.ndarray, np.ndarray]:
    if "digits_feats" not in ctx.cache:
        ctx.cache["digits_feats"] = features_and_probs(ctx.samples)
    return ctx.cache["digits_feats"]


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (clean-fid's formula)."""
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def kid_from_features(a: np.ndarray, b: np.ndarray, seed: int = 0, num_subsets: int = 100) -> float:
    """Unbiased cubic-polynomial-kernel MMD^2 (KID) by clean-fid, its subset draws seeded."""
    state = np.random.get_state()  # clean-fid draws subsets from numpy's global generator
    np.random.seed(seed)
    try:
        return kernel_distance(a, b, num_subsets=num_subsets)
    finally:
        np.random.set_state(state)


@register_metric(
    "fid",
    higher_is_better=False,
    data="image",
    consumes=("images", "reference:digits-train"),
    weights=FEATURES,
    description="Fréchet distance of digits-classifier features to the training digits",
)
def fid(ctx: MetricContext) -> MetricValue:
    gen, ref = _gen(ctx)[0], reference_features()
    return percentile_ci(lambda idx: fid_from_features(gen[idx], ref), len(gen), ctx)


@register_metric(
    "kid",
    higher_is_better=False,
    data="image",
    consumes=("images", "reference:digits-train"),
    weights=FEATURES,
    description="kernel inception distance (x1e3) on digits-classifier features",
)
def kid(ctx: MetricContext) -> MetricValue:
    gen, ref = _gen(ctx)[0], reference_features()
    return percentile_ci(lambda idx: 1e3 * kid_from_features(gen[idx], ref, ctx.seed, num_subsets=20), len(gen), ctx)


@register_metric(
    "class_acc",
    higher_is_better=True,
    data="image",
    consumes=("images", "labels"),
    weights=FEATURES,
    description="fraction of samples the digits classifier assigns to the class they were conditioned on",
)
def class_acc(ctx: MetricContext) -> MetricValue:
    if ctx.labels is None:
        raise ValueError("class_acc needs class-conditional samples (labels)")
    hit = (_gen(ctx)[1].argmax(1) == ctx.labels.numpy()).astype(np.float64)
    return percentile_ci(lambda idx: hit[idx].mean(), len(hit), ctx)
