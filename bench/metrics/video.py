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
"""

from __future__ import annotations

import numpy as np
import torch

from bench.metrics.formulas import fid_from_features

__all__ = [
    "centroids",
    "displacements",
    "clip_speed",
    "clip_jerk",
    "wasserstein_1d",
    "motion_stats",
    "video_features",
    "fvd_from_features",
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
