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

from bench.io import atomic_write, write_json

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
    """Finished jobs by content key: ``<root>/jobs/<key>/{samples.npy, row.json}``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / "jobs" / key

    def get(self, key: str) -> StoredJob | None:
        """The finished entry, or None when absent or incomplete (no row yet)."""
        d = self.path(key)
        try:
            row = json.loads((d / ROW).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        samples = d / SAMPLES
        return StoredJob(key, row, samples if samples.is_file() else None)

    def put(self, key: str, row: dict[str, Any], samples: np.ndarray | None) -> StoredJob:
        """Write samples, then the row (the commit marker), each atomically."""
        d = self.path(key)
        if samples is not None:
            atomic_write(d / SAMPLES, lambda p: np.save(p.open("wb"), samples))
        write_json(d / ROW, row)
        return StoredJob(key, row, d / SAMPLES if samples is not None else None)


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
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
