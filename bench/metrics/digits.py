"""Offline image metrics on the digits classifier (the embedded tier's stand-in for Inception):
FID and KID (as clean-fid computes them), precision/recall, Inception Score, class adherence."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from bench.data import digits
from bench.metrics.base import MetricContext, Statistic, register_metric
from bench.metrics.formulas import (
    FrechetToReference,
    KernelToReference,
    fid_from_features,
    inception_score_statistic,
    kid_from_features,
    precision_statistic,
    recall_statistic,
)
from bench.metrics.refs import FeatureSpace, load, note_reference, register_space, sha_file
from bench.paths import ASSETS
from bench.threads import torch_threads

FEATURES = "digits-features (committed: bench/assets/digits-features.safetensors)"
REFERENCE = "digits-train"  # the default reference set; a suite's `reference_set` may choose digits-heldout
DIGITS_SETS = ("digits-train", "digits-heldout")

__all__ = [
    "fid_from_features",
    "kid_from_features",
    "features_and_probs",
    "reference_features",
    "classifier",
    "precision_statistic",
    "recall_statistic",
    "inception_score_statistic",
]


@lru_cache(maxsize=1)
def classifier() -> torch.nn.Module:
    from bench.models import digits_classifier

    return digits_classifier()


@torch.no_grad()
def _raw_features_and_probs(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """On one intra-op thread whatever the caller's: the CPU convolutions sum in another order with
    two threads (features 1e-5 apart), and the held-out set's statistics and :func:`feature_scale`
    are computed once per process, so a driver that first computed them at two threads scored a
    job 1e-7 apart from a Ray worker at one. The price: 0.3 s per 1,300 digits against 0.2 s at two threads."""
    net = classifier()
    x = images.float().clamp(-1, 1)
    feats, probs = [], []
    with torch_threads(1):
        for chunk in x.split(512):
            f = net.features(chunk)
            feats.append(f)
            probs.append(torch.softmax(net.head(f), 1))
    return torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()


@lru_cache(maxsize=1)
def feature_scale() -> float:
    """One fixed divisor that gives the training digits' features mean |f|^2 / d = 1.

    KID's cubic kernel (x.y/d + 1)^3 assumes features of order one (as Inception's are); the
    raw ReLU features here are much larger, which made KID's variance swamp its value.
    """
    f = _raw_features_and_probs(digits("train")[0])[0]
    return float(np.sqrt((f**2).sum(1).mean() / f.shape[1]))


@torch.no_grad()
def features_and_probs(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """64-d penultimate features (float64, scaled by ``feature_scale``) and class probabilities."""
    f, p = _raw_features_and_probs(images)
    return f / feature_scale(), p


def _extract(images: torch.Tensor | list[np.ndarray], device: str = "cpu") -> np.ndarray:
    if not isinstance(images, torch.Tensor):
        raise ValueError("the digits feature space takes digits tensors (N,1,16,16) in [-1,1], not image files")
    return features_and_probs(images)[0]


FEATURE_SPACE = register_space(
    FeatureSpace(
        "digits",
        "64-d penultimate features of the committed digits classifier",
        _extract,
        lambda: sha_file(ASSETS / "digits-features.safetensors"),
    )
)


def reference_features(split: str = "train") -> np.ndarray:
    """Features of the real digits the teachers were trained on (the FID reference set)."""
    return load(f"digits-{split}", "digits").feats


def _gen(ctx: MetricContext) -> tuple[np.ndarray, np.ndarray]:
    if "digits_feats" not in ctx.cache:
        ctx.cache["digits_feats"] = features_and_probs(ctx.samples)
    return ctx.cache["digits_feats"]


def _ref(ctx: MetricContext):
    """The reference set's features: the suite's ``reference_set`` when it is a digits set (the 500
    held-out digits for suites of trained methods, which may memorise the training digits), else
    the 1297 training digits. Which one is recorded in the row (``reference_set``)."""
    name = ctx.refset if ctx.refset in DIGITS_SETS else REFERENCE
    ctx.cache["reference_used"] = name
    return note_reference(ctx.cache, load(name, "digits"))


@register_metric(
    "fid",
    higher_is_better=False,
    data="image",
    consumes=("images", "reference:digits-train|digits-heldout"),
    weights=FEATURES,
    description="Fréchet distance of digits-classifier features to the reference digits (training, or held-out: reference_set)",
)
def fid(ctx: MetricContext) -> Statistic:
    gen, ref = _gen(ctx)[0], _ref(ctx)
    fid_to_ref = FrechetToReference(ref.mu, ref.sigma)
    return Statistic(lambda idx: fid_to_ref(gen[idx]), len(gen), (0.0, np.inf))


@register_metric(
    "kid",
    higher_is_better=False,
    data="image",
    consumes=("images", "reference:digits-train|digits-heldout"),
    weights=FEATURES,
    description="kernel inception distance (x1e3) on digits-classifier features",
)
def kid(ctx: MetricContext) -> Statistic:
    gen, ref = _gen(ctx)[0], _ref(ctx).feats
    kid_to_ref = KernelToReference(gen, ref, num_subsets=20)
    return Statistic(lambda idx: 1e3 * kid_to_ref(idx, ctx.seed), len(gen))


@register_metric(
    "class_acc",
    higher_is_better=True,
    data="image",
    consumes=("images", "labels"),
    weights=FEATURES,
    description="fraction of samples the digits classifier assigns to the class they were conditioned on",
)
def class_acc(ctx: MetricContext) -> Statistic:
    if ctx.labels is None:
        raise ValueError("class_acc needs class-conditional samples (labels)")
    hit = (_gen(ctx)[1].argmax(1) == ctx.labels.numpy()).astype(np.float64)
    return Statistic(lambda idx: hit[idx].mean(), len(hit), (0.0, 1.0))


@register_metric(
    "precision",
    higher_is_better=True,
    data="image",
    consumes=("images", "reference:digits-train|digits-heldout"),
    weights=FEATURES,
    description="improved precision (k=3 NN manifolds) of digits-classifier features against the reference digits",
)
def precision(ctx: MetricContext) -> Statistic:
    return precision_statistic(_gen(ctx)[0], _ref(ctx).feats)


@register_metric(
    "recall",
    higher_is_better=True,
    data="image",
    consumes=("images", "reference:digits-train|digits-heldout"),
    weights=FEATURES,
    description="improved recall (k=3 NN manifolds) of digits-classifier features against the reference digits",
)
def recall(ctx: MetricContext) -> Statistic:
    return recall_statistic(_gen(ctx)[0], _ref(ctx).feats)


@register_metric(
    "inception_score",
    higher_is_better=True,
    data="image",
    consumes=("images",),
    weights=FEATURES,
    description="Inception Score computed with the digits classifier's class probabilities (at most 10)",
)
def inception_score_digits(ctx: MetricContext) -> Statistic:
    return inception_score_statistic(_gen(ctx)[1])
