"""Reference sets and their cached statistics (``bench ref build REFSET``, like EDM's ``fid.py ref``).

A reference set is a named collection of real images: ``digits-train`` / ``digits-heldout`` are
built in; any folder of images becomes one with ``bench ref build NAME --images DIR``. Its features
in a feature space (``digits``, ``inception``, ``clip-l14-336``) are computed once and cached under
``$BENCH_HOME/refs/NAME/SPACE.npz`` with the mean and covariance (for FID) and the features
themselves (for KID, precision/recall and CMMD), stamped with the feature network's hash so a
cache made with other weights is never used.

Each feature space is defined by the module of its network and registered here
(:func:`register_space`); this module imports none of them, and importing :mod:`bench.metrics`
registers them all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from bench.io import WeightsError, atomic_write, write_json
from bench.paths import bench_home

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN = {"digits-train": "train", "digits-heldout": "heldout"}


class MissingReferenceError(WeightsError):
    """Reference statistics that have not been built (a cached artifact, like weights)."""


@dataclass(frozen=True)
class FeatureSpace:
    name: str
    description: str
    extract: Callable[[torch.Tensor | list[np.ndarray], str], np.ndarray]  # (images, device) -> (N, D) float64
    network_id: Callable[[], str]


@dataclass
class RefStats:
    refset: str
    space: str
    feats: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    meta: dict


def sha_file(path: Path) -> str:
    """The id of a feature network: the first 16 hex digits of its weights file's SHA-256
    (cached by path, size and modification time)."""
    return _sha_cached(str(path), path.stat().st_size, path.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _sha_cached(path: str, size: int, mtime: int) -> str:
    from bench.weights import sha256_file

    return sha256_file(Path(path))[:16]


SPACES: dict[str, FeatureSpace] = {}
"""The feature spaces by name. Each feature-space module (:mod:`bench.metrics.digits`,
:mod:`bench.metrics.inception`, :mod:`bench.metrics.clip`) registers its own on import; importing
:mod:`bench.metrics` registers them all. This module imports none of them."""


def register_space(space: FeatureSpace) -> FeatureSpace:
    """Add ``space`` to :data:`SPACES` under its name (for the module that defines it)."""
    SPACES[space.name] = space
    return space


def refs_dir() -> Path:
    return bench_home() / "refs"


def _check_name(refset: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", refset):
        raise ValueError(f"reference set name {refset!r}: use letters, digits, '.', '_' and '-'")
    return refset


def cache_path(refset: str, space: str) -> Path:
    return refs_dir() / _check_name(refset) / f"{space}.npz"


def _space(space: str) -> FeatureSpace:
    if space not in SPACES:
        from bench.registry import UnknownNameError

        err = UnknownNameError("feature space", space, list(SPACES))
        if not SPACES:  # importing the package bench.metrics registers them all
            err.args = (f"unknown feature space {space!r}: none is registered (import bench.metrics first)",)
        raise err
    return SPACES[space]


def load_images(folder: Path, limit: int | None = None) -> list[np.ndarray]:
    """Every image under ``folder`` (sorted paths) as an RGB uint8 (H,W,3) array."""
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    files = files[:limit] if limit else files
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in files]


def _source_images(refset: str, images: Path | None, limit: int | None) -> tuple[torch.Tensor | list[np.ndarray], dict]:
    if refset in BUILTIN:
        from bench.data import digits

        x = digits(BUILTIN[refset])[0]
        return (x[:limit] if limit else x), {"source": f"bench.data.digits('{BUILTIN[refset]}')"}
    if images is None:
        known = {}
        d = refs_dir() / _check_name(refset)
        for p in d.glob("*.json"):
            known = json.loads(p.read_text())
            break
        if "images" not in known:
            raise MissingReferenceError(
                f"unknown reference set {refset!r}: built in are {', '.join(BUILTIN)}; "
                f"make a folder of images one with `bench ref build {refset} --images DIR`"
            )
        images = Path(known["images"])
    images = Path(images).expanduser().resolve()
    if not images.is_dir():
        raise ValueError(f"--images {images}: not a directory")
    return load_images(images, limit), {"source": f"folder {images}", "images": str(images)}


def build(refset: str, space: str, images: Path | None = None, limit: int | None = None, device: str = "cpu") -> Path:
    """Compute and cache the features of ``refset`` in ``space``; returns the cache file."""
    fs = _space(space)
    network_id = fs.network_id()  # the weights first: their absence is the error to report
    data, meta = _source_images(refset, images, limit)
    feats = np.asarray(fs.extract(data, device), dtype=np.float64)
    meta |= {
        "refset": refset,
        "space": space,
        "n": int(len(feats)),
        "dim": int(feats.shape[1]),
        "network_id": network_id,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "features_sha256": hashlib.sha256(feats.astype(np.float32).tobytes()).hexdigest()[:16],
    }
    path = cache_path(refset, space)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)

    def save(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, feats=feats.astype(np.float32), mu=mu, sigma=sigma)

    atomic_write(path, save)
    write_json(path.with_suffix(".json"), meta)
    _load_cached.cache_clear()
    return path


class CorruptReferenceError(MissingReferenceError):
    """Cached reference statistics that cannot be read, or are not what their record says."""


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The cache file's arrays and record, checked: readable, the features' digest the record's,
    shapes consistent. Raises :class:`ValueError` saying what is wrong."""
    try:
        meta = json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"its record {Path(path).with_suffix('.json')} is unreadable ({type(e).__name__})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"its record {Path(path).with_suffix('.json')} is not a mapping")
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, mu, sigma = z["feats"], z["mu"], z["sigma"]
    except Exception as e:  # a torn .npz: BadZipFile, EOFError, KeyError, OSError, ValueError...
        raise ValueError(f"it is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:100]})") from e
    digest = hashlib.sha256(np.ascontiguousarray(feats, dtype=np.float32).tobytes()).hexdigest()[:16]
    if digest != meta.get("features_sha256"):
        raise ValueError(f"its features do not match its record's features_sha256 ({digest} != {meta.get('features_sha256')})")
    d = feats.shape[1] if feats.ndim == 2 else -1
    if d < 1 or mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(f"its arrays have inconsistent shapes (feats {feats.shape}, mu {mu.shape}, sigma {sigma.shape})")
    return feats.astype(np.float64), mu, sigma, meta


@lru_cache(maxsize=4)
def _digits_in_memory(refset: str) -> RefStats:
    from bench.data import digits

    feats = _space("digits").extract(digits(BUILTIN[refset])[0], "cpu")
    return RefStats(refset, "digits", feats, feats.mean(0), np.cov(feats, rowvar=False), {"source": "in memory"})


def load(refset: str, space: str) -> RefStats:
    """The cached statistics of ``refset`` in ``space``; the built-in digits sets in the digits
    space are computed in memory when not cached (a fraction of a second)."""
    fs = _space(space)
    path = cache_path(refset, space)
    fix = f"`bench ref build {refset} --features {space}`" + ("" if refset in BUILTIN else " (add --images DIR the first time)")
    if not path.is_file():
        if refset in BUILTIN and space == "digits":
            return _digits_in_memory(refset)
        raise MissingReferenceError(f"reference statistics of {refset!r} in the {space} feature space are not built; run {fix}")
    try:
        feats, mu, sigma, meta = _load_cached(str(path), path.stat().st_mtime_ns)
    except ValueError as e:
        raise CorruptReferenceError(
            f"reference statistics {path} are corrupt: {e}; rebuild them with {fix} (or delete the file)"
        ) from None
    current = fs.network_id()
    if meta.get("network_id") != current:
        if refset in BUILTIN and space == "digits":
            return _digits_in_memory(refset)
        raise MissingReferenceError(
            f"reference statistics {path} were made with another {space} network ({meta.get('network_id')} != {current}); "
            f"rebuild them with {fix}"
        )
    return RefStats(refset, space, feats, mu, sigma, meta)


def listing() -> list[dict]:
    """Every cached reference (its metadata), plus the built-in sets not yet cached."""
    out = []
    for p in sorted(refs_dir().glob("*/*.json")):
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            out.append({"refset": p.parent.name, "space": p.stem, "path": str(p.with_suffix(".npz")), "n": "corrupt record"})
            continue
        out.append(meta | {"path": str(p.with_suffix(".npz"))})
    cached = {(m.get("refset"), m.get("space")) for m in out}
    for name in BUILTIN:
        if (name, "digits") not in cached:
            out.append({"refset": name, "space": "digits", "path": "(computed in memory when used)", "n": None})
    return out
