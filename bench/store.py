"""Content-addressed stores: finished jobs (row + samples) and trained artifacts.

A finished job is kept under the hash of everything that determines its row (the job's own
key: model weights, method code, knobs, steps, guidance, seed, sample count; plus how it was
evaluated: metrics and their code, bootstrap, batch size, warm-up, device type), so a re-run of
an unchanged suite finds it and copies its row instead of computing it again.

A trained artifact (a calibration table, a distilled student) is kept under the hash of its
spec and built at most once: the first caller takes an exclusive file lock and builds into a
temporary directory that is renamed into place; every other caller, in this process or any
other on a machine sharing the directory, waits on the lock and then loads the finished one.
A builder that dies releases the lock (the kernel drops ``flock`` locks with the process), so
the next caller builds it again; a half-built artifact is never visible.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.io import atomic_write, write_json
from bench.paths import bench_home

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


@dataclass(frozen=True)
class Artifact:
    """A finished trained artifact: its directory, its metadata, and whether this call built it."""

    key: str
    path: Path
    meta: dict[str, Any]
    built: bool


class ArtifactStore:
    """Trained artifacts by spec: ``<root>/<key>/`` (with ``artifact.json``), built once under a lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, spec: Any) -> Path:
        return self.root / content_key(spec)

    def get(self, spec: Any) -> Artifact | None:
        d = self.path(spec)
        try:
            meta = json.loads((d / ARTIFACT_META).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return Artifact(d.name, d, meta, built=False)

    @contextmanager
    def _lock(self, key: str):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{key}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process builds this artifact
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get_or_build(self, spec: Any, build: Callable[[Path], dict[str, Any] | None]) -> Artifact:
        """The artifact for ``spec``; if absent, ``build(tmp_dir)`` writes it (returning extra
        metadata such as its training cost) and it is renamed into place.

        Concurrent callers with the same spec build it once: the others wait and get the
        finished artifact (``built`` is False for them)."""
        found = self.get(spec)
        if found is not None:
            return found
        key = content_key(spec)
        with self._lock(key):
            found = self.get(spec)  # built by whoever held the lock before us
            if found is not None:
                return found
            final = self.root / key
            tmp = self.root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.mkdir(parents=True)
            try:
                t0 = time.perf_counter()
                extra = build(tmp) or {}
                meta = {
                    "spec": spec,
                    "build_wall_s": time.perf_counter() - t0,
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    **extra,
                }
                write_json(tmp / ARTIFACT_META, meta)
                if final.exists():  # an incomplete leftover without artifact.json
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return Artifact(key, final, json.loads((final / ARTIFACT_META).read_text()), built=True)


def default_artifact_store() -> ArtifactStore:
    """The artifact store shared by all runs: ``$BENCH_HOME/artifacts`` (a shared directory on
    a cluster, so that every node finds what one node trained)."""
    return ArtifactStore(bench_home() / "artifacts")
