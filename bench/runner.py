"""The local runner: expand a suite, run each job with outside accounting, score, store rows.

Finished jobs are written atomically under ``results/<suite>/<run-id>/jobs/<job-id>/`` and
skipped when the run is resumed, so no finished work is lost.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import bench
from bench.accounting import ForwardCounter, flops_of, median_iqr, peak_memory_bytes, timed
from bench.io import atomic_write, write_json
from bench.metrics import MetricContext
from bench.models import ModelBundle, build_model
from bench.paths import REPO
from bench.registry import METHODS, METRICS
from bench.seeds import generators, noise
from bench.suite import Job, Suite, expand

RESULTS = REPO / "results"
REQUIRED_COLUMNS = [
    "run_id", "suite", "job_id", "status", "model", "method", "family", "training", "knobs", "steps",
    "guidance", "nfe", "flops", "latency_s", "latency_iqr_s", "peak_mem_bytes", "train_cost_s",
    "n_samples", "seed", "git_sha",
]  # fmt: skip


class NonFiniteSamples(RuntimeError):
    """A sampler produced NaN or inf."""


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


class ModelCache:
    """Builds each (model, options) once per process."""

    def __init__(self) -> None:
        self._m: dict[str, ModelBundle] = {}

    def get(self, job: Job) -> ModelBundle:
        key = json.dumps([job.model.name, job.model.options], sort_keys=True)
        if key not in self._m:
            self._m[key] = build_model(job.model.name, **job.model.options)
        return self._m[key]


def run_job(job: Job, bundle: ModelBundle, suite: Suite, device: str = "cpu") -> tuple[dict[str, Any], torch.Tensor]:
    """Sample, account and score one job; returns its row (no run-level columns) and samples."""
    cls = METHODS.get(job.method)
    method = cls(**dict(job.knobs))
    sampler = method.prepare(bundle, job.steps)
    n, bs = job.n_samples, job.batch_size
    conditional = bundle.num_classes is not None
    labels = torch.arange(n) % bundle.num_classes if conditional else None
    cfg_rows = 2 if conditional and job.guidance != 1.0 else 1

    def call(lo: int, hi: int) -> torch.Tensor:
        gens = generators(job.seed, range(lo, hi), device)
        z = noise(gens, bundle.sample_shape, bundle.dtype, device)
        cond = labels[lo:hi].to(device) if labels is not None else None
        return sampler(z, cond, job.guidance, gens)

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
    nfe = counter.rows / (n * cfg_rows)
    flops = flops_of(lambda: call(0, 1))
    lat, iqr = median_iqr(times)
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
        "latency_s": lat,
        "latency_iqr_s": iqr,
        "latency_per_image_s": lat / bs,
        "batch_size": bs,
        "timed_batches": len(times),
        "peak_mem_bytes": peak_memory_bytes(device),
        "train_cost_s": method.train_cost()["wall_s"],
        "n_samples": n,
        "seed": job.seed,
        "device": device,
    }
    start_x = start_t = None
    if counter.first_inputs:
        start_x = torch.cat([x for x, _ in counter.first_inputs])
        start_t = float(counter.first_inputs[0][1].flatten()[0])
    ctx = MetricContext(samples, labels, bundle, start_x, start_t, suite.bootstrap, job.seed)
    for name in suite.metrics + suite.optional_metrics:
        try:
            v = METRICS.get(name)(ctx)
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = v.value, v.ci_low, v.ci_high
        except Exception as e:
            if name not in suite.optional_metrics:
                raise
            row[name] = row[f"{name}_ci_low"] = row[f"{name}_ci_high"] = None
            row["error"] += f"{name}: {e}; "
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


def run_suite(
    suite: Suite, run_id: str | None = None, results_dir: Path = RESULTS, command: str = "", progress: bool = True
) -> Path:
    """Run every job of ``suite`` (skipping those already finished in this run); returns the run dir."""
    run_id = run_id or new_run_id()
    out = Path(results_dir) / suite.name / run_id
    jobs, skipped = expand(suite)
    rec_path = out / "run.json"
    record = json.loads(rec_path.read_text()) if rec_path.is_file() else run_record(suite, run_id, command)
    record["skipped_pairs"] = skipped
    write_json(rec_path, record)
    models = ModelCache()
    sha = record["git_sha"]
    bar = tqdm(jobs, desc=f"{suite.name} {run_id}", unit="job", disable=not progress, file=sys.stderr)
    failed = 0
    for job in bar:
        bundle = models.get(job)
        jid = job.job_id(bundle.weights_hash)
        jdir = out / "jobs" / jid
        if (jdir / "row.json").is_file():
            continue
        bar.set_postfix_str(f"{job.model.label} {job.method} {job.steps} steps w={job.guidance} | failed {failed}")
        try:
            row, samples = run_job(job, bundle, suite)
            atomic_write(jdir / "samples.npy", lambda p, s=samples: np.save(p.open("wb"), s.numpy()))
        except Exception as e:
            failed += 1
            row = {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
                "model": job.model.label,
                "method": job.method,
                "knobs": json.dumps(dict(job.knobs), sort_keys=True),
                "steps": job.steps,
                "guidance": job.guidance,
                "n_samples": job.n_samples,
                "seed": job.seed,
            }
        row |= {"run_id": run_id, "suite": suite.name, "job_id": jid, "git_sha": sha}
        write_json(jdir / "row.json", row)
    bar.close()
    table = collect(out)
    record["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    record["jobs"] = {"total": len(jobs), "failed": int((table["status"] != "ok").sum()) if len(table) else 0}
    write_json(rec_path, record)
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
