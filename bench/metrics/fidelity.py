"""Fidelity to the baseline: PSNR, SSIM and LPIPS of each accelerated sample against the sample
of the suite's reference configuration drawn with the same seed (as feature-cache papers report).

The suite names its reference configuration with ``reference: {method: NAME, steps: N}`` (the
entry the reports also use for speedups). The driver plans that configuration as a job of its own
(adding it to the run when the grid lacks it), runs it first, and hands its samples to every job
that compares with it: they arrive as ``MetricContext.baseline``.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics.base import MetricContext, Statistic, register_metric

if TYPE_CHECKING:
    from bench.suite import Job, Suite

LPIPS_WEIGHTS = "alexnet-lpips"
LPIPS_MIN_SIZE = 64  # AlexNet's five stages need at least this many pixels a side
NO_REFERENCE = (
    "fidelity metrics (psnr, ssim, lpips) compare each sample with the same-seed sample of the suite's reference "
    "configuration: add `reference: {method: NAME, steps: N}` to the suite"
)


def baseline_job(job: Job, suite: Suite) -> Job:
    """The job of the suite's reference configuration (``reference:``) on ``job``'s model, seeds
    and guidance. Of several entries, the first for this model (or for any model) is taken,
    preferring one at the job's guidance; fidelity always compares at the job's own guidance."""
    from bench.registry import METHODS

    entries = [r for r in getattr(suite, "reference", []) or [] if r.get("model") in (None, job.model.name, job.model.label)]
    entries = [r for r in entries if "method" in r and "steps" in r]
    if not entries:
        raise ValueError(NO_REFERENCE)
    r = next((e for e in entries if e.get("guidance") == job.guidance), entries[0])
    knobs = tuple(sorted(METHODS.get(r["method"]).resolve_knobs(dict(r.get("knobs") or {})).items()))
    return dataclasses.replace(job, method=r["method"], knobs=knobs, steps=int(r["steps"]))


def _baseline(ctx: MetricContext, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    if ctx.baseline is None:
        raise ValueError(f"{metric}: {NO_REFERENCE}")
    if ctx.baseline.shape != ctx.samples.shape:
        raise ValueError(f"{metric}: baseline samples {tuple(ctx.baseline.shape)} do not match {tuple(ctx.samples.shape)}")
    return ctx.samples.double(), ctx.baseline.double()


@register_metric(
    "psnr",
    higher_is_better=True,
    data="image",
    consumes=("images", "baseline"),
    weights="none",
    needs_baseline=True,
    description="PSNR (dB) against the same-seed samples of the suite's reference configuration (inf if identical)",
)
def psnr(ctx: MetricContext) -> Statistic:
    x, y = _baseline(ctx, "psnr")
    se = ((x.clamp(-1, 1) - y.clamp(-1, 1)) ** 2).flatten(1).mean(1).numpy()

    def stat(idx: np.ndarray) -> float:
        mse = se[idx].mean()
        return float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))  # data range 2 ([-1, 1])

    return Statistic(stat, len(se))


@register_metric(
    "ssim",
    higher_is_better=True,
    data="image",
    consumes=("images", "baseline"),
    weights="none",
    needs_baseline=True,
    description="SSIM (Gaussian 11x11, sigma 1.5, on [0,1] images) against the same-seed samples of the reference configuration",
)
def ssim(ctx: MetricContext) -> Statistic:
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _baseline(ctx, "ssim")
    v = structural_similarity_index_measure(
        (x.clamp(-1, 1) + 1) / 2, (y.clamp(-1, 1) + 1) / 2, data_range=1.0, reduction="none"
    ).numpy()
    return Statistic(lambda idx: v[idx].mean(), len(v), (-1.0, 1.0))


@lru_cache(maxsize=1)
def _lpips_net(path: str) -> torch.nn.Module:
    from torchmetrics.functional.image.lpips import _LPIPS
    from torchvision.models import alexnet

    net = _LPIPS(pretrained=True, net="alex", pnet_rand=True)  # LPIPS v0.1 heads (shipped with torchmetrics)
    backbone = alexnet(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone.features.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
    for stage in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5):
        for i, layer in stage.named_children():
            layer.load_state_dict(backbone.features[int(i)].state_dict())
    return net.eval()


def lpips_network(metric: str | None = "lpips") -> torch.nn.Module:
    from bench.weights import require

    return _lpips_net(str(require(LPIPS_WEIGHTS, metric)))


@torch.no_grad()
def lpips_distances(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64, device: str = "cpu") -> np.ndarray:
    """LPIPS (AlexNet, v0.1) of each image pair; [-1,1] inputs, gray repeated to RGB, images
    smaller than 64 px upsampled (bilinear) so every AlexNet stage has a spatial extent."""

    net.to(device)

    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device).float().clamp(-1, 1)
        t = t.repeat(1, 3, 1, 1) if t.shape[1] == 1 else t
        if min(t.shape[-2:]) < LPIPS_MIN_SIZE:
            t = F.interpolate(t, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False)
        return t

    out = [net(prep(x[lo : lo + batch]), prep(y[lo : lo + batch])).flatten() for lo in range(0, len(x), batch)]
    return torch.cat(out).double().cpu().numpy()


@register_metric(
    "lpips",
    higher_is_better=False,
    data="image",
    consumes=("images", "baseline"),
    weights="LPIPS v0.1 AlexNet (torchvision AlexNet + torchmetrics' linear heads)",
    requires=(LPIPS_WEIGHTS,),
    needs_baseline=True,
    description="LPIPS (AlexNet) against the same-seed samples of the suite's reference configuration",
)
def lpips(ctx: MetricContext) -> Statistic:
    net = lpips_network("lpips")
    x, y = _baseline(ctx, "lpips")
    v = lpips_distances(net, x, y, device=ctx.device)
    return Statistic(lambda idx: v[idx].mean(), len(v), (0.0, np.inf))
