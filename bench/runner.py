"""The runner: expand a suite, run each job with outside accounting, score, store rows.

``run_job`` runs one job inside a worker; ``run_suite`` is the driver: it farms jobs to an
executor (bench/executors.py: local or Ray) and is the single writer of results. Finished jobs
are written atomically under ``results/<suite>/<run-id>/jobs/<job-id>/`` and into the
content-addressed job store (bench/store.py), so a resumed run skips them and a re-run of an
unchanged suite copies them instead of computing them again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import bench
from bench.accounting import (
    ForwardCounter,
    cache_units,
    flops_of,
    median_iqr,
    peak_memory_bytes,
    reset_peak_memory,
    timed,
    units_of,
)
from bench.executors import EXECUTORS, Executor, ExecutorError, ModelCache, Task, make_executor
from bench.io import atomic_write, write_json
from bench.metrics import MetricContext
from bench.models import ModelBundle
from bench.paths import REPO
from bench.registry import METHODS, METRICS
from bench.seeds import generators, noise
from bench.store import JobStore, content_key, link_or_copy, samples_digest
from bench.suite import Job, Suite, expand

RESULTS = REPO / "results"
REQUIRED_COLUMNS = [
    "run_id", "suite", "job_id", "status", "model", "method", "family", "training", "knobs", "steps",
    "guidance", "nfe", "flops", "latency_s", "latency_iqr_s", "peak_mem_bytes", "train_cost_s",
    "n_samples", "seed", "git_sha",
]  # fmt: skip


UNIT_BATCH = 2  # samples in the blocks-computed counting pass of caching jobs


class NonFiniteSamples(RuntimeError):
    """A sampler produced NaN or inf."""


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def run_job(job: Job, bundle: ModelBundle, suite: Suite, device: str = "cpu") -> tuple[dict[str, Any], torch.Tensor]:
    """Sample, account and score one job; returns its row (no run-level columns) and samples."""
    cls = METHODS.get(job.method)
    method = cls(**dict(job.knobs))
    sampler = method.prepare(bundle, job.steps)
    n, bs = job.n_samples, job.batch_size
    conditional = bundle.num_classes is not None
    labels = torch.arange(n) % bundle.num_classes if conditional else None
    cfg_rows = bundle.denoiser.rows_per_sample(job.guidance, conditional)

    def call(lo: int, hi: int) -> torch.Tensor:
        gens = generators(job.seed, range(lo, hi), device)
        z = noise(gens, bundle.sample_shape, bundle.dtype, device)
        cond = labels[lo:hi].to(device) if labels is not None else None
        return sampler(z, cond, job.guidance, gens)

    windowed = reset_peak_memory(device)
    for _ in range(suite.warmup):
        call(0, min(bs, n))
    outs, times = [], []
    with ForwardCounter(bundle.denoiser.net, keep_first=bundle.data == "vector") as counter:
        for lo in range(0, n, bs):
            counter.arm()
            x, sec = timed(lambda lo=lo: call(lo, min(lo + bs, n)), device)
            outs.append(x.cpu())
            if min(lo + bs, n) - lo == bs:  # only full batches are comparable
                times.append(sec)
    samples = torch.cat(outs)
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples.flatten(1))).any(1).sum())
        raise NonFiniteSamples(
            f"{bad} of {n} samples contain NaN/inf ({job.method}, {job.steps} steps, guidance {job.guidance}); "
            "lower the guidance or raise the steps"
        )
    peak_mem = peak_memory_bytes(device)  # of sampling alone, before FLOP counting and metrics
    nfe = counter.rows / (n * cfg_rows)
    flops = flops_of(lambda: call(0, 1))  # the sampler as timed: a cache's hooks are installed, so skipped blocks cost nothing
    # blocks a cache entered and really computed, in a separate untimed pass on a small batch
    units = units_of(cache_units(method, bundle.denoiser.net), lambda: call(0, min(UNIT_BATCH, n)))
    lat, iqr = median_iqr(times)
    decode_s = math.nan
    if bundle.extra.get("decode") is not None:  # latents -> images for the metrics, outside the timed sampler calls
        t0 = time.perf_counter()
        samples = bundle.extra["decode"](samples)
        decode_s = (time.perf_counter() - t0) / n
    row: dict[str, Any] = {
        "status": "ok",
        "error": "",
        "model": job.model.label,
        "method": job.method,
        "family": cls.family,
        "training": cls.training,
        "knobs": json.dumps(dict(job.knobs), sort_keys=True),
        "steps": job.steps,
        "guidance": job.guidance,
        "nfe": nfe,
        "network_calls": counter.calls,
        "flops": flops,
        **units,
        "latency_s": lat,
        "latency_iqr_s": iqr,
        "latency_per_image_s": lat / bs,
        "latency_per_image_iqr_s": iqr / bs,
        "batch_size": bs,
        "timed_batches": len(times),
        "peak_mem_bytes": peak_mem,
        "peak_mem_scope": "sampling" if windowed else "process",
        "decode_s_per_image": decode_s,
        "train_cost_s": method.train_cost()["wall_s"],
        "n_samples": n,
        "seed": job.seed,
        "device": device,
    }
    start_x = start_t = None
    if counter.first_inputs:
        start_x = torch.cat([x for x, _ in counter.first_inputs])
        start_t = float(counter.first_inputs[0][1].flatten()[0])
    texts = bundle.extra.get("prompts")  # a text-conditioned model: prompt of each condition index
    prompts = [texts[int(c)] for c in labels] if texts is not None and labels is not None else None
    ctx = MetricContext(
        samples,
        labels,
        bundle,
        start_x,
        start_t,
        suite.bootstrap,
        job.seed,
        prompts=prompts,
        refset=suite.raw.get("reference_set"),
        device=device,
    )
    row["missing_metrics"] = ""
    for name in suite.metrics + suite.optional_metrics:
        try:
            if METRICS.entry(name).meta.get("needs_baseline") and ctx.baseline is None:
                from bench.metrics.fidelity import baseline_samples

                ctx.baseline = baseline_samples(job, bundle, suite, device, own=samples)
            v = METRICS.get(name)(ctx)
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = v.value, v.ci_low, v.ci_high
        except Exception as e:
            if name not in suite.optional_metrics:
                raise
            row[name] = row[f"{name}_ci_low"] = row[f"{name}_ci_high"] = None
            row["error"] += f"{name}: {e}; "
            row["missing_metrics"] += ("," if row["missing_metrics"] else "") + name
    return row, samples


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


@dataclass(frozen=True)
class PlannedJob:
    """A job with its ids: ``job_id`` names it in a run, ``store_key`` in the job store."""

    job: Job
    job_id: str
    weights_hash: str
    store_key: str


def _source_file(obj: Any) -> str:
    obj = inspect.unwrap(obj) if callable(obj) else obj
    try:
        return str(inspect.getsourcefile(obj))
    except TypeError:  # an instance (e.g. a registered metric object): its class's file
        return str(inspect.getsourcefile(type(obj)))


def _file_hash(*objs: Any) -> str:
    """Hash of the source files defining ``objs`` (a code version)."""
    h = hashlib.sha256()
    for f in sorted({_source_file(o) for o in objs}):
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:12]


def evaluation_key(suite: Suite, device: str, threads: int) -> dict[str, Any]:
    """What, besides the job itself (:meth:`Job.key`), determines its row: how it is scored
    (metrics and their code, bootstrap, references) and timed (batch size, warm-up, harness
    code, device type, threads per worker: CPU kernels split small batches differently with
    the thread count, so samples agree bitwise only at equal threads)."""
    import bench.accounting
    import bench.metrics
    import bench.seeds

    names = suite.metrics + suite.optional_metrics
    return {
        "metrics": suite.metrics,
        "optional_metrics": suite.optional_metrics,
        "metric_code": {n: _file_hash(METRICS.get(n)) for n in names},
        "bootstrap": suite.bootstrap,
        "reference": suite.reference,
        "reference_set": suite.raw.get("reference_set"),
        "batch_size": suite.batch_size,
        "warmup": suite.warmup,
        "harness_code": hashlib.sha256(inspect.getsource(run_job).encode()).hexdigest()[:12]
        + _file_hash(bench.accounting, bench.seeds, bench.metrics),
        "device": device.split(":")[0],
        "threads": threads,
    }


def plan_jobs(
    suite: Suite, jobs: list[Job], device: str, threads: int, models: ModelCache | None = None
) -> tuple[list[PlannedJob], int]:
    """Ids of each job (building each model once for its weights hash); drops jobs whose id
    repeats (knob values that resolve to the same setting). Returns the jobs and the drop count."""
    from bench.registry import MODELS

    models = models or ModelCache()
    ev = evaluation_key(suite, device, threads)
    planned, seen = [], set()
    for job in jobs:
        bundle = models.get(job)
        jid = job.job_id(bundle.weights_hash)
        if jid in seen:
            continue
        seen.add(jid)
        model_code = _file_hash(MODELS.get(job.model.name), type(bundle.denoiser))
        key = content_key({"job": job.key(bundle.weights_hash), "model_code": model_code, "evaluation": ev})
        planned.append(PlannedJob(job, jid, bundle.weights_hash, key))
    return planned, len(jobs) - len(planned)


def _read_row(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
    """The live terminal display: jobs done/total, running, failed, retried, reused, ETA."""

    def __init__(self, desc: str, total: int, initial: int, reused: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="job", disable=not enabled, file=sys.stderr, smoothing=0.1)
        self.failed = self.retried = 0
        self.reused = reused
        self.running = 0
        # a terminal redraws one line in place; a log file (CI, nohup) gets a new line per refresh
        self.tty = sys.stderr.isatty()
        self._last = ""

    def show(self, running: int | None = None, advance: int = 0) -> None:
        if running is not None:
            self.running = running
        post = f"running {self.running} | failed {self.failed} | retried {self.retried} | reused {self.reused}"
        if not advance and not self.tty and post == self._last:
            return  # nothing new to write to a log
        self._last = post
        self.bar.set_postfix_str(post, refresh=False)
        self.bar.update(advance) if advance else self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


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
) -> Path:
    """Run every job of ``suite`` on ``executor`` (``local`` or ``ray``; default the suite's) and
    return the run directory ``results_dir/<suite>/<run_id>``.

    Jobs already finished in this run are skipped (``--resume``); jobs finished in any run with
    the same store key are copied from the job store (``<results_dir>/.store`` unless ``store``)
    with ``reused`` set, unless ``fresh``. A job whose worker dies is retried up to ``retries``
    times, then recorded as failed; a job that raises is recorded as failed at once. The driver
    is the only writer: rows and samples are written atomically as outcomes arrive, so a killed
    driver loses only the jobs in flight.
    """
    t_start = time.perf_counter()
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    kind = executor or suite.executor or "local"
    if kind not in EXECUTORS:
        raise ExecutorError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")
    run_id = run_id or new_run_id()
    results_dir = Path(results_dir)
    out = results_dir / suite.name / run_id
    jobstore = JobStore(Path(store) if store else results_dir / STORE_DIRNAME)
    session = f"{dt.datetime.now():%Y%m%d-%H%M%S-%f}-{os.getpid()}"  # unique even for two sessions in one second
    key_device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    key_threads = threads or (1 if kind == "ray" else torch.get_num_threads())
    ex: Executor = make_executor(kind, device, workers, threads, address)  # checks the settings; starts nothing

    jobs, skipped = expand(suite)
    rec_path = out / "run.json"
    record = _read_row(rec_path) or run_record(suite, run_id, command)
    record["skipped_pairs"] = skipped
    # the local executor keeps the models the plan built (a real pipeline is loaded once, not twice)
    planned, duplicates = plan_jobs(suite, jobs, key_device, key_threads, models=getattr(ex, "models", None))
    record["duplicate_jobs"] = duplicates
    sess: dict[str, Any] = {"session": session, "started": dt.datetime.now().isoformat(timespec="seconds"), "command": command}
    sess |= {"executor": kind, "fresh": fresh, "retries": retries, "store": str(jobstore.root)}
    record.setdefault("sessions", []).append(sess)
    write_json(rec_path, record)
    sha = record["git_sha"]
    run_cols = {"run_id": run_id, "suite": suite.name, "git_sha": sha}

    done = reused = 0
    pending: list[PlannedJob] = []
    for p in planned:
        jdir = out / "jobs" / p.job_id
        prev = _read_row(jdir / "row.json")
        if prev is not None and prev.get("status") == "ok":
            done += 1
            continue
        hit = None if fresh else jobstore.get(p.store_key)
        if hit is not None and hit.row.get("status") == "ok":
            if hit.samples is not None:
                link_or_copy(hit.samples, jdir / "samples.npy")
            producer = f"{hit.row.get('suite')}/{hit.row.get('run_id')}"
            row = hit.row | run_cols | {"job_id": p.job_id, "reused": True, "reused_from": producer}
            row |= {"produced_git_sha": hit.row.get("git_sha", ""), "session": session}
            write_json(jdir / "row.json", row)
            reused += 1
            continue
        pending.append(p)

    bar = _Progress(f"{suite.name} {run_id}", len(planned), done + reused, reused, progress)
    started = False
    computed = failed = retried = 0
    executions: list[dict[str, Any]] = []
    t_sweep = t_end = time.perf_counter()
    try:
        if pending:
            started = True
            ex.start()
            t_sweep = time.perf_counter()
            queue = deque(Task(p.job_id, p.job, p.weights_hash) for p in pending)
            by_id = {p.job_id: p for p in pending}
            while queue or ex.running():
                while queue and ex.free_slots():
                    ex.submit(queue.popleft(), suite)
                bar.show(running=ex.running())
                for o in ex.wait(timeout=1.0):  # wakes each second to keep the elapsed time and ETA live
                    p, attempt = by_id[o.task.job_id], o.task.attempt
                    node = o.worker.get("node_id", "")
                    where = {k: o.worker.get(k) for k in ("node_id", "worker_id", "host", "threads")}
                    where |= {"executor": ex.kind, "workers": ex.workers, "node_workers": ex.node_workers(node)}
                    where |= {"device_name": o.worker.get("device", ""), "attempts": attempt, "session": session}
                    log = {"session": session, "job_id": p.job_id, "attempt": attempt, "wall_s": o.wall_s, **where}
                    jdir = out / "jobs" / p.job_id
                    if o.ok:
                        row = o.row | where | run_cols | {"job_id": p.job_id, "reused": False, "reused_from": ""}
                        row |= {"store_key": p.store_key}
                        if o.samples is not None:
                            row["samples_sha256"] = samples_digest(o.samples)
                        stored = jobstore.put(p.store_key, row, o.samples)
                        if stored.samples is not None:
                            link_or_copy(stored.samples, jdir / "samples.npy")
                        write_json(jdir / "row.json", row)
                        computed += 1
                        log |= {"status": "ok", "network_calls": row.get("network_calls")}
                        bar.show(running=ex.running(), advance=1)
                    elif o.lost_worker and attempt <= retries:
                        queue.append(Task(p.job_id, p.job, p.weights_hash, attempt + 1))
                        retried += 1
                        bar.retried += 1
                        log |= {"status": "lost", "error": o.error}
                    else:
                        row = _job_columns(p.job) | where | run_cols | {"job_id": p.job_id, "status": "failed"}
                        row |= {"error": o.error, "traceback": o.traceback, "reused": False, "reused_from": ""}
                        write_json(jdir / "row.json", row)
                        failed += 1
                        bar.failed += 1
                        log |= {"status": "failed", "error": o.error}
                        bar.show(running=ex.running(), advance=1)
                    _append_jsonl(out / "executions.jsonl", log)
                    executions.append(log)
            t_end = time.perf_counter()
    finally:
        bar.close()
        ex.close()
    table = collect(out)
    record["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    n_failed = int((table["status"] != "ok").sum()) if len(table) else 0
    record["jobs"] = {"total": len(planned), "failed": n_failed}
    record["failed_jobs"] = [
        {k: r.get(k) for k in ("job_id", "model", "method", "knobs", "steps", "guidance", "error")}
        for r in table[table["status"] != "ok"].to_dict("records")
    ] if len(table) else []  # fmt: skip
    sess |= {
        "finished": record["finished"],
        "already_done": done,
        "reused": reused,
        "computed": computed,
        "failed": failed,
        "retried": retried,
        "executor": ex.describe() if started else {"kind": kind, "started": False},
        "sweep_s": t_end - t_sweep,
        "total_s": time.perf_counter() - t_start,
        "network_calls": sum(e.get("network_calls") or 0 for e in executions),
    }
    record["sessions"][-1] = sess
    record["executor"] = sess["executor"]
    write_json(rec_path, record)
    return out


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
    rows = [json.loads(p.read_text()) for p in sorted((run_dir / "jobs").glob("*/row.json"))]
    for r in rows:
        r.pop("traceback", None)
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
