"""Offline video measurements on moving digits: the motion of a clip read from its pixels, and
the FVD-style Fréchet distance in the moving-digits classifier's feature space.

Motion. The estimator is the intensity centroid of each frame (pixels mapped from [-1, 1] to
[0, 1], the black background weighs nothing) and its displacement between consecutive frames. On
a real moving-digits clip the sprite is always wholly inside the canvas, so the estimator recovers
the known motion exactly (a test checks it against the ground-truth positions); on a generated
clip it measures what the clip shows. A clip's *speed* is the mean absolute per-axis displacement
over its frame pairs, in pixels per frame; the same estimator applied to generated and real clips
gives the two distributions compared.

FVD-style distance. The Fréchet distance between Gaussian fits of the 64-d penultimate features of
the moving-digits classifier (:class:`bench.models.video.MovingDigitsClassifier`, trained on clips
of the training digits to name the digit and its velocity), computed as FID is.

Suite metrics (registered, ``data="video"``; each a :class:`Statistic` of the clips' indices, so it
gets a bootstrap interval and pairs across jobs like the image metrics):

- ``fvd_digits``: the FVD-style distance to :data:`REF_CLIPS` held-out clips (digits the teacher
  never saw), whose features are cached as a reference set (``moving-digits-heldout`` in the
  ``moving-digits`` feature space, :mod:`bench.metrics.refs`);
- ``video_class_acc``: the fraction of clips the classifier names as the class they were
  conditioned on;
- ``motion_w1``: the 1-Wasserstein distance between the generated clips' speeds and the held-out
  clips' speeds (pixels per frame; the estimator is exact on real clips);
- ``jerk_ratio``: mean jerk of the generated clips over that of the held-out clips (1 = as steady as
  the data, whose only jerk is a bounce; larger = jittery motion). A frozen clip has no jerk, so
  read it beside ``motion_w1``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from functools import lru_cache

import numpy as np
import torch

from bench.io import atomic_write, write_json
from bench.metrics.base import MetricContext, Statistic, register_metric
from bench.metrics.formulas import FrechetToReference, fid_from_features
from bench.metrics.refs import (
    FeatureSpace,
    MissingReferenceError,
    RefStats,
    cache_path,
    load,
    note_reference,
    register_space,
    sha_file,
)
from bench.paths import ASSETS

__all__ = [
    "centroids",
    "displacements",
    "clip_speed",
    "clip_jerk",
    "wasserstein_1d",
    "motion_stats",
    "video_features",
    "fvd_from_features",
    "reference_stats",
    "reference_motion",
    "REFSET",
    "SPACE",
]


def _check_clips(clips: torch.Tensor) -> torch.Tensor:
    clips = torch.as_tensor(clips).float()
    if clips.ndim != 5:
        raise ValueError(f"clips must be (N, F, C, H, W), got shape {tuple(clips.shape)}")
    if clips.shape[1] < 2:
        raise ValueError(f"motion needs at least 2 frames per clip, got {clips.shape[1]}")
    return clips


def centroids(clips: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Intensity centroids (N, F, 2) as (x, y) in pixels of clips (N, F, C, H, W) in [-1, 1]; a
    frame with no intensity at all has its centroid at the canvas centre."""
    clips = _check_clips(clips)
    w = ((clips.clamp(-1, 1) + 1) / 2).sum(2)  # (N, F, H, W)
    h, wd = w.shape[-2:]
    mass = w.sum((-2, -1))
    ys = torch.arange(h, dtype=w.dtype).view(1, 1, h, 1)
    xs = torch.arange(wd, dtype=w.dtype).view(1, 1, 1, wd)
    cx = (w * xs).sum((-2, -1)) / mass.clamp_min(eps)
    cy = (w * ys).sum((-2, -1)) / mass.clamp_min(eps)
    empty = mass <= eps
    cx = torch.where(empty, torch.full_like(cx, (wd - 1) / 2), cx)
    cy = torch.where(empty, torch.full_like(cy, (h - 1) / 2), cy)
    return torch.stack([cx, cy], -1)


def displacements(clips: torch.Tensor) -> torch.Tensor:
    """Centroid displacement (N, F-1, 2) (dx, dy) between consecutive frames, pixels per frame."""
    c = centroids(clips)
    return c[:, 1:] - c[:, :-1]


def clip_speed(clips: torch.Tensor) -> np.ndarray:
    """Each clip's speed (N,): the mean absolute per-axis centroid displacement, pixels per frame."""
    return displacements(clips).abs().mean((1, 2)).double().numpy()


def clip_jerk(clips: torch.Tensor) -> np.ndarray:
    """Each clip's jerk (N,): the mean absolute change of the centroid displacement between
    consecutive frame pairs, pixels per frame squared. Zero for constant motion; on moving digits
    only a bounce changes it, so jittery or incoherent motion shows as a larger jerk."""
    d = displacements(clips)
    if d.shape[1] < 2:
        raise ValueError("jerk needs at least 3 frames per clip")
    return (d[:, 1:] - d[:, :-1]).abs().mean((1, 2)).double().numpy()


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """The 1-Wasserstein distance between two 1-d empirical distributions (any sizes)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples")
    q = np.linspace(0, 1, 2 * max(len(a), len(b)) + 1)[1:-1]
    return float(np.mean(np.abs(np.quantile(a, q, method="inverted_cdf") - np.quantile(b, q, method="inverted_cdf"))))


def motion_stats(clips: torch.Tensor, static: float = 0.25) -> dict[str, float]:
    """The speed distribution's summary of ``clips`` (see :func:`clip_speed`): mean, median and the
    fraction of near-static clips (slower than ``static`` pixels per frame)."""
    s = clip_speed(clips)
    return {"mean": float(s.mean()), "median": float(np.median(s)), "static_fraction": float((s < static).mean())}


@torch.no_grad()
def video_features(clips: torch.Tensor, net: torch.nn.Module | None = None, batch: int = 256) -> np.ndarray:
    """64-d moving-digits classifier features (N, 64) of clips (N, F, 1, 16, 16) in [-1, 1]."""
    if net is None:
        from bench.models.video import moving_digits_classifier

        net = moving_digits_classifier()
    clips = _check_clips(clips)
    net.eval()
    out = [net.features(clips[i : i + batch]) for i in range(0, len(clips), batch)]
    return torch.cat(out).double().numpy()


def fvd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussian fits of two feature sets (FVD's formula)."""
    return fid_from_features(a, b)


# --- the registered suite metrics -------------------------------------------------------------

SPACE = "moving-digits"  # the feature space: the committed moving-digits classifier's 64-d features
REFSET = "moving-digits-heldout"  # the reference clips: held-out digits, never seen by the teacher
REF_CLIPS = 1000
REF_SEED = 1  # moving_digits("heldout", REF_CLIPS, seed=REF_SEED): the clips tests/test_video_teacher.py bounds
WEIGHTS = "moving-digits-features (committed: bench/assets/moving-digits-features.safetensors)"
CLIP_SHAPE = (8, 1, 16, 16)  # bench.video_data.VIDEO_SHAPE, spelled out so this module does not import the data


@lru_cache(maxsize=1)
def classifier() -> torch.nn.Module:
    """The committed moving-digits classifier (loaded once per process)."""
    from bench.models.video import moving_digits_classifier

    return moving_digits_classifier().eval()


def _extract(clips: torch.Tensor | list[np.ndarray], device: str = "cpu") -> np.ndarray:
    if not isinstance(clips, torch.Tensor):
        raise ValueError("the moving-digits feature space takes clips (N, 8, 1, 16, 16) in [-1, 1], not image files")
    return video_features(clips, classifier())


FEATURE_SPACE = register_space(
    FeatureSpace(
        SPACE,
        "64-d penultimate features of the committed moving-digits classifier (3D CNN on 8x16x16 clips)",
        _extract,
        lambda: sha_file(ASSETS / "moving-digits-features.safetensors"),
    )
)


@lru_cache(maxsize=1)
def _reference_clips() -> torch.Tensor:
    from bench.video_data import moving_digits

    return moving_digits("heldout", REF_CLIPS, seed=REF_SEED).clips


def build_reference() -> RefStats:
    """Compute the held-out reference clips' features and cache them as :mod:`bench.metrics.refs`
    caches every reference (``$BENCH_HOME/refs/moving-digits-heldout/moving-digits.{npz,json}``,
    stamped with the classifier's hash, so a cache made by other weights is rebuilt)."""
    network_id = FEATURE_SPACE.network_id()
    feats = _extract(_reference_clips())
    digest = hashlib.sha256(feats.astype(np.float32).tobytes()).hexdigest()[:16]
    meta = {
        "refset": REFSET,
        "space": SPACE,
        "source": f"bench.video_data.moving_digits('heldout', {REF_CLIPS}, seed={REF_SEED})",
        "source_sha256": hashlib.sha256(_reference_clips().numpy().tobytes()).hexdigest(),
        "n": int(len(feats)),
        "resolution": 16,
        "preprocess": "none (clips as generated, (F, C, H, W) = (8, 1, 16, 16) in [-1, 1])",
        "feature_extractor": f"{SPACE}: {FEATURE_SPACE.description} (network {network_id})",
        "dim": int(feats.shape[1]),
        "network_id": network_id,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "features_sha256": digest,
    }
    path = cache_path(REFSET, SPACE)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)

    def save(p) -> None:
        with open(p, "wb") as f:
            np.savez(f, feats=feats.astype(np.float32), mu=mu, sigma=sigma)

    atomic_write(path, save)
    write_json(path.with_suffix(".json"), meta)
    return load(REFSET, SPACE)


def reference_stats() -> RefStats:
    """The reference clips' cached features (built on first use, and rebuilt when the cache is
    missing, torn, or was made with another classifier: the clips are a fixed function of a seed)."""
    try:
        return load(REFSET, SPACE)
    except MissingReferenceError:
        return build_reference()


@lru_cache(maxsize=1)
def reference_motion() -> tuple[np.ndarray, np.ndarray]:
    """Per-clip speed and jerk (:func:`clip_speed`, :func:`clip_jerk`) of the held-out reference clips."""
    clips = _reference_clips()
    return clip_speed(clips), clip_jerk(clips)


def _clips(ctx: MetricContext, metric: str) -> torch.Tensor:
    """The job's clips, or an error naming the fix when the model does not make moving-digits clips."""
    x = ctx.samples
    if ctx.bundle.data != "video" or x.ndim != 5 or tuple(x.shape[1:]) != CLIP_SHAPE:
        raise ValueError(
            f"{metric} scores moving-digits clips (N, {', '.join(map(str, CLIP_SHAPE))}) of a video model such as "
            f"moving-digits-dit; {ctx.bundle.name} makes {ctx.bundle.data} samples of shape {tuple(x.shape[1:])}: "
            "score it with its own data kind's metrics (`bench list metrics`)"
        )
    return x


def _gen(ctx: MetricContext, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The clips' features (N, 64) and digit-class probabilities (N, 10), once per job."""
    if "video_feats" not in ctx.cache:
        x = _clips(ctx, metric).float().clamp(-1, 1)
        net = classifier()
        feats, probs = [], []
        with torch.no_grad():
            for chunk in x.split(256):
                f = net.features(chunk)
                feats.append(f)
                probs.append(torch.softmax(net(chunk)[0], 1))
        ctx.cache["video_feats"] = (torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy())
    return ctx.cache["video_feats"]


def _ref(ctx: MetricContext) -> RefStats:
    ctx.cache["reference_used"] = REFSET
    return note_reference(ctx.cache, reference_stats())


@register_metric(
    "fvd_digits",
    higher_is_better=False,
    data="video",
    consumes=("clips", f"reference:{REFSET}"),
    weights=WEIGHTS,
    description=f"FVD-style Fréchet distance of moving-digits-classifier features to {REF_CLIPS} held-out clips",
)
def fvd_digits(ctx: MetricContext) -> Statistic:
    gen, ref = _gen(ctx, "fvd_digits")[0], _ref(ctx)
    to_ref = FrechetToReference(ref.mu, ref.sigma)
    return Statistic(lambda idx: to_ref(gen[idx]), len(gen), (0.0, np.inf))


@register_metric(
    "video_class_acc",
    higher_is_better=True,
    data="video",
    consumes=("clips", "labels"),
    weights=WEIGHTS,
    description="fraction of clips the moving-digits classifier assigns to the digit they were conditioned on",
)
def video_class_acc(ctx: MetricContext) -> Statistic:
    probs = _gen(ctx, "video_class_acc")[1]
    if ctx.labels is None:
        raise ValueError("video_class_acc needs class-conditional clips (labels)")
    hit = (probs.argmax(1) == ctx.labels.numpy()).astype(np.float64)
    return Statistic(lambda idx: hit[idx].mean(), len(hit), (0.0, 1.0))


@register_metric(
    "motion_w1",
    higher_is_better=False,
    data="video",
    consumes=("clips", f"reference:{REFSET}"),
    weights="none (intensity-centroid motion estimator)",
    description="Wasserstein-1 between the clips' speeds and the held-out clips' speeds (centroid motion, px/frame)",
)
def motion_w1(ctx: MetricContext) -> Statistic:
    gen = clip_speed(_clips(ctx, "motion_w1"))
    real = reference_motion()[0]
    ctx.cache["reference_used"] = REFSET
    return Statistic(lambda idx: wasserstein_1d(gen[idx], real), len(gen), (0.0, np.inf))


@register_metric(
    "jerk_ratio",
    higher_is_better=False,
    data="video",
    consumes=("clips", f"reference:{REFSET}"),
    weights="none (intensity-centroid motion estimator)",
    description="mean clip jerk (change of centroid motion, px/frame^2) over the held-out clips' (1 = as steady as the data)",
)
def jerk_ratio(ctx: MetricContext) -> Statistic:
    gen = clip_jerk(_clips(ctx, "jerk_ratio"))
    real = float(reference_motion()[1].mean())
    ctx.cache["reference_used"] = REFSET
    return Statistic(lambda idx: float(gen[idx].mean()) / real, len(gen), (0.0, np.inf))
