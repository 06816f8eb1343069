"""Each leaderboard configuration against its model's reference, paired over the shared seeds.

Every job of a suite draws sample k from the same seed, so a configuration and the reference are
paired: bootstrapping the *difference* of the quality metric over one set of index draws cancels
the seed-to-seed variation both share, and tells a real quality loss from noise far better than
the two separate confidence intervals (which is what matched quality uses). Needs the run's
samples (``jobs/<id>/samples.npy``) and a metric that samples, labels and the model determine.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.metrics.paired import pairable, paired_jobs, run_bundle
from bench.report import fmt
from bench.report.data import Run, config_label, higher_is_better
from bench.report.matched import Speedups

HEADER = ["model", "configuration", "value", "reference", "difference [paired 95% CI]", "verdict"]


def paired_rows(run: Run, ok: pd.DataFrame, sp: Speedups, bootstrap: int = 100) -> list[list[str]]:
    """One row per leaderboard configuration that is not the reference itself: its value of the
    matching metric, the reference's, their paired difference with its interval, and a verdict."""
    metric = sp.metric
    if run.run_dir is None or not pairable(metric):
        return []
    rows: list[list[str]] = []
    for model, ref in sp.references.items():
        r0 = ok.loc[ref.index]
        bundle: Any = None
        for _, s in sp.table[sp.table["model"] == model].iterrows():
            r = ok.loc[s["row"]]
            da, db = run.job_dir(str(r["job_id"])), run.job_dir(str(r0["job_id"]))
            if r["job_id"] == r0["job_id"] or da is None or db is None:
                continue
            bundle = bundle if bundle is not None else run_bundle(run.record, model)
            (d,) = paired_jobs(da, db, [metric], bundle, bootstrap)
            worse = d.diff.value < 0 if higher_is_better(metric) else d.diff.value > 0
            verdict = ("worse" if worse else "better") + " than the reference" if d.significant else "indistinguishable"
            rows.append(
                [model, config_label(r), fmt.num(d.a), fmt.num(d.b), fmt.ci(d.diff.value, d.diff.ci_low, d.diff.ci_high), verdict]
            )
    return rows


def paired_intervals(
    run: Run, ok: pd.DataFrame, metric: str, references: dict[str, Any], bootstrap: int = 100
) -> dict[int, tuple[float, float]]:
    """For every finished row (by index) of each model, the paired 95% interval of its ``metric``
    minus its model's reference's, over the shared seeds (the reference itself: (0, 0)); rows whose
    samples are not on disk are left out."""
    out: dict[int, tuple[float, float]] = {}
    if run.run_dir is None or not pairable(metric):
        return out
    for model, ref in references.items():
        r0 = ok.loc[ref.index]
        bundle: Any = None
        for idx, r in ok[ok["model"] == model].iterrows():
            if r["job_id"] == r0["job_id"]:
                out[int(idx)] = (0.0, 0.0)
                continue
            da, db = run.job_dir(str(r["job_id"])), run.job_dir(str(r0["job_id"]))
            if da is None or db is None:
                continue
            bundle = bundle if bundle is not None else run_bundle(run.record, model)
            (d,) = paired_jobs(da, db, [metric], bundle, bootstrap)
            out[int(idx)] = (float(d.diff.ci_low), float(d.diff.ci_high))
    return out
