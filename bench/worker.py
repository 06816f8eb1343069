"""The worker side: one task at a time, a job (sample, account, score) or an artifact build.

``run_job`` runs one job: it prepares the method (its artifacts, built beforehand by the driver,
are loaded from the artifact store), samples with per-sample seeds, counts network forwards, FLOPs
and cache units on the *prepared* denoiser's network (the student's, for a trained method), times
the sampler calls, and scores the samples. ``run_build`` builds one artifact. ``execute`` is what
an executor calls for a :class:`Task`; it returns the row (or the build's record) to the driver,
which is the only writer of results. Samples travel as files, never as large in-memory returns:
the worker writes a job's samples into the task's ``samples_dir`` (the driver's job store, on a
file system every worker sees) and returns the path; the driver moves the file into its store
entry. Nothing here reads another job's rows: a job that needs the same-seed samples of the
suite's reference configuration gets the path of their file in its task.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from bench.artifacts import ArtifactSpec, ArtifactStore, default_artifact_store, ensure, job_cost, load_all
from bench.bundle import ModelBundle
from bench.io import atomic_write
from bench.latents import start_noise
from bench.metrics.base import MetricContext
from bench.models.options import deployment_of
from bench.registry import METHODS, METRICS
from bench.seeds import generators, noise
from bench.store import load_samples, samples_digest, save_npy
from bench.suite import Job, Suite

UNIT_BATCH = 2  # samples in the blocks-computed counting pass of caching jobs
FAULT_ENV = "BENCH_FAULT_KILL"  # test hook: "<task-id prefix>:<marker file>", see _maybe_install_fault
TRAIN_COLUMNS = ("train_cost_s", "train_steps", "train_teacher_nfe", "train_device", "artifact_id")


class NonFiniteSamples(RuntimeError):
    """A sampler produced NaN or inf."""


@dataclass
class Task:
    """One attempt at a job (``kind`` "job") or at building an artifact (``kind`` "build": ``spec``,
    on the model of ``job``, a job that needs it). ``baseline``: the file of the same-seed samples
    of the suite's reference configuration, for a job whose metrics compare with them.
    ``samples_dir``: where the worker writes the job's samples (None: they come back in memory,
    for a direct call)."""

    job_id: str
    job: Job
    weights_hash: str
    attempt: int = 1
    kind: str = "job"
    spec: ArtifactSpec | None = None
    baseline: str | None = None
    baseline_is_self: bool = False  # the job is its own reference configuration (PSNR inf)
    artifact_store: str | None = None
    samples_dir: str | None = None


@dataclass
class Outcome:
    """What came back from one attempt: a row and its samples' file (or the samples themselves, when
    the task named no ``samples_dir``; or a build record), a task error, or a lost worker."""

    task: Task
    row: dict[str, Any] | None = None
    samples: np.ndarray | None = None
    samples_path: str | None = None
    error: str = ""
    traceback: str = ""
    lost_worker: bool = False
    worker: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.row is not None


class ModelCache:
    """Builds each (model, options) once per process and keeps it loaded across jobs."""

    def __init__(self) -> None:
        self._m: dict[str, Any] = {}

    def get(self, job: Job) -> Any:
        from bench.models import build_model

        key = json.dumps([job.model.name, job.model.options], sort_keys=True)
        if key not in self._m:
            self._m[key] = build_model(job.model.name, **job.model.options)
        return self._m[key]


def _store(task_store: str | None) -> ArtifactStore:
    return ArtifactStore(task_store) if task_store else default_artifact_store()


def run_job(
    job: Job,
    bundle: ModelBundle,
    suite: Suite,
    device: str = "cpu",
    *,
    baseline: torch.Tensor | np.ndarray | None = None,
    baseline_is_self: bool = False,
    store: ArtifactStore | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Sample, account and score one job; returns its row (no run-level columns) and samples.
    ``baseline``: the same-seed samples of the suite's reference configuration (or, with
    ``baseline_is_self``, the job is that configuration) for the metrics that compare with them."""
    cls = METHODS.get(job.method)
    method = cls(**dict(job.knobs))
    method.check(bundle, job.steps)
    specs = method.artifacts(bundle, job.steps, job.guidance)
    store = store or default_artifact_store()
    try:
        arts = load_all(specs, store)
    except Exception:  # not built by a driver (a direct call): build here, once across processes
        arts = {s.key: ensure(s, bundle, store, method if s in specs else None) for spec in specs for s in spec.chain()}
    prepared = method.prepare(bundle, job.steps, arts, job.guidance)
    den = prepared.denoiser
    n, bs = job.n_samples, job.batch_size
    conditional = bundle.num_classes is not None
    labels = torch.arange(n) % bundle.num_classes if conditional else None
    cfg_rows = den.rows_per_sample(job.guidance, conditional)

    def call(lo: int, hi: int) -> torch.Tensor:
        gens = generators(job.seed, range(lo, hi), device)
        z = start_noise(bundle, lo, hi, noise(gens, bundle.sample_shape, bundle.dtype, device))  # or a latents file's
        cond = labels[lo:hi].to(device) if labels is not None else None
        return prepared(z, cond, job.guidance, gens)

    windowed = reset_peak_memory(device)
    for _ in range(suite.warmup):  # untimed; a suite may warm up on fewer samples than a batch (timing.warmup_batch)
        call(0, min(suite.warmup_batch or bs, bs, n))
    outs, times = [], []
    with ForwardCounter(den.net, keep_first=bundle.data == "vector") as counter:
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
    units = units_of(cache_units(method, den.net), lambda: call(0, min(UNIT_BATCH, n)))
    lat, iqr = median_iqr(times)
    decode_s = math.nan
    if bundle.extra.get("decode") is not None:  # latents -> images for the metrics, outside the timed sampler calls
        t0 = time.perf_counter()
        samples = bundle.extra["decode"](samples)
        decode_s = (time.perf_counter() - t0) / n
    cost = job_cost(list(prepared.artifacts))
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
        "train_cost_s": float(cost["wall_s"]),
        "train_steps": int(cost["optimizer_steps"]),
        "train_teacher_nfe": int(cost["teacher_rows"]),
        "train_device": cost["device"],
        "train_samples": int(cost["samples_drawn"]),
        "artifact_id": ",".join(a.key for a in prepared.artifacts),
        "artifact_digests": ",".join(a.record.get("digest", "") for a in prepared.artifacts),
        "n_samples": n,
        "seed": job.seed,
        "device": device,
        **deployment_of(den.net, bundle.dtype),  # dtype, compiled, compile_backend, channels_last: how the timed network ran
        "learned_params": prepared.info.get("learned_params"),  # a learned solver's trained parameter count
        # a released student's training cost is its paper's, quoted (GPU-hours, citation), never measured (methods/released)
        "train_cost_source": prepared.info.get("train_cost_source", "measured"),
        "train_cost_quoted_gpu_h": prepared.info.get("train_cost_quoted_gpu_h", math.nan),
        "train_cost_citation": prepared.info.get("train_cost_citation", ""),
        "student": prepared.info.get("student", ""),
        "student_guidance": prepared.info.get("student_guidance", math.nan),
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
        refset=suite.reference_set,
        device=device,
        baseline=samples if baseline_is_self else None if baseline is None else torch.as_tensor(np.asarray(baseline)),
    )
    row["missing_metrics"] = ""
    for name in suite.metrics + suite.optional_metrics:
        try:
            v = METRICS.get(name)(ctx)
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = v.value, v.ci_low, v.ci_high
        except Exception as e:
            if name not in suite.optional_metrics:
                raise
            row[name] = row[f"{name}_ci_low"] = row[f"{name}_ci_high"] = None
            row["error"] += f"{name}: {e}; "
            row["missing_metrics"] += ("," if row["missing_metrics"] else "") + name
    row["reference_set"] = ctx.cache.get("reference_used", suite.reference_set or "")
    row["reference_id"] = ",".join(sorted(set(ctx.cache.get("reference_ids", {}).values())))  # bench.metrics.refs
    if bundle.extra.get("latents_id"):
        row["start_latents"] = bundle.extra["latents_id"]  # the latents file every sample started from (bench.latents)
    if bundle.extra.get("prompt_set"):  # a named prompt set (bench.prompts): its identity, and metrics per category
        from bench.metrics.breakdown import per_category

        row["prompt_set"] = bundle.extra["prompt_set"]
        cats = bundle.extra.get("prompt_categories")
        if cats and labels is not None:
            scored = [m for m in suite.metrics + suite.optional_metrics if row.get(m) is not None]
            row["per_category"] = json.dumps(per_category(ctx, scored, [cats[int(c)] for c in labels]), sort_keys=True)
    return row, samples


def run_build(task: Task, bundle: ModelBundle, device: str, progress: bool = False) -> dict[str, Any]:
    """Build the task's artifact (and any missing ancestor) once; returns a summary of its record."""
    assert task.spec is not None
    art = ensure(task.spec, bundle, _store(task.artifact_store), device=device, progress=progress)
    return {"key": art.key, "built": art.built, "cost": art.cost, "chain_cost": art.chain_cost, "label": task.spec.label}


def write_samples(samples: np.ndarray, task: Task) -> str:
    """Write a job's samples into the task's ``samples_dir`` (atomically, under a name no other
    attempt uses) and return the file's path."""
    assert task.samples_dir is not None
    path = Path(task.samples_dir) / f"{task.job_id}.{task.attempt}.{uuid.uuid4().hex[:8]}.npy"
    atomic_write(path, lambda p: save_npy(p, samples))
    return str(path)


def execute(
    models: ModelCache, task: Task, suite: Suite, device: str, progress: bool = False
) -> tuple[dict[str, Any], np.ndarray | str | None]:
    """Run one task on this worker: a job's row and its samples (the path of the file written into
    ``task.samples_dir``, or the array when the task names none), or a build's record (no samples).
    The row carries the samples' digest (``samples_sha256``), checked by the driver on the file."""
    bundle = models.get(task.job)
    if device != "cpu":
        bundle.denoiser.net.to(device)  # once per model in practice: a no-op when already there
    if bundle.weights_hash != task.weights_hash:
        raise RuntimeError(
            f"{task.job.model.label} weights on this node hash to {bundle.weights_hash}, the driver's to "
            f"{task.weights_hash}; give every node the same weights files"
        )
    with _maybe_install_fault(task, bundle):
        if task.kind == "build":
            return run_build(task, bundle, device, progress), None
        baseline = load_samples(Path(task.baseline)) if task.baseline else None
        row, samples = run_job(
            task.job,
            bundle,
            suite,
            device,
            baseline=baseline,
            baseline_is_self=task.baseline_is_self,
            store=_store(task.artifact_store),
        )
    x = samples.numpy()
    row["samples_sha256"] = samples_digest(x)
    return row, (write_samples(x, task) if task.samples_dir else x)


class _maybe_install_fault:
    """Test hook: when ``$BENCH_FAULT_KILL`` is ``<task-id prefix>:<marker>`` and the marker file
    does not exist yet, create it and kill this worker process at the task's second forward of the
    model's network (mid-job, or mid-build). The marker makes it happen once, so a retry succeeds."""

    def __init__(self, task: Task, bundle: Any) -> None:
        self.handle = None
        spec = os.environ.get(FAULT_ENV, "")
        prefix, _, marker = spec.partition(":")
        if not prefix or not marker or not task.job_id.startswith(prefix):
            return
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{task.job_id} attempt {task.attempt} pid {os.getpid()}\n".encode())
        os.close(fd)
        calls = [0]

        def die(module: torch.nn.Module, args: tuple) -> None:
            calls[0] += 1
            if calls[0] >= 2:
                os._exit(17)

        self.handle = bundle.denoiser.net.register_forward_pre_hook(die)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()


def worker_outcome(task: Task, fn: Any, info: dict[str, Any]) -> Outcome:
    """Run ``fn`` (a task on this worker) and wrap its result or its error as an :class:`Outcome`."""
    t0 = time.perf_counter()
    try:
        row, samples = fn()
        path = samples if isinstance(samples, str) else None
        array = None if path is not None else samples
        return Outcome(task, row=row, samples=array, samples_path=path, worker=info, wall_s=time.perf_counter() - t0)
    except Exception as e:
        return Outcome(
            task, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(), worker=info, wall_s=time.perf_counter() - t0
        )
