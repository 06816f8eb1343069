"""Artifacts: one contract for everything trained or calibrated (students, calibrations, GITS).

A method declares the artifacts a job needs as :class:`ArtifactSpec` s (:meth:`MethodAdapter.artifacts`)
and builds one when asked (:meth:`MethodAdapter.build`). A spec holds what determines the
artifact: the method and which of its artifacts (``name``), the teacher (name, options, weights
hash), the method's code version (every project file its module imports, :mod:`bench.codeversion`),
the knobs marked ``trains`` and the budget (``params``), and its parent artifacts (a chain:
progressive distillation's stages, reflow then distil). Its key is the hash of all that.

The :class:`ArtifactStore` keeps finished artifacts by key (``$BENCH_HOME/artifacts/<key>/`` with
``artifact.json``) and builds each at most once across processes, Ray workers and machines sharing
the directory: the builder holds an exclusive ``flock`` (released by the kernel when it dies), works
in a stable directory ``.work/<key>/`` whose checkpoints a killed build resumes from, writes the
finished files into ``.work/<key>/out/`` and renames that into place. A half-built artifact is
never visible.

The harness, not the method, keeps the record (:class:`BuildContext`): wall seconds, device,
optimiser steps, forwards of the teacher network (counted by a hook on it), training samples
drawn, final loss, the build's sessions (a resumed build has several) and its parents; the
chain's total cost (this artifact plus every ancestor) is what a job's row reports.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from bench.accounting import ForwardCounter
from bench.bundle import ModelBundle
from bench.codeversion import code_version
from bench.io import atomic_write, fsync_path, write_json
from bench.paths import bench_home, within
from bench.store import content_key

if TYPE_CHECKING:
    from bench.adapter import MethodAdapter

RECORD = "artifact.json"
CHECKPOINT = "ckpt.pt"
PROGRESS = "progress.json"
COST_FIELDS = ("wall_s", "optimizer_steps", "teacher_calls", "teacher_rows", "samples_drawn")


class BuildError(RuntimeError):
    """An artifact that could not be built; the message names the artifact and the cause."""


@dataclass(frozen=True, eq=False)
class ArtifactSpec:
    """What determines an artifact (see the module docstring); ``key`` names it in the store.

    ``knobs`` (every knob of the method, to rebuild the adapter in another process) and ``budget``
    (what the planner's cost estimate reads: ``teacher_rows``, ``optimizer_steps``, ``batch_size``)
    are carried along but are not part of the key: the knobs that matter are in ``params``."""

    method: str
    name: str
    model: Mapping[str, Any]
    code: str
    params: Mapping[str, Any]
    parents: tuple[ArtifactSpec, ...] = ()
    knobs: Mapping[str, Any] = field(default_factory=dict)
    budget: Mapping[str, float] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "name": self.name,
            "model": dict(self.model),
            "code": self.code,
            "params": dict(self.params),
            "parents": [p.key for p in self.parents],
        }

    @cached_property
    def key(self) -> str:
        return content_key(self.identity())

    @property
    def label(self) -> str:
        return f"{self.method}:{self.name} on {self.model.get('name')} ({self.key[:8]})"

    def chain(self) -> list[ArtifactSpec]:
        """This spec and its ancestors, parents first, each once."""
        out: list[ArtifactSpec] = []
        seen: set[str] = set()

        def visit(s: ArtifactSpec) -> None:
            if s.key in seen:
                return
            for p in s.parents:
                visit(p)
            seen.add(s.key)
            out.append(s)

        visit(self)
        return out


def artifact_spec(
    method: MethodAdapter,
    bundle: ModelBundle,
    name: str,
    params: Mapping[str, Any] | None = None,
    parents: tuple[ArtifactSpec, ...] = (),
    budget: Mapping[str, float] | None = None,
    knobs: list[str] | None = None,
) -> ArtifactSpec:
    """The spec of ``method``'s artifact ``name`` on the teacher ``bundle``: the method's knobs
    marked ``trains`` (or only those of them named in ``knobs``: a parent artifact that the later
    knobs do not change, such as a student's teacher pairs) plus ``params`` (anything else that
    changes it, e.g. a calibration's steps or the guidance scale distilled)."""
    trained = method.training_knobs()
    if knobs is not None:
        trained = {k: v for k, v in trained.items() if k in knobs}
    return ArtifactSpec(
        method=method.name,
        name=name,
        model=bundle.identity,
        code=code_version(type(method).__module__),
        params={**trained, **dict(params or {})},
        parents=tuple(parents),
        knobs=dict(method.config),
        budget=dict(budget or {}),
    )


@dataclass(frozen=True)
class Artifact:
    """A finished artifact: its key, directory and record, and whether this call built it."""

    key: str
    path: Path
    record: dict[str, Any]
    built: bool = False

    @property
    def cost(self) -> dict[str, Any]:
        """This artifact's own build cost (without its parents)."""
        return dict(self.record.get("cost", {}))

    @property
    def chain_cost(self) -> dict[str, Any]:
        """The cost of this artifact and of every ancestor it was built from."""
        return dict(self.record.get("chain_cost", self.cost))

    # kept for the older callers that read ``meta``
    @property
    def meta(self) -> dict[str, Any]:
        return self.record


def plan_order(specs: list[ArtifactSpec]) -> list[ArtifactSpec]:
    """Every spec of ``specs`` and their ancestors, each once, parents before children."""
    out: list[ArtifactSpec] = []
    seen: set[str] = set()
    for s in specs:
        for c in s.chain():
            if c.key not in seen:
                seen.add(c.key)
                out.append(c)
    return out


def sum_costs(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of the numeric cost fields; devices joined."""
    out: dict[str, Any] = {k: 0 for k in COST_FIELDS}
    out["wall_s"] = 0.0
    devices: list[str] = []
    for c in costs:
        for k in COST_FIELDS:
            out[k] += c.get(k, 0) or 0
        d = c.get("device")
        if d and d not in devices:
            devices.append(d)
    out["device"] = ",".join(devices)
    return out


def files_digest(root: Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``root`` but the record."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != RECORD):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class BuildContext:
    """What a build gets: the spec, the teacher ``bundle``, its finished ``parents`` (by spec name),
    a stable ``work`` directory (checkpoints), the ``out`` directory for the finished files, the
    device, and the ledger the harness keeps of its cost.

    A method's build calls :meth:`resume` once (the state of its last :meth:`checkpoint`, or None),
    :meth:`checkpoint` now and then, :meth:`progress` as it goes, and :meth:`note` for what only it
    knows (optimiser steps, samples drawn, final loss). The teacher's forwards are counted by a
    hook on the teacher network (and on any network passed to :meth:`count_as_teacher`)."""

    def __init__(
        self,
        spec: ArtifactSpec,
        bundle: ModelBundle,
        work: Path,
        parents: dict[str, Artifact],
        device: str = "cpu",
        progress: bool = False,
    ) -> None:
        self.spec = spec
        self.bundle = bundle
        self.work = Path(work)
        self.out = self.work / "out"
        self.parents = parents
        self.device = device
        self.show_progress = progress
        self.counters: list[ForwardCounter] = []
        self.prior: dict[str, Any] = {k: 0 for k in COST_FIELDS} | {"wall_s": 0.0, "sessions": []}
        self.noted: dict[str, Any] = {}
        self.resumed_from: int = 0
        self.t0 = time.perf_counter()
        self._bar: tqdm | None = None
        self._last_progress = 0.0

    # --- what a build uses ------------------------------------------------------------------

    def parent(self, name: str) -> Artifact:
        """The finished parent artifact whose spec is called ``name``."""
        if name not in self.parents:
            raise BuildError(f"{self.spec.label}: no parent artifact {name!r}; it has {', '.join(self.parents) or 'none'}")
        return self.parents[name]

    def count_as_teacher(self, net: torch.nn.Module) -> ForwardCounter:
        """Count ``net``'s forwards as teacher forwards (the bundle's network is counted already)."""
        c = ForwardCounter(net).__enter__()
        self.counters.append(c)
        return c

    def resume(self) -> dict[str, Any] | None:
        """The state saved by the last :meth:`checkpoint` of an earlier attempt (None: start fresh);
        the ledger of that attempt is carried on."""
        path = self.work / CHECKPOINT
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a checkpoint that cannot be read is not trusted: start over
            print(f"{self.spec.label}: checkpoint {path} unreadable ({type(e).__name__}); starting over", file=sys.stderr)
            return None
        ledger = json.loads(saved["ledger"])
        self.prior = ledger
        self.resumed_from = int(ledger.get("step", 0))
        return saved["state"]

    def checkpoint(self, state: dict[str, Any], step: int) -> None:
        """Save ``state`` (tensors, numbers, strings, lists and dicts of them) with the ledger so far,
        atomically: a build killed after this resumes from here."""
        blob = {"state": state, "ledger": json.dumps(self.ledger(step))}
        atomic_write(self.work / CHECKPOINT, lambda p: torch.save(blob, p))

    def note(self, **fields: Any) -> None:
        """Record what the method knows of its build: ``optimizer_steps``, ``samples_drawn``,
        ``final_loss``, or anything else worth keeping (JSON values)."""
        self.noted.update(fields)

    def note_training(self, res: Any) -> None:
        """Record a finished :func:`bench.training.fit`: optimiser steps, samples drawn, the loss at the
        start and end, and a thinned loss curve (so a record shows the loss falling)."""
        losses = list(res.losses)
        head = losses[: max(1, len(losses) // 20)]
        self.note(
            optimizer_steps=int(res.steps),
            samples_drawn=int(res.steps) * int(res.extra.get("batch_size", 0) or 0) or self.noted.get("samples_drawn", 0),
            first_loss=sum(head) / len(head) if head else float("nan"),
            final_loss=float(res.final_loss),
            loss_curve=[round(float(v), 6) for v in losses[:: max(1, len(losses) // 50)]],
        )

    def progress(self, step: int, total: int, loss: float | None = None, what: str = "train") -> None:
        """Show and record progress (a terminal bar when enabled; ``progress.json`` in the work
        directory for a driver to read, at most once a second)."""
        if self.show_progress:
            if self._bar is None:
                self._bar = tqdm(total=total, initial=step, desc=f"build {self.spec.method}:{self.spec.name}", unit="step",
                                 file=sys.stderr)  # fmt: skip
            self._bar.n = step
            if loss is not None:
                self._bar.set_postfix_str(f"{what} loss {loss:.4g}", refresh=False)
            self._bar.refresh()
        now = time.perf_counter()
        if now - self._last_progress >= 1.0 or step >= total:
            self._last_progress = now
            rate = (step - self.resumed_from) / max(now - self.t0, 1e-9)
            eta = (total - step) / rate if rate > 0 else None
            info = {"step": step, "total": total, "loss": loss, "what": what, "eta_s": eta, "label": self.spec.label}
            try:
                write_json(self.work / PROGRESS, info)
            except OSError:
                pass

    # --- the ledger ------------------------------------------------------------------------

    def _session(self, step: int | None) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "resumed_from_step": self.resumed_from,
            "reached_step": step,
            "wall_s": time.perf_counter() - self.t0,
        }

    def ledger(self, step: int | None = None) -> dict[str, Any]:
        """The cost so far: earlier attempts (as of their last checkpoint) plus this one."""
        rows = sum(c.rows for c in self.counters)
        calls = sum(c.calls for c in self.counters)
        led = {
            "wall_s": float(self.prior.get("wall_s", 0.0)) + time.perf_counter() - self.t0,
            "teacher_rows": int(self.prior.get("teacher_rows", 0)) + rows,
            "teacher_calls": int(self.prior.get("teacher_calls", 0)) + calls,
            "optimizer_steps": int(self.noted.get("optimizer_steps", self.prior.get("optimizer_steps", 0))),
            "samples_drawn": int(self.noted.get("samples_drawn", self.prior.get("samples_drawn", 0))),
            "step": step if step is not None else int(self.prior.get("step", 0)),
            "sessions": [*self.prior.get("sessions", []), self._session(step)],
        }
        return led

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for c in self.counters:  # the hooks go; the counts stay for the ledger
            if c._handle is not None:
                c.__exit__(None, None, None)
                c._handle = None


def _stat_key(root: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    )


_VERIFIED: dict[tuple[str, str, tuple[tuple[str, int, int], ...]], str | None] = {}


def _verify(root: Path, digest: str) -> str | None:
    """Why the files of a finished artifact are not those its record's ``digest`` names (None: they
    are). Checked once per state of the files (paths, sizes, modification times)."""
    if not digest:
        return "its record has no digest of its files"
    try:
        key = (str(root), digest, _stat_key(root))
    except OSError as e:
        return f"its files cannot be read ({e})"
    if key not in _VERIFIED:
        try:
            actual = files_digest(root)
        except OSError as e:
            _VERIFIED[key] = f"its files cannot be read ({e})"
        else:
            _VERIFIED[key] = None if actual == digest else f"its files do not match its record's digest ({actual} != {digest})"
        if _VERIFIED[key] is not None:  # said once per state of the files
            print(f"bench: artifact {root}: {_VERIFIED[key]}; it is not used, and is built again", file=sys.stderr)
    return _VERIFIED[key]


class ArtifactStore:
    """Finished artifacts by key under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.rejected: list[tuple[str, str]] = []  # (key, why) of finished artifacts that failed their check

    def path(self, key: str) -> Path:
        return within(self.root, key)

    def work_dir(self, key: str) -> Path:
        return within(self.root / ".work", key)

    def get(self, key: str) -> Artifact | None:
        """The finished artifact ``key``, or None: absent, its record unreadable, or its files not
        those of the record's ``digest`` (torn or altered: it is listed in ``rejected``, reported
        on stderr, and built again by :meth:`get_or_build`; never loaded)."""
        d = self.path(key)
        try:
            record = json.loads((d / RECORD).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict):
            return None
        why = _verify(d, str(record.get("digest", "")))
        if why is not None:
            self.rejected.append((key, why))
            return None
        return Artifact(key, d, record, built=False)

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """An exclusive lock on ``key`` across processes (blocks while another holds it)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(within(locks, f"{key}.lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get_or_build(self, key: str, build: Any, describe: dict[str, Any] | None = None) -> Artifact:
        """The artifact ``key``; if absent, ``build(out_dir, work_dir) -> record fields`` makes it
        (under the lock, so concurrent callers build it once; the others wait and load it). The
        work directory is stable across attempts; the out directory is emptied before each."""
        found = self.get(key)
        if found is not None:
            return found
        with self.lock(key):
            found = self.get(key)  # built by whoever held the lock before us
            if found is not None:
                return found
            work = self.work_dir(key)
            out = work / "out"
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            fields = build(out, work) or {}
            record = {"key": key, **(describe or {}), **fields, "digest": files_digest(out)}
            record |= {"built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid()}
            write_json(out / RECORD, record)
            for f in out.rglob("*"):  # every file on the disk before the rename publishes them
                if f.is_file():
                    fsync_path(f)
            final = self.path(key)
            if final.exists():  # a leftover without a readable record, or one whose files failed their check
                shutil.rmtree(final)
            os.replace(out, final)
            fsync_path(final.parent)
            shutil.rmtree(work, ignore_errors=True)
        return Artifact(key, final, json.loads((final / RECORD).read_text()), built=True)

    def keys(self) -> list[str]:
        return (
            sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")) if self.root.is_dir() else []
        )


def default_artifact_store() -> ArtifactStore:
    """The artifact store shared by all runs: ``$BENCH_HOME/artifacts`` (a shared directory on a
    cluster, so that every node finds what one node trained)."""
    return ArtifactStore(bench_home() / "artifacts")


def ensure(
    spec: ArtifactSpec,
    bundle: ModelBundle,
    store: ArtifactStore | None = None,
    method: MethodAdapter | None = None,
    device: str | None = None,
    progress: bool = False,
) -> Artifact:
    """The finished artifact ``spec``, built (with its missing ancestors) if absent; built once
    across processes. A build failure raises :class:`BuildError` naming the artifact."""
    store = store or default_artifact_store()
    found = store.get(spec.key)
    if found is not None:
        return found
    parents = {p.name: ensure(p, bundle, store, None, device, progress) for p in spec.parents}
    if method is None or method.name != spec.method or dict(method.config) != dict(spec.knobs):
        from bench.registry import METHODS

        method = METHODS.get(spec.method)(**dict(spec.knobs))
    dev = device or str(next(iter(bundle.denoiser.net.parameters()), torch.empty(0)).device)

    def build(out: Path, work: Path) -> dict[str, Any]:
        ctx = BuildContext(spec, bundle, work, parents, dev, progress)
        ctx.count_as_teacher(bundle.denoiser.net)
        try:
            with torch.random.fork_rng(devices=[]):  # a build never moves the caller's global RNG
                method.build(spec, ctx)
        except Exception as e:
            raise BuildError(f"building {spec.label} failed: {type(e).__name__}: {e}") from e
        finally:
            ctx.close()
        led = ctx.ledger(ctx.noted.get("optimizer_steps"))
        own = {k: led[k] for k in COST_FIELDS} | {"device": dev, "sessions": led["sessions"]}
        own |= {k: v for k, v in ctx.noted.items() if k not in own}
        # every ancestor once, even when two parents share one (a chain is a DAG, not a tree)
        chain = sum_costs([own, job_cost(list(parents.values()))]) if parents else sum_costs([own])
        return {
            "cost": own,
            "chain_cost": chain,
            "parents": {name: p.key for name, p in parents.items()},
            "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()},
        }

    return store.get_or_build(spec.key, build, describe=spec.identity() | {"budget": dict(spec.budget)})


def ensure_all(
    method: MethodAdapter,
    bundle: ModelBundle,
    steps: int,
    guidance: float | None,
    store: ArtifactStore | None = None,
    progress: bool = False,
) -> dict[str, Artifact]:
    """Every artifact ``method`` needs for a job (and their ancestors), by key; built if absent."""
    out: dict[str, Artifact] = {}
    for spec in method.artifacts(bundle, steps, guidance):
        for s in spec.chain():
            if s.key not in out:
                out[s.key] = ensure(s, bundle, store, method if s is spec else None, progress=progress)
    return out


def load_all(specs: list[ArtifactSpec], store: ArtifactStore | None = None) -> dict[str, Artifact]:
    """The finished artifacts of ``specs`` and their ancestors, by key; a missing one is an error."""
    store = store or default_artifact_store()
    out: dict[str, Artifact] = {}
    for s in plan_order(specs):
        a = store.get(s.key)
        if a is None:
            raise BuildError(f"artifact {s.label} is not built; `bench build SUITE` builds a suite's artifacts")
        out[s.key] = a
    return out


def job_cost(artifacts: list[Artifact]) -> dict[str, Any]:
    """A job's training cost: the chains of the artifacts it uses, each ancestor counted once."""
    seen: dict[str, dict[str, Any]] = {}

    def visit(a: Artifact, store_root: Path) -> None:
        if a.key in seen:
            return
        seen[a.key] = a.cost
        for pk in a.record.get("parents", {}).values():
            p = ArtifactStore(store_root).get(pk)
            if p is not None:
                visit(p, store_root)

    for a in artifacts:
        visit(a, a.path.parent)
    return sum_costs(list(seen.values()))
