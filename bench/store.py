"""The content-addressed job store: finished jobs (row + samples).

A finished job is kept under the hash of everything that determines its row (the job's own
key: model weights, method code, knobs, steps, guidance, seed, sample count; plus how it was
evaluated: metrics and their code, bootstrap, batch size, warm-up, device type), so a re-run of
an unchanged suite finds it and copies its row instead of computing it again. Trained artifacts
have their own store (:mod:`bench.artifacts`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.io import atomic_write, fsync_dir, write_json
from bench.paths import within

ROW = "row.json"  # written last: its presence means the entry is complete
SAMPLES = "samples.npy"
ARTIFACT_META = "artifact.json"


def content_key(spec: Any, length: int = 20) -> str:
    """Hex SHA-256 of a JSON-serialisable spec (keys sorted), truncated to ``length``."""
    blob = json.dumps(spec, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class StoredJob:
    """A finished job in the store: its row and where its samples are."""

    key: str
    row: dict[str, Any]
    samples: Path | None


class JobStore:
    """Finished jobs by content key: ``<root>/jobs/<key>/{samples.npy, row.json}``.

    An entry counts only when its samples are what its row says they are (:func:`check_samples`:
    present, readable, with the row's digest); an entry that fails the check is not returned and
    is listed in ``rejected`` (key, why), so the caller recomputes the job and can say why."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.rejected: list[tuple[str, str]] = []

    def path(self, key: str) -> Path:
        return within(self.root, "jobs", key)

    def get(self, key: str) -> StoredJob | None:
        """The finished, verified entry, or None when absent, incomplete (no row yet) or torn."""
        d = self.path(key)
        try:
            row = json.loads((d / ROW).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(row, dict):
            return None
        samples = d / SAMPLES
        why = check_samples(samples, row)
        if why is not None:
            self.rejected.append((key, why))
            return None
        return StoredJob(key, row, samples if samples.is_file() else None)

    def put(self, key: str, row: dict[str, Any], samples: np.ndarray | None) -> StoredJob:
        """Write samples, then the row (the commit marker), each atomically and durably."""
        d = self.path(key)
        if samples is not None:
            atomic_write(d / SAMPLES, lambda p: save_npy(p, samples))
        write_json(d / ROW, row)
        return StoredJob(key, row, d / SAMPLES if samples is not None else None)


class SamplesError(ValueError):
    """A samples file that cannot be read (missing, torn, not an array); the message names it."""


def load_samples(path: Path) -> np.ndarray:
    """The array in ``path``; a file that is not a whole array raises :class:`SamplesError` naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # a torn .npy raises EOFError, ValueError, OSError...
        raise SamplesError(
            f"cannot read {path} ({type(e).__name__}: {' '.join(str(e).split())[:120]}); the file is torn or not "
            "bench's: `bench run SUITE --resume RUN_ID` redoes the job"
        ) from None


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to exactly ``path`` (np.save given a name would add ``.npy``), closed at once."""
    with open(path, "wb") as f:
        np.save(f, array)


def check_samples(path: Path, row: dict[str, Any]) -> str | None:
    """Why the samples file of a finished row cannot be trusted (missing, unreadable or torn, or not
    the samples the row's ``samples_sha256`` names), or None when it can. A row without a digest
    (written before rows had one, or a failed job) asks only that a file that is there loads with
    the row's sample count."""
    if row.get("status") != "ok":
        return None
    digest = row.get("samples_sha256")
    if not path.is_file():
        return "is missing" if digest else None
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # a torn .npy raises EOFError, ValueError, OSError...
        return f"is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    n = row.get("n_samples")
    if isinstance(n, int) and (x.ndim == 0 or x.shape[0] != n):
        return f"holds shape {x.shape}, not {n} samples"
    if digest and samples_digest(x) != digest:
        return f"does not match the row's samples_sha256 ({x.dtype}, shape {x.shape})"
    return None


def samples_digest(samples: np.ndarray) -> str:
    """sha256 of the samples' dtype, shape and values (C order): two jobs' digests are equal exactly
    when their samples are bit-identical, which ``bench compare`` can then tell from the results
    tables alone."""
    a = np.ascontiguousarray(samples)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def link_or_copy(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` atomically: a hard link where the file system allows, else a copy.

    Store entries are replaced by rename, never edited in place, so a hard link keeps the
    samples of the run that made it even if the entry is later recomputed (``--fresh``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
