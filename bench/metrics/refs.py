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

    @property
    def identity(self) -> str:
        """``refset/space@<source sha256[:12]>``: which reference a row's set metrics used (the digest
        of the source images or statistics file; of the features for sets built before manifests)."""
        src = self.meta.get("source_sha256") or self.meta.get("features_sha256") or "in-memory"
        return f"{self.refset}/{self.space}@{str(src)[:12]}"


def note_reference(cache: dict, ref: RefStats) -> RefStats:
    """Record ``ref``'s identity in a metric context's cache (the worker writes it as the row's ``reference_id``)."""
    cache.setdefault("reference_ids", {})[ref.space] = ref.identity
    return ref


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


def sha256_folder(files: list[Path], root: Path) -> str:
    """SHA-256 over the sorted (relative path, file SHA-256) pairs of a folder's images."""
    from bench.weights import sha256_file

    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def load_npz_images(path: Path, limit: int | None = None) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The images of a dataset file (``.npz``: ``arr_0`` or ``images``, uint8 N x H x W x 3 as ADM's
    reference batches, or N x 3 x H x W) and its labels (``arr_1`` or ``labels``) when present."""
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("arr_0", "images") if k in z.files), None)
            if key is None:
                raise ValueError(f"{path} holds no image array (arr_0 or images; found {', '.join(z.files) or 'nothing'})")
            x = z[key][:limit] if limit else z[key]
            lab_key = next((k for k in ("arr_1", "labels") if k in z.files), None)
            labels = (z[lab_key][:limit] if limit else z[lab_key]) if lab_key else None
    except ValueError:
        raise
    except Exception as e:  # a torn .npz: BadZipFile, EOFError, OSError...
        raise ValueError(
            f"{path} is not a readable .npz ({type(e).__name__}: {' '.join(str(e).split())[:100]}); re-copy it"
        ) from e
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 N x H x W x 3 (or N x 3 x H x W), got {x.dtype} {x.shape}")
    return list(x), labels


def at_resolution(images: list[np.ndarray], resolution: int) -> list[np.ndarray]:
    """Each image centre-cropped to a square and resized to ``resolution`` x ``resolution`` with
    clean-fid's resize (PIL bicubic on each float channel), then quantised to uint8 as a saved image:
    the real images as a generator at that resolution would be scored."""
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (resolution, resolution))
    out = []
    for im in images:
        h, w = im.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        sq = np.ascontiguousarray(im[top : top + s, left : left + s])
        out.append(sq if s == resolution else np.clip(np.round(resize(sq)), 0, 255).astype(np.uint8))
    return out


def _source_images(
    refset: str, images: Path | None, limit: int | None, npz: Path | None = None
) -> tuple[torch.Tensor | list[np.ndarray], dict]:
    if npz is not None:
        npz = Path(npz).expanduser().resolve()
        if not npz.is_file():
            raise ValueError(f"--npz {npz}: no such file")
        from bench.weights import sha256_file

        ims, labels = load_npz_images(npz, limit)
        meta = {"source": f"dataset file {npz}", "npz": str(npz), "source_sha256": sha256_file(npz)}
        if labels is not None:
            meta["n_classes"] = int(len(np.unique(labels)))
        return ims, meta
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
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = files[:limit] if limit else files
    meta = {"source": f"folder {images}", "images": str(images), "source_sha256": sha256_folder(files, images)}
    return load_images(images, limit), meta


def build(
    refset: str,
    space: str,
    images: Path | None = None,
    limit: int | None = None,
    device: str = "cpu",
    npz: Path | None = None,
    resolution: int | None = None,
) -> Path:
    """Compute and cache the features of ``refset`` in ``space`` from a folder of images (``images``)
    or a dataset file (``npz``), optionally brought to ``resolution`` first (:func:`at_resolution`);
    the record beside the statistics is its manifest: the source's SHA-256, the image count, the
    resolution and the feature extractor. Returns the cache file."""
    fs = _space(space)
    network_id = fs.network_id()  # the weights first: their absence is the error to report
    data, meta = _source_images(refset, images, limit, npz)
    if resolution is not None:
        if isinstance(data, torch.Tensor):
            raise ValueError(f"{refset} is a built-in tensor set; --resolution applies to image folders and dataset files")
        data = at_resolution(data, int(resolution))
        meta["preprocess"] = f"centre crop to a square, clean-fid resize (PIL bicubic) to {resolution}x{resolution}, uint8"
    elif not isinstance(data, torch.Tensor):
        sizes = {im.shape[:2] for im in data}
        meta["preprocess"] = "none (images as stored)"
        resolution = next(iter(sizes))[0] if len(sizes) == 1 and len(set(next(iter(sizes)))) == 1 else None
    feats = np.asarray(fs.extract(data, device), dtype=np.float64)
    meta |= {
        "refset": refset,
        "space": space,
        "n": int(len(feats)),
        "resolution": resolution,
        "feature_extractor": f"{space}: {fs.description} (network {network_id})",
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


def import_stats(refset: str, space: str, stats: Path) -> Path:
    """Cache precomputed FID statistics (``mu``, ``sigma`` in an ``.npz``: MLPerf's ``val2014.npz``,
    the statistics inside ADM's reference batches) as ``refset`` in ``space``, with a manifest naming
    the file and its SHA-256. Only FID can use them: KID, precision/recall and CMMD need features."""
    from bench.weights import sha256_file

    fs = _space(space)
    network_id = fs.network_id()
    stats = Path(stats).expanduser().resolve()
    if not stats.is_file():
        raise ValueError(f"--stats {stats}: no such file")
    try:
        with np.load(stats, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except Exception as e:
        raise ValueError(
            f"{stats} is not an .npz with mu and sigma ({type(e).__name__}: {' '.join(str(e).split())[:100]})"
        ) from e
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{stats}: mu {mu.shape} and sigma {sigma.shape} are not a finite mean and covariance")
    feats = np.zeros((0, d), np.float32)
    meta = {
        "refset": refset,
        "space": space,
        "source": f"precomputed statistics {stats}",
        "stats": str(stats),
        "source_sha256": sha256_file(stats),
        "stats_only": True,
        "n": None,
        "resolution": None,
        "preprocess": "unknown: the statistics were computed elsewhere",
        "feature_extractor": f"{space}: {fs.description} (network {network_id}) for the generated images",
        "dim": int(d),
        "network_id": network_id,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "features_sha256": hashlib.sha256(feats.tobytes()).hexdigest()[:16],
    }
    path = cache_path(refset, space)

    def save(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, feats=feats, mu=mu, sigma=sigma)

    atomic_write(path, save)
    write_json(path.with_suffix(".json"), meta)
    _load_cached.cache_clear()
    return path


def require_features(ref: RefStats, metric: str) -> np.ndarray:
    """The reference's features; a statistics-only reference (:func:`import_stats`) is an error naming the fix."""
    if len(ref.feats) == 0:
        raise MissingReferenceError(
            f"{metric} needs the reference's features, and {ref.refset!r} holds only FID's mean and covariance "
            f"(imported from {ref.meta.get('stats')}); build it from images: "
            f"`bench ref build {ref.refset} --images DIR|--npz FILE --features {ref.space}`"
        )
    return ref.feats


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
    digest = hashlib.sha256(feats.astype(np.float32).tobytes()).hexdigest()[:16]
    return RefStats(
        refset, "digits", feats, feats.mean(0), np.cov(feats, rowvar=False), {"source": "in memory", "features_sha256": digest}
    )


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
