"""The driver: expand a suite, plan its artifacts and jobs, farm them to an executor, store rows.

``run_suite`` is the sweep. It plans each job's ids and the artifacts it needs (trained students,
calibrations: :mod:`bench.artifacts`), builds every missing artifact once as its own task before
the jobs that need it (on Ray, one worker trains while the others sample jobs that need nothing
unbuilt), and runs a job that compares with the same-seed samples of the suite's reference
configuration (PSNR/SSIM/LPIPS) after that reference job, handing it their file. The worker
side (one job, one build) is :mod:`bench.worker`; executors are :mod:`bench.executors`. The
driver is the single writer of results: finished jobs are written atomically under
``results/<suite>/<run-id>/jobs/<job-id>/`` and into the content-addressed job store
(bench/store.py), so a resumed run skips them and a re-run of an unchanged suite copies them
instead of computing them again. A failed build fails only the jobs that need it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import bench
from bench.artifacts import ArtifactSpec, ArtifactStore, default_artifact_store, plan_order
from bench.codeversion import code_version, module_of
from bench.executors import EXECUTORS, Executor, ExecutorError, make_executor
from bench.io import atomic_write, fsync_dir, write_json
from bench.paths import REPO, within
from bench.registry import METHODS, METRICS, MODELS
from bench.store import SAMPLES, JobStore, check_samples, content_key, link_or_copy, samples_digest
from bench.suite import Job, Suite, expand
from bench.worker import ModelCache, Outcome, Task

RESULTS = REPO / "results"
REQUIRED_COLUMNS = [
    "run_id", "suite", "job_id", "status", "model", "method", "family", "training", "knobs", "steps",
    "guidance", "nfe", "flops", "latency_s", "latency_iqr_s", "peak_mem_bytes", "train_cost_s",
    "train_steps", "train_teacher_nfe", "train_device", "artifact_id", "n_samples", "seed", "git_sha",
]  # fmt: skip


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_record(suite: Suite, run_id: str, command: str) -> dict[str, Any]:
    import diffusers

    return {
        "run_id": run_id,
        "suite": suite.resolved(),
        "command": command,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "versions": {
            "bench": bench.__version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
        "device": {
            "type": "cpu",
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
    }


STORE_DIRNAME = ".store"  # the content-addressed job store, under the results root unless --store
INCOMING = "incoming"  # <store>/incoming/<session>/: the samples files workers write, until the driver stores them


@dataclass
class PlannedJob:
    """A job with its ids (``job_id`` names it in a run, ``store_key`` in the job store), the
    artifacts it needs, and the job whose same-seed samples its metrics compare with."""

    job: Job
    job_id: str
    weights_hash: str
    store_key: str
    artifacts: tuple[ArtifactSpec, ...] = ()
    baseline_id: str | None = None
    for_baseline: bool = False  # not in the suite's grid: planned because another job compares with it
    plan_error: str = ""

    @property
    def artifact_keys(self) -> list[str]:
        return [s.key for s in plan_order(list(self.artifacts))]


def evaluation_key(suite: Suite, device: str, threads: int) -> dict[str, Any]:
    """What, besides the job itself (:meth:`Job.key`), determines its row: how it is scored
    (metrics and their code, bootstrap, references) and timed (batch size, warm-up, harness
    code, device type, threads per worker: CPU kernels split small batches differently with
    the thread count, so samples agree bitwise only at equal threads)."""
    names = suite.metrics + suite.optional_metrics
    return {
        "metrics": suite.metrics,
        "optional_metrics": suite.optional_metrics,
        "metric_code": {n: code_version(module_of(METRICS.get(n))) for n in names},
        "bootstrap": suite.bootstrap,
        "reference": suite.reference,
        "reference_set": suite.reference_set,
        "batch_size": suite.batch_size,
        "warmup": suite.warmup,
        "warmup_batch": suite.warmup_batch,
        "harness_code": code_version("bench.worker"),
        "device": device.split(":")[0],
        "threads": threads,
    }


def _needs_baseline(suite: Suite) -> bool:
    return any(METRICS.entry(n).meta.get("needs_baseline") for n in suite.metrics + suite.optional_metrics)


def plan_jobs(
    suite: Suite, jobs: list[Job], device: str, threads: int, models: ModelCache | None = None
) -> tuple[list[PlannedJob], int]:
    """Ids of each job (building each model once for its weights hash), the artifacts each needs,
    and for a suite whose metrics compare with the reference configuration's same-seed samples,
    that reference job (added to the plan when the grid lacks it). Drops jobs whose id repeats
    (knob values that resolve to the same setting). Returns the jobs and the drop count."""
    from bench.metrics.fidelity import baseline_job

    models = models or ModelCache()
    ev = evaluation_key(suite, device, threads)
    planned: list[PlannedJob] = []
    by_id: dict[str, PlannedJob] = {}

    def add(job: Job, for_baseline: bool = False) -> PlannedJob | None:
        bundle = models.get(job)
        jid = job.job_id(bundle.weights_hash)
        if jid in by_id:
            return None
        model_code = code_version(module_of(MODELS.get(job.model.name)), type(bundle.denoiser).__module__)
        key = content_key({"job": job.key(bundle.weights_hash), "model_code": model_code, "evaluation": ev})
        p = PlannedJob(job, jid, bundle.weights_hash, key, for_baseline=for_baseline)
        try:
            p.artifacts = tuple(METHODS.get(job.method)(**dict(job.knobs)).artifacts(bundle, job.steps, job.guidance))
        except Exception as e:  # the job fails with this when it runs (say, a method that does not apply)
            p.plan_error = f"{type(e).__name__}: {e}"
        by_id[jid] = p
        planned.append(p)
        return p

    for job in jobs:
        add(job)
    dropped = len(jobs) - len(planned)
    if _needs_baseline(suite):
        for p in list(planned):
            try:
                bj = baseline_job(p.job, suite)
            except ValueError:
                continue  # no reference configuration: the fidelity metrics say so when the job runs
            bid = bj.job_id(models.get(bj).weights_hash)
            if bid not in by_id:
                added = add(bj, for_baseline=True)
                if added is not None:
                    added.baseline_id = bid  # the reference configuration is its own reference
            p.baseline_id = bid
    return planned, dropped


def _read_row(path: Path) -> dict[str, Any] | None:
    """The JSON mapping in ``path``; None when absent or not whole (a torn file is not a record)."""
    try:
        obj = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def _job_columns(job: Job) -> dict[str, Any]:
    return {
        "model": job.model.label,
        "method": job.method,
        "knobs": json.dumps(dict(job.knobs), sort_keys=True),
        "steps": job.steps,
        "guidance": job.guidance,
        "n_samples": job.n_samples,
        "seed": job.seed,
    }


class _Progress:
    """The live terminal display: jobs done/total, running, failed, retried, reused, ETA, and the
    artifact builds under way (step, loss and ETA from their ``progress.json``)."""

    def __init__(self, desc: str, total: int, initial: int, reused: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="job", disable=not enabled, file=sys.stderr, smoothing=0.1)
        self.failed = self.retried = 0
        self.reused = reused
        self.running = 0
        self.building = ""
        # a terminal redraws one line in place; a log file (CI, nohup) gets a new line per refresh
        self.tty = sys.stderr.isatty()
        self._last = ""

    def show(self, running: int | None = None, advance: int = 0) -> None:
        if running is not None:
            self.running = running
        post = f"running {self.running} | failed {self.failed} | retried {self.retried} | reused {self.reused}"
        if self.building:
            post += f" | {self.building}"
        if not advance and not self.tty and post == self._last:
            return  # nothing new to write to a log
        self._last = post
        self.bar.set_postfix_str(post, refresh=False)
        self.bar.update(advance) if advance else self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _build_progress(store: ArtifactStore, keys: list[str]) -> str:
    """One line about the builds running on other workers, from their ``progress.json``."""
    parts = []
    for k in keys:
        info = _read_row(store.work_dir(k) / "progress.json")
        if not info:
            continue
        eta = info.get("eta_s")
        loss = info.get("loss")
        part = f"build {str(info.get('label', k)).split(' on ')[0]} {info.get('step')}/{info.get('total')}"
        part += f" loss {loss:.3g}" if isinstance(loss, int | float) else ""
        part += f" ETA {int(eta // 60)}m{int(eta % 60):02d}s" if isinstance(eta, int | float) else ""
        parts.append(part)
    return "; ".join(parts)


@dataclass
class _Sweep:
    """The scheduling state of one session: artifacts to build, jobs to run, what each waits for."""

    suite: Suite
    ex: Executor
    store: ArtifactStore
    retries: int
    builds: deque[ArtifactSpec] = field(default_factory=deque)
    jobs: deque[PlannedJob] = field(default_factory=deque)
    art_state: dict[str, str] = field(default_factory=dict)  # key -> ready | pending | running | failed
    art_error: dict[str, str] = field(default_factory=dict)
    art_job: dict[str, Job] = field(default_factory=dict)  # a job on whose model the artifact is built
    art_weights: dict[str, str] = field(default_factory=dict)
    job_state: dict[str, str] = field(default_factory=dict)  # job id -> ok | failed (finished ones only)
    artifacts_log: dict[str, dict[str, Any]] = field(default_factory=dict)

    def blocked_reason(self, p: PlannedJob) -> str | None:
        """Why ``p`` can never run (an artifact or its reference job failed), or None."""
        for k in p.artifact_keys:
            if self.art_state.get(k) == "failed":
                return f"artifact {k} failed to build: {self.art_error.get(k, '')}"
        if p.baseline_id and p.baseline_id != p.job_id and self.job_state.get(p.baseline_id) == "failed":
            return f"its same-seed reference job {p.baseline_id} failed"
        return None

    def ready(self, p: PlannedJob) -> bool:
        if any(self.art_state.get(k) != "ready" for k in p.artifact_keys):
            return False
        return not p.baseline_id or p.baseline_id == p.job_id or self.job_state.get(p.baseline_id) == "ok"

    def build_ready(self, spec: ArtifactSpec) -> bool:
        return all(self.art_state.get(q.key) == "ready" for q in spec.parents)

    def next_build(self) -> ArtifactSpec | None:
        for spec in list(self.builds):
            if any(self.art_state.get(q.key) == "failed" for q in spec.parents):
                self.builds.remove(spec)
                self.art_state[spec.key] = "failed"
                bad = next(q for q in spec.parents if self.art_state.get(q.key) == "failed")
                self.art_error[spec.key] = f"its parent artifact {bad.key} failed to build: {self.art_error.get(bad.key, '')}"
                self.artifacts_log[spec.key] = {"label": spec.label, "status": "failed", "error": self.art_error[spec.key]}
                continue
            if self.build_ready(spec):
                self.builds.remove(spec)
                return spec
        return None

    def next_job(self) -> PlannedJob | None:
        for p in list(self.jobs):
            if self.ready(p):
                self.jobs.remove(p)
                return p
        return None


def run_suite(
    suite: Suite,
    run_id: str | None = None,
    results_dir: Path = RESULTS,
    command: str = "",
    progress: bool = True,
    *,
    executor: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    device: str = "auto",
    retries: int = 2,
    fresh: bool = False,
    store: Path | None = None,
    artifact_store: ArtifactStore | None = None,
    builds_only: bool = False,
) -> Path:
    """Run every job of ``suite`` on ``executor`` (``local`` or ``ray``; default the suite's) and
    return the run directory ``results_dir/<suite>/<run_id>``.

    Artifacts the jobs need that the artifact store (``$BENCH_HOME/artifacts`` unless
    ``artifact_store``) lacks are built first, each once, as tasks of their own; a job runs once
    its artifacts (and its same-seed reference job, if its metrics need one) are done. Jobs already
    finished in this run are skipped (``--resume``); jobs finished in any run with the same store
    key are copied from the job store (``<results_dir>/.store`` unless ``store``) with ``reused``
    set, unless ``fresh``. A task whose worker dies is retried up to ``retries`` times (a build
    resumes from its checkpoint), then recorded as failed; a task that raises is recorded as
    failed at once, and so is every job that needed a failed build. With ``builds_only`` only the
    artifacts are built (``bench build``). The driver is the only writer: rows and samples are
    written atomically as outcomes arrive, so a killed driver loses only the tasks in flight.
    """
    t_start = time.perf_counter()
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    kind = executor or suite.executor or "local"
    if kind not in EXECUTORS:
        raise ExecutorError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")
    run_id = run_id or new_run_id()
    results_dir = Path(results_dir)
    out = within(results_dir, suite.name, run_id)  # a name that would leave the results root is an error
    jobstore = JobStore(Path(store) if store else results_dir / STORE_DIRNAME)
    arts = artifact_store or default_artifact_store()
    session = f"{dt.datetime.now():%Y%m%d-%H%M%S-%f}-{os.getpid()}"  # unique even for two sessions in one second
    incoming = jobstore.root / INCOMING / session  # where workers write samples (the store's file system: moves are renames)
    key_device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    key_threads = threads or (1 if kind == "ray" else torch.get_num_threads())
    ex: Executor = make_executor(kind, device, workers, threads, address)  # checks the settings; starts nothing
    if hasattr(ex, "progress"):
        ex.progress = progress  # a local build shows its own progress bar
    jobs, skipped = expand(suite)
    # the local executor keeps the models the plan built (a real pipeline is loaded once, not twice)
    planned, duplicates = plan_jobs(suite, jobs, key_device, key_threads, models=getattr(ex, "models", None))
    sw = _Sweep(suite, ex, arts, retries)
    for spec in plan_order([s for p in planned for s in p.artifacts]):
        found = arts.get(spec.key)
        sw.art_state[spec.key] = "ready" if found is not None else "pending"
        if found is None:
            sw.builds.append(spec)
        sw.artifacts_log[spec.key] = {"label": spec.label, "status": "found" if found else "to build"}
    for p in planned:
        for s in plan_order(list(p.artifacts)):
            sw.art_job.setdefault(s.key, p.job)
            sw.art_weights.setdefault(s.key, p.weights_hash)
    current_digest = {k: (a.record.get("digest", "") if (a := arts.get(k)) else None) for k in sw.art_state}

    rec_path = out / "run.json"
    record: dict[str, Any] = {}
    if not builds_only:
        record = _read_row(rec_path) or run_record(suite, run_id, command)
        record["skipped_pairs"] = skipped
        record["duplicate_jobs"] = duplicates
    sess: dict[str, Any] = {"session": session, "started": dt.datetime.now().isoformat(timespec="seconds"), "command": command}
    sess |= {"executor": kind, "fresh": fresh, "retries": retries, "store": str(jobstore.root), "artifact_store": str(arts.root)}
    if not builds_only:
        record.setdefault("sessions", []).append(sess)
        write_json(rec_path, record)
    sha = record.get("git_sha") or git_sha()
    run_cols = {"run_id": run_id, "suite": suite.name, "git_sha": sha}

    done = reused = 0
    redone: list[dict[str, str]] = []  # finished jobs whose files failed their check: done again, never loaded
    for p in [] if builds_only else planned:
        jdir = out / "jobs" / p.job_id
        prev = _read_row(jdir / "row.json")
        if prev is not None and prev.get("status") == "ok":
            why = check_samples(jdir / SAMPLES, prev)
            if why is None:
                done += 1
                sw.job_state[p.job_id] = "ok"
                continue
            redone.append({"job_id": p.job_id, "where": "run", "file": str(jdir / SAMPLES), "why": why})
            (jdir / "row.json").unlink(missing_ok=True)  # no longer finished, whatever happens next
        n_rejected = len(jobstore.rejected)
        hit = None if fresh else jobstore.get(p.store_key)
        for key, why in jobstore.rejected[n_rejected:]:
            redone.append({"job_id": p.job_id, "where": "store", "file": str(jobstore.path(key) / SAMPLES), "why": why})
        digests = [current_digest.get(s.key) for s in p.artifacts]
        fresh_artifacts = (
            all(d is not None for d in digests)
            and hit is not None
            and (hit.row.get("artifact_digests", "") == ",".join(d or "" for d in digests))
        )
        if hit is not None and hit.row.get("status") == "ok" and (not p.artifacts or fresh_artifacts):
            if hit.samples is not None:
                link_or_copy(hit.samples, jdir / "samples.npy")
            producer = f"{hit.row.get('suite')}/{hit.row.get('run_id')}"
            row = hit.row | run_cols | {"job_id": p.job_id, "reused": True, "reused_from": producer}
            row |= {"produced_git_sha": hit.row.get("git_sha", ""), "session": session, "planned_as": _planned_as(p)}
            write_json(jdir / "row.json", row)
            reused += 1
            sw.job_state[p.job_id] = "ok"
            continue
        sw.jobs.append(p)
    for r in redone:
        print(f"bench: job {r['job_id']}: {r['file']} {r['why']}; doing the job again", file=sys.stderr)
    if builds_only:  # only what is needed... which is every missing artifact
        pass
    else:  # builds no pending job needs (all its jobs were reused) are not made
        needed = {k for p in sw.jobs for k in p.artifact_keys}
        for spec in list(sw.builds):
            if spec.key not in needed:
                sw.builds.remove(spec)
                sw.art_state[spec.key] = "not needed"
                sw.artifacts_log[spec.key]["status"] = "not needed (its jobs were reused)"

    n_total = len(planned)
    bar = _Progress(f"{suite.name} {run_id}", 0 if builds_only else n_total, done + reused, reused, progress and not builds_only)
    started = False
    computed = failed = retried = 0
    executions: list[dict[str, Any]] = []
    running_builds: set[str] = set()
    t_sweep = t_end = time.perf_counter()
    try:
        if sw.jobs or sw.builds:
            started = True
            ex.start()
            t_sweep = time.perf_counter()
            retry: deque[Task] = deque()
            while sw.jobs or sw.builds or retry or ex.running():
                # jobs that can never run (a build or their reference job failed) fail now, with the reason
                for p in list(sw.jobs):
                    why = sw.blocked_reason(p)
                    if why is not None:
                        sw.jobs.remove(p)
                        _write_failed(out, p, run_cols, {"session": session, "attempts": 0}, f"not run: {why}", "")
                        sw.job_state[p.job_id] = "failed"
                        failed += 1
                        bar.failed += 1
                        bar.show(running=ex.running(), advance=1)
                while ex.free_slots():
                    task = retry.popleft() if retry else None
                    if task is None and (spec := sw.next_build()) is not None:
                        task = Task(f"build:{spec.key}", sw.art_job[spec.key], sw.art_weights[spec.key], kind="build", spec=spec,
                                    artifact_store=str(arts.root))  # fmt: skip
                    if task is None and (p := sw.next_job()) is not None:
                        task = Task(p.job_id, p.job, p.weights_hash, baseline=_baseline_samples(out, p), artifact_store=str(arts.root),
                                    baseline_is_self=p.baseline_id == p.job_id, samples_dir=str(incoming))  # fmt: skip
                    if task is None:
                        break
                    if task.kind == "build":
                        sw.art_state[task.spec.key] = "running"
                        running_builds.add(task.spec.key)
                    ex.submit(task, suite)
                if not ex.running():
                    if sw.jobs or sw.builds:  # nothing can run and nothing runs: fail what is left
                        for spec in list(sw.builds):
                            sw.art_state[spec.key] = "failed"
                            sw.art_error[spec.key] = "could not be scheduled"
                        sw.builds.clear()
                        continue
                    break
                if kind == "ray":
                    bar.building = _build_progress(arts, sorted(running_builds))
                bar.show(running=ex.running())
                for o in ex.wait(timeout=1.0):  # wakes each second to keep the elapsed time and ETA live
                    task, attempt = o.task, o.task.attempt
                    where = _where(o, ex, session, attempt)
                    log = {"session": session, "job_id": task.job_id, "kind": task.kind, "attempt": attempt, "wall_s": o.wall_s}
                    log |= where
                    if o.lost_worker and attempt <= retries:
                        retry.append(Task(**{**task.__dict__, "attempt": attempt + 1}))
                        retried += 1
                        bar.retried += 1
                        log |= {"status": "lost", "error": o.error}
                    elif task.kind == "build":
                        key = task.spec.key
                        running_builds.discard(key)
                        if o.ok:
                            sw.art_state[key] = "ready"
                            sw.artifacts_log[key] = {
                                "label": task.spec.label,
                                "status": "built" if o.row.get("built") else "found",
                            }
                            sw.artifacts_log[key] |= {"cost": o.row.get("cost"), "attempts": attempt}
                            log |= {"status": "ok", "built": o.row.get("built")}
                        else:
                            sw.art_state[key] = "failed"
                            sw.art_error[key] = o.error
                            sw.artifacts_log[key] = {"label": task.spec.label, "status": "failed", "error": o.error}
                            log |= {"status": "failed", "error": o.error}
                        bar.building = ""
                        bar.show(running=ex.running())
                    else:
                        p = next(q for q in planned if q.job_id == task.job_id)
                        jdir = out / "jobs" / p.job_id
                        stored_samples: Path | None = None
                        if o.ok and o.samples_path is not None:  # the worker's file, moved into the store entry
                            try:
                                stored_samples = _adopt_samples(Path(o.samples_path), jobstore, p.store_key, p.job_id, o.row)
                            except ExecutorError as e:
                                o = Outcome(task, error=str(e), worker=o.worker, wall_s=o.wall_s)
                        if o.ok:
                            row = o.row | where | run_cols | {"job_id": p.job_id, "reused": False, "reused_from": ""}
                            row |= {"store_key": p.store_key, "planned_as": _planned_as(p)}
                            if o.samples_path is not None:
                                jobstore.put(p.store_key, row, None)  # the row, after the samples it names
                            else:
                                if o.samples is not None:
                                    row["samples_sha256"] = samples_digest(o.samples)
                                stored_samples = jobstore.put(p.store_key, row, o.samples).samples
                            if stored_samples is not None:
                                link_or_copy(stored_samples, jdir / "samples.npy")
                            write_json(jdir / "row.json", row)
                            computed += 1
                            sw.job_state[p.job_id] = "ok"
                            log |= {"status": "ok", "network_calls": row.get("network_calls")}
                        else:
                            _write_failed(out, p, run_cols, where, o.error, o.traceback)
                            sw.job_state[p.job_id] = "failed"
                            failed += 1
                            bar.failed += 1
                            log |= {"status": "failed", "error": o.error}
                        bar.show(running=ex.running(), advance=1)
                    if not builds_only:
                        _append_jsonl(out / "executions.jsonl", log)
                    executions.append(log)
            t_end = time.perf_counter()
    finally:
        bar.close()
        ex.close()
        shutil.rmtree(incoming, ignore_errors=True)  # samples of attempts whose outcome never came (lost workers)
    if builds_only:
        failed_builds = {k: v for k, v in sw.artifacts_log.items() if v.get("status") == "failed"}
        _BUILD_RESULT.clear()
        _BUILD_RESULT.update({"artifacts": sw.artifacts_log, "failed": failed_builds, "total_s": time.perf_counter() - t_start})
        return out
    table = collect(out)
    record["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    n_failed = int((table["status"] != "ok").sum()) if len(table) else 0
    record["jobs"] = {"total": n_total, "failed": n_failed}
    record["failed_jobs"] = [
        {k: r.get(k) for k in ("job_id", "model", "method", "knobs", "steps", "guidance", "error")}
        for r in table[table["status"] != "ok"].to_dict("records")
    ] if len(table) else []  # fmt: skip
    record.setdefault("artifacts", {})
    for k, v in sw.artifacts_log.items():  # keep what an earlier session built; this session's word on the rest
        if v.get("status") in ("built", "failed") or k not in record["artifacts"]:
            record["artifacts"][k] = v
    sess |= {
        "finished": record["finished"],
        "already_done": done,
        "reused": reused,
        "computed": computed,
        "failed": failed,
        "retried": retried,
        "redone": redone,
        "built": sorted(k for k, v in sw.artifacts_log.items() if v.get("status") == "built"),
        "executor": ex.describe() if started else {"kind": kind, "started": False},
        "sweep_s": t_end - t_sweep,
        "total_s": time.perf_counter() - t_start,
        "network_calls": sum(e.get("network_calls") or 0 for e in executions),
    }
    record["sessions"][-1] = sess
    record["executor"] = sess["executor"]
    write_json(rec_path, record)
    return out


_BUILD_RESULT: dict[str, Any] = {}  # what the last builds_only sweep did (bench build reads it)


def build_suite(suite: Suite, progress: bool = True, **kw: Any) -> dict[str, Any]:
    """Build every artifact ``suite`` needs that the artifact store lacks (``bench build``); returns
    ``{"artifacts": {key: status...}, "failed": {...}, "total_s"}``."""
    run_suite(suite, run_id="build", progress=progress, builds_only=True, **kw)
    return dict(_BUILD_RESULT)


def _planned_as(p: PlannedJob) -> str:
    return "reference" if p.for_baseline else "grid"


def _where(o: Outcome, ex: Executor, session: str, attempt: int) -> dict[str, Any]:
    node = o.worker.get("node_id", "")
    where = {k: o.worker.get(k) for k in ("node_id", "worker_id", "host", "threads")}
    where |= {"executor": ex.kind, "workers": ex.workers, "node_workers": ex.node_workers(node)}
    return where | {"device_name": o.worker.get("device", ""), "attempts": attempt, "session": session}


def _write_failed(out: Path, p: PlannedJob, run_cols: dict[str, Any], where: dict[str, Any], error: str, tb: str) -> None:
    row = _job_columns(p.job) | where | run_cols | {"job_id": p.job_id, "status": "failed", "planned_as": _planned_as(p)}
    row |= {"error": error, "traceback": tb, "reused": False, "reused_from": ""}
    write_json(out / "jobs" / p.job_id / "row.json", row)


def _baseline_samples(out: Path, p: PlannedJob) -> str | None:
    """The file of the finished samples of ``p``'s same-seed reference job (in this run's
    directory), which the worker reads."""
    if not p.baseline_id or p.baseline_id == p.job_id:
        return None
    path = out / "jobs" / p.baseline_id / "samples.npy"
    return str(path.resolve()) if path.is_file() else None


def _adopt_samples(src: Path, jobstore: JobStore, key: str, job_id: str, row: dict[str, Any]) -> Path:
    """Move the samples file a worker wrote into the store entry ``key``, after checking that it is
    the file the worker's row describes (its digest); returns its place in the store."""
    if not src.is_file():
        raise ExecutorError(
            f"the worker wrote the samples of job {job_id} to {src}, which this driver cannot see; put the job "
            "store (--store) on a file system that every worker node shares"
        )
    why = check_samples(src, row)
    if why is not None:
        raise ExecutorError(f"the samples file {src} the worker wrote {why}; run the job again (--resume)")
    dest = jobstore.path(key) / SAMPLES
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)  # the same file system (the store's incoming/): an atomic rename
    except OSError:
        shutil.move(str(src), str(dest.with_name(f".{dest.name}.moving")))
        os.replace(dest.with_name(f".{dest.name}.moving"), dest)
    fsync_dir(dest.parent)
    return dest


def _append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    """One line per execution attempt (the driver is the only writer; a line is one write). A
    line torn by a killed driver is closed first, so it cannot swallow the next one."""
    line = json.dumps(obj, sort_keys=True, default=str) + "\n"
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())


def read_executions(run_dir: Path) -> list[dict[str, Any]]:
    """Every execution attempt of a run, across sessions (a torn last line is ignored)."""
    out = []
    p = Path(run_dir) / "executions.jsonl"
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def collect(run_dir: Path) -> pd.DataFrame:
    """Gather the job rows of a run into results.parquet (one row per job)."""
    rows = []
    for p in sorted((run_dir / "jobs").glob("*/row.json")):
        r = _read_row(p)
        if r is None:  # not one of this session's jobs (they were all redone or rewritten): left out, said
            print(f"bench: {p} is torn or not a row; left out of the results (delete its job directory)", file=sys.stderr)
            continue
        r.pop("traceback", None)
        rows.append(r)
    df = pd.DataFrame(rows)
    for c in REQUIRED_COLUMNS:
        if c not in df.columns:
            df[c] = None
    front = REQUIRED_COLUMNS + ["error"]
    df = df[front + [c for c in df.columns if c not in front]]
    if len(df):
        df = df.sort_values(["model", "method", "knobs", "steps", "guidance"], kind="stable").reset_index(drop=True)
    atomic_write(run_dir / "results.parquet", lambda p: df.to_parquet(p, index=False))
    return df
