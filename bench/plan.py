"""``bench plan``: a suite's jobs and what they will cost, before anything runs.

NFE comes from a probe: each job's prepared sampler is run on one sample with the harness's
forward counter on the prepared denoiser (the same count ``run_job`` reports); a job whose
artifacts are not built yet is not probed (its NFE is its step count, marked ~). Time comes from
a probe per model: the median wall time of one network call on a small batch (with and without
the classifier-free-guidance doubling), scaled to the suite's batch size. Network calls per job =
NFE x (batches + warm-up batches).

Artifacts: every artifact the jobs need, whether the artifact store holds it, and for a missing
one an estimate of its build from its declared budget: teacher rows x the probed seconds per
network row, plus optimiser steps x batch x 3 (forward and backward) x the same per-row seconds
(a student the teacher's size). Metrics are not included.

Offline: a model whose weights or inputs are not on this machine (a hub pipeline not in the local
cache, a prompt set not fetched, absent weights) cannot be built, so its jobs have no id yet (the
id holds the weights' hash) and no probe. They are still planned, as the suite expands them, NFE
marked ~ and without ids, and the plan names what to fetch (``absent``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.accounting import ForwardCounter, sync
from bench.artifacts import ArtifactStore, default_artifact_store, load_all, plan_order
from bench.registry import METHODS
from bench.runner import plan_jobs
from bench.seeds import generators, noise
from bench.store import JobStore
from bench.suite import Job, Suite, expand
from bench.threads import torch_threads
from bench.worker import ModelCache


def _cfg_rows(job: Job, bundle: Any) -> int:
    return bundle.denoiser.rows_per_sample(job.guidance, bundle.num_classes is not None)


def probe_nfe(job: Job, bundle: Any, device: str, artifacts: dict[str, Any] | None = None) -> float:
    """Network evaluations per sample of ``job``'s prepared sampler, counted on one sample on the
    denoiser it calls (its ``artifacts`` must be built).

    At one torch thread: a batch of one gains nothing from more, and on busy cores a
    multi-threaded small op can wait far longer for its threads than it computes."""
    prepared = METHODS.get(job.method)(**dict(job.knobs)).prepare(bundle, job.steps, artifacts or {}, job.guidance)
    gens = generators(job.seed, [0], device)
    z = noise(gens, bundle.sample_shape, bundle.dtype, device)
    cond = torch.zeros(1, dtype=torch.long, device=device) if bundle.num_classes is not None else None
    den = prepared.denoiser
    with ForwardCounter(den.net) as counter, torch.no_grad(), torch_threads(1):
        prepared(z, cond, job.guidance, gens)
    return counter.rows / den.rows_per_sample(job.guidance, bundle.num_classes is not None)


def probe_call_seconds(bundle: Any, batch: int, guided: bool, device: str, repeats: int = 2, probe_batch: int = 16) -> float:
    """Wall seconds of one denoiser call on ``batch`` samples (CFG doubles the rows): the median
    of ``repeats`` timed calls on ``min(batch, probe_batch)`` samples, scaled linearly in rows
    (a cheap probe; it errs high where small batches use the device less well)."""
    full, batch = batch, min(batch, probe_batch)
    gens = generators(0, range(batch), device)
    x = noise(gens, bundle.sample_shape, bundle.dtype, device)
    cond = torch.arange(batch, device=device) % bundle.num_classes if bundle.num_classes is not None else None
    t = torch.full((batch,), bundle.t_start / 2, device=device)
    w = 2.0 if guided else 1.0
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            bundle.denoiser(x, t, cond, w)
            sync(device)
            if i:  # the first call is warm-up
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * full / batch


def absent_inputs() -> tuple[type[Exception], ...]:
    """The errors of a model build that mean "not on this machine yet" (each names its fetch command)."""
    from bench.models.pipelines import PipelineAbsentError
    from bench.prompts import PromptSetAbsentError
    from bench.weights import MissingWeightsError

    return (PipelineAbsentError, PromptSetAbsentError, MissingWeightsError)


def _split_absent(jobs: list[Job], models: ModelCache) -> tuple[list[Job], list[Job], dict[str, str]]:
    """``jobs`` whose model builds here, those whose model is not on this machine, and per absent
    model (its label) the error naming what to fetch."""
    absent: dict[str, str] = {}
    present, missing = [], []
    for job in jobs:
        label = job.model.label
        if label not in absent:
            try:
                models.get(job)
            except absent_inputs() as e:
                absent[label] = str(e)
        (missing if label in absent else present).append(job)
    return present, missing, absent


def _job_row(
    job: Job,
    job_id: str | None,
    nfe: float,
    source: str,
    est_s: float | None,
    cached: bool,
    artifacts: list[str],
    planned_as: str,
) -> dict[str, Any]:
    """One job's line of the plan (its network calls and rows are added by the caller)."""
    return {
        "job_id": job_id,
        "model": job.model.label,
        "method": job.method,
        "training": METHODS.get(job.method).training,
        "knobs": json.dumps(dict(job.knobs), sort_keys=True),
        "steps": job.steps,
        "guidance": job.guidance,
        "n_samples": job.n_samples,
        "nfe": nfe,
        "nfe_source": source,
        "est_s": est_s,
        "cached": cached,
        "artifacts": artifacts,
        "planned_as": planned_as,
    }


def plan_suite(
    suite: Suite,
    store_dir: Path | None = None,
    device: str = "auto",
    probe: bool = True,
    workers: int = 1,
    executor: str = "local",
    threads: int | None = None,
    artifact_store: ArtifactStore | None = None,
) -> dict[str, Any]:
    """The jobs of ``suite`` with NFE, network calls, estimated seconds and whether the job store
    already holds them (for a run on ``executor`` with ``threads`` per worker); totals for
    ``workers`` workers."""
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    jobs, skipped = expand(suite)
    models = ModelCache()
    n_threads = threads or (1 if executor == "ray" else torch.get_num_threads())
    jobs, offline, absent = _split_absent(jobs, models)
    planned, duplicates = plan_jobs(suite, jobs, dev, n_threads, models)
    store = JobStore(store_dir) if store_dir is not None else None
    arts = artifact_store or default_artifact_store()
    call_s: dict[tuple[str, bool], float] = {}
    rows, t_probe = [], time.perf_counter()
    for p in planned:
        job = p.job
        bundle = models.get(job)
        if dev != "cpu":
            bundle.denoiser.net.to(dev)
        cfg = _cfg_rows(job, bundle)
        bs = min(job.batch_size, job.n_samples)
        batches = math.ceil(job.n_samples / job.batch_size) + suite.warmup
        nfe, source = float(job.steps), "steps (not probed)"
        missing = [s for s in plan_order(list(p.artifacts)) if arts.get(s.key) is None]
        if p.plan_error:
            source = f"steps (not probed: {p.plan_error})"
        elif probe and not missing:
            nfe, source = probe_nfe(job, bundle, dev, load_all(list(p.artifacts), arts)), "probe"
        elif probe:
            source = "steps (not probed: its artifacts are not built yet)"
        est_s = None
        if probe:
            key = (job.model.label, cfg == 2)
            if key not in call_s:
                with torch_threads(n_threads):  # as the run's workers will
                    call_s[key] = probe_call_seconds(bundle, bs, cfg == 2, dev)
            warm = suite.warmup * min(suite.warmup_batch or bs, bs) / bs  # warm-up calls, in full batches
            est_s = nfe * (batches - suite.warmup + warm) * call_s[key]
        cached = bool(store and (hit := store.get(p.store_key)) is not None and hit.row.get("status") == "ok")
        rows.append(
            _job_row(job, p.job_id, nfe, source, est_s, cached, p.artifact_keys, "reference" if p.for_baseline else "grid")
            | {
                "network_calls": round(nfe * batches),
                "network_rows": round(nfe * cfg * (job.n_samples + suite.warmup * min(suite.warmup_batch or bs, bs))),
            }
        )
    for job in offline:  # not buildable here: as expanded, no id, no probe (see the module docstring)
        why = "steps (not probed: the model is not on this machine)"
        rows.append(
            _job_row(job, None, float(job.steps), why, None, False, [], "grid") | {"network_calls": None, "network_rows": 0}
        )
    artifacts = []
    for spec in plan_order([s for p in planned for s in p.artifacts]):
        found = arts.get(spec.key)
        job = next(p.job for p in planned if spec.key in p.artifact_keys)
        bundle = models.get(job)
        est = None
        if found is None and probe:
            with torch_threads(n_threads):
                row_s = probe_call_seconds(bundle, 16, False, dev) / 16
            b = spec.budget
            est = (
                float(b.get("teacher_rows", 0)) * row_s
                + float(b.get("optimizer_steps", 0)) * float(b.get("batch_size", 0)) * 3 * row_s
            )
        artifacts.append(
            {
                "key": spec.key,
                "label": spec.label,
                "method": spec.method,
                "name": spec.name,
                "model": job.model.label,
                "parents": [q.key for q in spec.parents],
                "exists": found is not None,
                "budget": dict(spec.budget),
                "est_s": est,
                "cost": found.chain_cost if found is not None else None,
            }
        )
    todo = [r for r in rows if not r["cached"]]
    est = [r["est_s"] for r in todo if r["est_s"] is not None]
    build_est = [a["est_s"] for a in artifacts if not a["exists"] and a["est_s"] is not None]
    return {
        "absent": absent,
        "artifacts": artifacts,
        "artifacts_to_build": sum(1 for a in artifacts if not a["exists"]),
        "build_est_s": sum(build_est) if probe else None,
        "suite": suite.name,
        "source": suite.source,
        "device": dev,
        "workers": workers,
        "jobs": rows,
        "skipped_pairs": skipped,
        "duplicate_jobs": duplicates,
        "cached": len(rows) - len(todo),
        "to_run": len(todo),
        "network_rows": sum(r["network_rows"] for r in todo),
        "est_s": sum(est) if probe else None,
        "est_wall_s": sum(est) / max(workers, 1) if probe else None,
        "call_s": {f"{m} ({'cfg' if g else 'no cfg'})": s for (m, g), s in call_s.items()},
        "probe_s": time.perf_counter() - t_probe,
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a terminal table with totals."""
    head = ["model", "method", "knobs (non-default)", "steps", "guidance", "NFE", "net rows", "est s", "cached"]
    body = []
    for r in plan["jobs"]:
        defaults = {k.name: k.default for k in METHODS.get(r["method"]).knobs}
        knobs = ",".join(f"{k}={v}" for k, v in json.loads(r["knobs"]).items() if defaults.get(k) != v) or "-"
        nfe = f"{r['nfe']:g}" + ("" if r["nfe_source"] == "probe" else "~")
        est = "-" if r["est_s"] is None else f"{r['est_s']:.2f}"
        rows_ = "?" if r["job_id"] is None else f"{r['network_rows']:,}"
        body.append([r["model"], r["method"], knobs, str(r["steps"]), f"{r['guidance']:g}", nfe, rows_, est])
        body[-1].append("yes" if r["cached"] else "no")
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [f"suite {plan['suite']} ({plan['source']}): {len(plan['jobs'])} jobs on {plan['device']}"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    lines.append("")
    for s in plan["skipped_pairs"]:
        lines.append(f"skipped (not applicable): {s}")
    if plan["duplicate_jobs"]:
        lines.append(f"dropped {plan['duplicate_jobs']} duplicate job(s) (knob values that resolve to the same setting)")
    lines.append(
        f"to run: {plan['to_run']} jobs ({plan['cached']} already in the job store and will be reused), "
        f"{plan['network_rows']:,} network rows"
    )
    if plan["est_s"] is not None:
        lines.append(
            f"estimated sampling time: {plan['est_s']:.1f} s on one worker, ~{plan['est_wall_s']:.1f} s on {plan['workers']} "
            "(metrics and training not included)"
        )
        for k, v in plan["call_s"].items():
            lines.append(f"  probe: one network call of {k} at the suite's batch size: {1e3 * v:.2f} ms")
    if any(r["nfe_source"] != "probe" for r in plan["jobs"]):
        lines.append("NFE marked ~ is the step count, not a probe")
    for model, why in plan.get("absent", {}).items():
        n = sum(1 for r in plan["jobs"] if r["model"] == model)
        lines.append(f"not on this machine: {model} ({n} jobs planned without ids, probes or artifacts): {why}")
    if plan.get("artifacts"):
        lines.append("")
        lines.append(
            f"artifacts ({len(plan['artifacts'])}; {plan['artifacts_to_build']} to build before the jobs that need them):"
        )
        for a in plan["artifacts"]:
            b = a["budget"]
            budget = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in b.items()) or "-"
            if a["exists"]:
                c = a["cost"] or {}
                state = f"built (cost on record: {c.get('wall_s', 0):.1f} s, {c.get('optimizer_steps', 0)} steps, {c.get('teacher_rows', 0):,} teacher rows)"
            else:
                state = "to build" + (f", estimated {a['est_s']:.0f} s" if a["est_s"] is not None else "")
            lines.append(f"  {a['key'][:12]}  {a['method']}:{a['name']} on {a['model']}  budget: {budget}  {state}")
        if plan.get("build_est_s") is not None and plan["artifacts_to_build"]:
            lines.append(f"estimated build time: {plan['build_est_s']:.0f} s (from the probed seconds per network row)")
    return "\n".join(lines)
