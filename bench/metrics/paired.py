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

import numpy as np
import torch

from bench.metrics import MetricContext, MetricValue, centred_interval
from bench.registry import METRICS


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
    run_dir = Path(run_dir)
    rows, samples = [], []
    for j in (job_a, job_b):
        d = run_dir / "jobs" / j
        if not (d / "samples.npy").is_file():
            raise FileNotFoundError(f"{d}/samples.npy not found: is {j} a finished job of {run_dir}?")
        rows.append(json.loads((d / "row.json").read_text()))
        samples.append(torch.from_numpy(np.load(d / "samples.npy")))
    ra, rb = rows
    if (ra["seed"], ra["n_samples"]) != (rb["seed"], rb["n_samples"]):
        raise ValueError(
            f"jobs {job_a} and {job_b} do not share seeds (seed {ra['seed']}/{rb['seed']}, n {ra['n_samples']}/{rb['n_samples']})"
        )
    n = len(samples[0])
    labels = torch.arange(n) % bundle.num_classes if bundle.num_classes is not None else None
    ctxs = [MetricContext(s, labels, bundle, bootstrap=bootstrap, seed=int(ra["seed"])) for s in samples]
    out = []
    for m in metrics:
        ctxs[0].__dict__.pop("rng", None)  # the same draws for every metric
        out.append(paired_difference(m, *ctxs))
    return out
