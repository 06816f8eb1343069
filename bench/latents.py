"""Start latents from a file, as MLPerf's SDXL protocol fixes them (its ``latents.pt``).

A model's ``latents:`` option names a file of start latents (``.pt``: a tensor saved with
``torch.save``, read with ``weights_only=True``; or ``.npy``), shaped (N, C, H, W) or (C, H, W):
sample k starts from row k mod N instead of bench's seeded noise (the seeds still drive a stochastic
sampler's noise). A path may start with ``$BENCH_HOME/``. Loading the suite pins the file's SHA-256
into the option (so it is part of every job id); the row records ``start_latents``
(``name@sha256[:12]``). A missing or changed file is a :class:`LatentsError` naming the fix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "$BENCH_HOME/"


class LatentsError(ValueError):
    """A start-latents file that is missing, unreadable, changed or of the wrong shape; the message names the fix."""


def _path(value: str, base: Path | None = None) -> Path:
    if value.startswith(PREFIX):
        from bench.paths import bench_home

        return bench_home() / value[len(PREFIX) :]
    p = Path(value).expanduser()
    return p if p.is_absolute() or base is None else (base / p).resolve()


def pin(value: Any, base: Path | None = None) -> dict[str, str]:
    """A suite's ``latents:`` (a path, or ``{path, sha256}``) as ``{path, sha256}``: the path made
    absolute (relative to the suite) and, when the file is here, its SHA-256 checked or filled in."""
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict) or not isinstance(value.get("path"), str) or set(value) - {"path", "sha256"}:
        raise LatentsError("latents: give a file path (.pt or .npy), or {path: FILE, sha256: HEX}")
    out = {"path": value["path"] if value["path"].startswith(PREFIX) else str(_path(value["path"], base))}
    if value.get("sha256"):
        out["sha256"] = str(value["sha256"]).lower()
    p = _path(out["path"])
    if p.is_file():
        out["sha256"] = load(out)[1]
    return out


def load(value: dict[str, str]) -> tuple[torch.Tensor, str]:
    """The latents (float32, N x C x H x W) and the file's SHA-256, checked against a pinned one."""
    p = _path(value["path"])
    if not p.is_file():
        raise LatentsError(
            f"start latents {p} not found; copy the file there (MLPerf's SDXL latents: text_to_image/tools/latents.pt "
            "of github.com/mlcommons/inference) or fix `latents:`"
        )
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if value.get("sha256") and digest != value["sha256"]:
        raise LatentsError(
            f"start latents {p} have sha256 {digest[:16]}..., not the {value['sha256'][:16]}... the suite was loaded "
            "with: the file changed or is truncated; restore it, or load the suite again to pin the new file"
        )
    try:
        if p.suffix == ".npy":
            x = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            x = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LatentsError(f"start latents {p} are unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from e
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or not x.is_floating_point():
        raise LatentsError(f"start latents {p}: expected a float tensor (N, C, H, W) or (C, H, W), got {type(x).__name__}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise LatentsError(f"start latents {p} contain NaN or inf")
    return (x if x.ndim == 4 else x[None]), digest


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str] | None]:
    """A model's options without ``latents``, and the ``latents`` value (None when absent)."""
    if "latents" not in options:
        return options, None
    rest = {k: v for k, v in options.items() if k != "latents"}
    value = options["latents"]
    return rest, value if isinstance(value, dict) else {"path": str(value)}


def attach(bundle: Any, value: dict[str, str]) -> None:
    """Load the latents into ``bundle.extra`` (``start_latents``, ``latents_id``), their shape checked."""
    x, digest = load(value)
    if tuple(x.shape[1:]) != tuple(bundle.sample_shape):
        raise LatentsError(
            f"start latents {value['path']} are {tuple(x.shape[1:])} per sample, the model samples {tuple(bundle.sample_shape)}; "
            "set the model's height/width to the latents' (x the VAE factor), or use latents of this size"
        )
    bundle.extra["start_latents"] = x
    bundle.extra["latents_id"] = f"{Path(value['path']).name}@{digest[:12]}"


def start_noise(bundle: Any, lo: int, hi: int, z: torch.Tensor) -> torch.Tensor:
    """Samples lo..hi's start: rows k mod N of the bundle's latents file, else ``z`` (bench's seeded noise)."""
    x = bundle.extra.get("start_latents")
    if x is None:
        return z
    return x[torch.arange(lo, hi) % len(x)].to(device=z.device, dtype=z.dtype)
