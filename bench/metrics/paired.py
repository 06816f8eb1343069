"""Paired comparisons between methods that share seeds.

Sample k of every job of a suite starts from the same noise, so two jobs' samples are pairs. The
difference of a metric between them is bootstrapped by drawing the *same* index sets for both
jobs: the seed-to-seed variation they share cancels, and the interval is far narrower than the
two separate intervals suggest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.metrics.base import MetricContext, MetricValue, centred_interval
from bench.registry import METRICS
from bench.store import load_samples


@dataclass(frozen=True)
class PairedDifference:
    """metric(a) - metric(b) with its paired bootstrap interval."""

    metric: str
    a: float
    b: float
    diff: MetricValue
    n: int

    @property
    def significant(self) -> bool:
        """The 95% interval of the difference excludes 0."""
        return bool(self.diff.ci_low > 0 or self.diff.ci_high < 0)

    @property
    def a_better(self) -> bool:
        higher = METRICS.entry(self.metric).meta["higher_is_better"]
        return (self.diff.value > 0) == higher


def paired_difference(metric: str, ctx_a: MetricContext, ctx_b: MetricContext, alpha: float = 0.05) -> PairedDifference:
    """Bootstrap of metric(a) - metric(b) over index sets drawn once and used for both jobs."""
    fn = METRICS.get(metric)
    sa, sb = fn.statistic(ctx_a), fn.statistic(ctx_b)
    if sa.n != sb.n:
        raise ValueError(f"paired {metric}: the jobs have {sa.n} and {sb.n} samples; pairs need equal counts and seeds")
    idx_all = np.arange(sa.n)
    va, vb = float(sa.fn(idx_all)), float(sb.fn(idx_all))
    draws = ctx_a.resample_indices(sa.n)
    boots = np.array([float(sa.fn(i)) - float(sb.fn(i)) for i in draws])
    lo, hi = centred_interval(va - vb, boots, alpha)
    return PairedDifference(metric, va, vb, MetricValue(va - vb, lo, hi), sa.n)


def paired_from_run(
    run_dir: Path, job_a: str, job_b: str, metrics: list[str], bundle, bootstrap: int = 200
) -> list[PairedDifference]:
    """Paired differences between two finished jobs of a run (their ``samples.npy``), on ``bundle``
    (the model both were sampled from)."""
    jobs = Path(run_dir) / "jobs"
    return paired_jobs(jobs / job_a, jobs / job_b, metrics, bundle, bootstrap)


def paired_jobs(dir_a: Path, dir_b: Path, metrics: list[str], bundle, bootstrap: int = 200) -> list[PairedDifference]:
    """Paired differences metric(a) - metric(b) between two finished job directories (``row.json``
    and ``samples.npy``), of one run or of two runs of the same suite; the jobs must share seeds."""
    rows, samples = [], []
    for d in (Path(dir_a), Path(dir_b)):
        if not (d / "samples.npy").is_file():
            raise FileNotFoundError(f"{d}/samples.npy not found: is {d.name} a finished job of {d.parent.parent}?")
        rows.append(json.loads((d / "row.json").read_text()))
        samples.append(torch.from_numpy(load_samples(d / "samples.npy")))
    ra, rb = rows
    if (ra["seed"], ra["n_samples"]) != (rb["seed"], rb["n_samples"]):
        raise ValueError(
            f"jobs {Path(dir_a).name} and {Path(dir_b).name} do not share seeds "
            f"(seed {ra['seed']}/{rb['seed']}, n {ra['n_samples']}/{rb['n_samples']})"
        )
    refs = {r.get("reference_set") or None for r in rows}
    if len(refs) > 1:
        raise ValueError(
            f"jobs {Path(dir_a).name} and {Path(dir_b).name} were scored against different reference sets ({sorted(map(str, refs))})"
        )
    refset = refs.pop()  # what the jobs were scored against (the held-out digits, in a suite of trained methods)
    n = len(samples[0])
    labels = torch.arange(n) % bundle.num_classes if bundle.num_classes is not None else None
    ctxs = [MetricContext(s, labels, bundle, bootstrap=bootstrap, seed=int(ra["seed"]), refset=refset) for s in samples]
    out = []
    for m in metrics:
        ctxs[0].__dict__.pop("rng", None)  # the same draws for every metric
        out.append(paired_difference(m, *ctxs))
    return out


# what a metric may consume beyond the samples, labels and model, which paired_from_run does not load
UNPAIRABLE = {"baseline", "start states", "prompts", "reference"}


def select_job(df: Any, text: str) -> Any:
    """The one finished row of ``df`` named by a job id or by a spec ``key=value,...`` (model,
    method, steps, guidance, knobs); several or no matches are an error that lists candidates."""
    from bench.report.matched import ReferenceSpec

    ok = df[df["status"] == "ok"]
    if "=" not in text:
        hit = ok[ok["job_id"] == text]
    else:
        spec = ReferenceSpec.parse(text)
        hit = ok[[(spec.model is None or r["model"] == spec.model) and spec.selects(r) for _, r in ok.iterrows()]]
    if len(hit) != 1:
        some = ", ".join(
            f"{r['job_id']} ({r['model']} {r['method']} {r['steps']} steps w={r['guidance']:g})"
            for _, r in hit.head(6).iterrows()
        )
        what = f"{len(hit)} finished jobs match {text!r}" + (f": {some}; add fields to the spec" if len(hit) else "")
        raise ValueError(
            what + ("" if len(hit) else "; give a job id of results.parquet or model=...,method=...,steps=...,guidance=...")
        )
    return hit.iloc[0]


def paired_between(
    run_dir: Path, a: str, b: str, metrics: list[str] | None = None, bootstrap: int = 200
) -> tuple[list[dict[str, Any]], list[PairedDifference]]:
    """Rows of jobs ``a`` and ``b`` of a finished run and their paired differences on ``metrics``
    (default: the suite's metrics that need no reference configuration)."""
    import pandas as pd

    run_dir = Path(run_dir)
    df = pd.read_parquet(run_dir / "results.parquet")
    record = json.loads((run_dir / "run.json").read_text())
    ra, rb = (select_job(df, t) for t in (a, b))
    if ra["model"] != rb["model"]:
        raise ValueError(f"jobs of different models ({ra['model']}, {rb['model']}) have no paired samples; pick two of one model")
    bundle = run_bundle(record, ra["model"])
    if metrics is None:  # what samples, labels and the model alone determine
        metrics = [m for m in record["suite"]["metrics"] if pairable(m)]
    for m in metrics:
        if not pairable(m):
            raise ValueError(
                f"{m} consumes {METRICS.entry(m).meta['consumes']}, which bench paired does not load; choose another --metric"
            )
    if not metrics:
        raise ValueError("none of the run's metrics can be paired here; pass --metric (e.g. fid, kid, class_acc)")
    rows = [{k: r[k] for k in ("job_id", "model", "method", "knobs", "steps", "guidance")} for r in (ra, rb)]
    return rows, paired_from_run(run_dir, ra["job_id"], rb["job_id"], metrics, bundle, bootstrap)


def pairable(metric: str) -> bool:
    """Whether ``paired_from_run`` can compute ``metric`` (it loads samples, labels and the model only)."""
    return not set(METRICS.entry(metric).meta["consumes"]) & UNPAIRABLE


def run_bundle(record: dict[str, Any], label: str) -> Any:
    """The model bundle of a run's model ``label`` (e.g. ``gmm[dim=2]``), from its run.json record."""
    from bench.models import build_model
    from bench.suite import ModelSpec

    specs = [ModelSpec(m["name"], dict(m.get("options") or {})) for m in record["suite"]["models"]]
    spec = next((m for m in specs if m.label == label), None)
    if spec is None:
        raise ValueError(f"model {label!r} is not in the run's suite ({', '.join(m.label for m in specs)})")
    return build_model(spec.name, **spec.options)
