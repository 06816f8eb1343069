"""VBench (Huang et al. 2024) as bench metrics, computed by vbench itself in its own environment.

vbench 0.1.5 pins transformers 4.33.2, numpy<2 and timm<=1.0.12, which bench's environment cannot
hold, so it runs in an isolated environment (``bench vbench setup``, :mod:`bench.envs`) and bench
never imports it: the clips go to :mod:`bench.metrics.vbench_worker` as ``.npy`` files, the worker
writes them as MP4 (as VBench's users hand it their videos) and calls VBench's own evaluation in
``custom_input`` mode, and the results come back as JSON: one :class:`VBenchRow` per dimension,
named as VBench names it, holding VBench's total over the clips and its value for each clip.

Each dimension VBench evaluates on custom input is a metric ``vbench_<dimension>`` (e.g.
``vbench_temporal_flickering``); its value is the mean of VBench's per-clip values (VBench's total
for clips of equal length, as a model's clips are) with a bootstrap interval over clips. A
dimension whose weights are not in vbench's cache fails with a message naming them and
``bench vbench fetch <dimension>``; vbench is never let download at evaluation time.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.envs import run_worker
from bench.metrics.base import MetricContext, Statistic, register_metric

ENV = "vbench"
FETCH_COMMAND = "bench vbench fetch"

# The dimensions VBench 0.1.5 evaluates in custom_input mode (the other six need its own prompt
# suite's annotations: object_class, multiple_objects, scene, appearance_style, color,
# spatial_relationship), with the networks each runs.
DIMENSIONS: dict[str, str] = {
    "subject_consistency": "DINO ViT-B/16",
    "background_consistency": "CLIP ViT-B/32",
    "temporal_flickering": "none (mean absolute difference of consecutive frames)",
    "motion_smoothness": "AMT-S frame interpolation",
    "dynamic_degree": "RAFT optical flow",
    "aesthetic_quality": "CLIP ViT-L/14 + LAION aesthetic head",
    "imaging_quality": "MUSIQ (SPAQ)",
    "human_action": "UMT-L/16 (Kinetics-400)",
    "temporal_style": "ViCLIP (InternVid-10M-FLT)",
    "overall_consistency": "ViCLIP (InternVid-10M-FLT)",
}
PROMPT_DIMENSIONS = ("temporal_style", "overall_consistency")
BOUNDED = ("temporal_flickering", "motion_smoothness", "dynamic_degree", "aesthetic_quality", "imaging_quality")


@dataclass(frozen=True)
class VBenchRow:
    """One VBench dimension on a set of clips: VBench's name for it, VBench's total over the clips,
    VBench's value for each clip (in the order given; None where VBench skipped the clip), and the
    files VBench read (kept only when :func:`evaluate` is given a ``workdir``)."""

    dimension: str
    value: float
    per_video: tuple[float | None, ...]
    files: tuple[str, ...] = ()  # the MP4 files vbench read, in the order it read them (its total sums in this order)

    @property
    def values(self) -> np.ndarray:
        if any(v is None for v in self.per_video):
            skipped = [i for i, v in enumerate(self.per_video) if v is None]
            raise ValueError(f"VBench skipped clips {skipped} in {self.dimension} (unreadable or empty video)")
        return np.array(self.per_video, dtype=np.float64)


def worker_script() -> Path:
    """The worker file run in the environment (imported here only for its path: it imports nothing
    outside the standard library at its top, and bench's code version of these metrics covers it)."""
    from bench.metrics import vbench_worker

    return Path(vbench_worker.__file__)


def videos_uint8(videos: torch.Tensor | np.ndarray) -> np.ndarray:
    """Clips as uint8 frames (N, T, H, W, 3): from bench's (N, T, C, H, W) floats in [-1, 1]
    (one channel repeated to RGB), or passed through if already uint8 (N, T, H, W, 3)."""
    if isinstance(videos, np.ndarray) and videos.dtype == np.uint8:
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"uint8 clips must be (N, T, H, W, 3), got {videos.shape}")
        return videos
    x = torch.as_tensor(videos)
    if x.ndim != 5:
        raise ValueError(f"VBench scores videos (N, T, C, H, W); got a tensor of shape {tuple(x.shape)}")
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[2] == 1:
        x = x.repeat(1, 1, 3, 1, 1)
    return x.permute(0, 1, 3, 4, 2).contiguous().numpy()


def check_dimensions(dimensions: list[str], prompts: list[str] | None) -> None:
    for d in dimensions:
        if d not in DIMENSIONS:
            from bench.registry import UnknownNameError

            raise UnknownNameError("VBench dimension (custom_input mode)", d, list(DIMENSIONS))
        if d in PROMPT_DIMENSIONS and prompts is None:
            raise ValueError(f"VBench's {d} scores (video, prompt) pairs: give a prompt for every clip")


def evaluate(
    videos: torch.Tensor | np.ndarray,
    dimensions: list[str],
    prompts: list[str] | None = None,
    fps: float = 8.0,
    device: str = "cpu",
    workdir: Path | None = None,
    timeout: float | None = None,
) -> list[VBenchRow]:
    """VBench's own evaluation (custom_input mode) of ``videos`` on ``dimensions``, run in the
    ``vbench`` environment. ``workdir`` (default: a temporary directory) keeps the clips (``.npy``
    and the MP4 files VBench read, under ``videos/``) and VBench's own output."""
    check_dimensions(dimensions, prompts)
    clips = videos_uint8(videos)
    if prompts is not None and len(prompts) != len(clips):
        raise ValueError(f"{len(prompts)} prompts for {len(clips)} clips")
    with tempfile.TemporaryDirectory(prefix="bench-vbench-") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, clip in enumerate(clips):
            path = wd / f"{i:05d}.npy"
            np.save(path, clip)
            entries.append({"path": str(path), "name": f"{i:05d}", "prompt": None if prompts is None else prompts[i]})
        req = {"op": "evaluate", "videos": entries, "dimensions": list(dimensions), "fps": fps, "device": device}
        res = run_worker(ENV, worker_script(), req, workdir=wd, timeout=timeout)
    return [VBenchRow(r["dimension"], float(r["value"]), tuple(r["per_video"]), tuple(r["vbench_order"])) for r in res["rows"]]


def missing_weights(dimensions: list[str]) -> dict[str, list[str]]:
    """What vbench would download for ``dimensions`` (empty: all present), asked in its environment."""
    check_dimensions(dimensions, prompts=[])
    return run_worker(ENV, worker_script(), {"op": "missing", "dimensions": list(dimensions)})["missing"]


def fetch(dimensions: list[str]) -> str:
    """Download the weights of ``dimensions`` with vbench's own downloader; returns its cache dir."""
    check_dimensions(dimensions, prompts=[])
    return run_worker(ENV, worker_script(), {"op": "fetch", "dimensions": list(dimensions)})["cache_dir"]


def _metric(dim: str):
    name = f"vbench_{dim}"

    @register_metric(
        name,
        higher_is_better=True,
        data="video",
        consumes=("videos", "prompts") if dim in PROMPT_DIMENSIONS else ("videos",),
        weights=f"VBench {dim}: {DIMENSIONS[dim]} (vbench's cache; `{FETCH_COMMAND} {dim}`)",
        description=f"VBench {dim} (vbench 0.1.5's own evaluation, custom_input mode, in `bench vbench setup`'s environment)",
    )
    def metric(ctx: MetricContext) -> Statistic:
        key = f"{name}_values"
        if key not in ctx.cache:
            prompts = list(ctx.prompts) if (dim in PROMPT_DIMENSIONS and ctx.prompts is not None) else None
            fps = float(getattr(ctx.bundle, "extra", {}).get("fps", 8.0))
            (row,) = evaluate(ctx.samples, [dim], prompts=prompts, fps=fps, device=ctx.device)
            ctx.cache[key] = row.values
        v = ctx.cache[key]
        return Statistic(lambda idx: float(v[idx].mean()), len(v), (0.0, 1.0) if dim in BOUNDED else (-np.inf, np.inf))

    return metric


METRICS = {d: _metric(d) for d in DIMENSIONS}
