"""Per configuration: the metric and latency over commits, a rolling baseline, steps, a status.

For each configuration (model, method, knobs, steps, guidance) of a suite, its runs in commit
order are split by cohort (:mod:`bench.history.cohort`). The latest run is compared with the
*rolling baseline* of its cohort, the median of the last ``k`` earlier runs of that cohort:

- CALIBRATION_NEEDED: fewer than ``min_runs`` earlier runs of the latest run's cohort (a new
  configuration, or the suite's evaluation settings, device, libraries, bench, weights or metric
  code changed: what changed is listed). Never a regression: a new cohort's first runs are its
  calibration (with one run there is no spread to judge a latency by);
- REGRESSION: the latest run failed, or its quality is worse than the baseline by more than the
  baseline runs' median CI half-width (on the worse side) plus ``quality_tol`` of the baseline, or
  its latency per image is above ``(1 + speed_tol)`` times the baseline and by more than 3 robust
  standard deviations of the baseline runs' latencies (a noisy machine widens the band);
- IMPROVEMENT: better by as much on either axis (and no regression);
- PASS otherwise.
Steps (:mod:`bench.history.steps`) are detected within each cohort's series, for quality and for
latency, and name the first commit of each step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench.history.cohort import cohort_diff
from bench.history.defaults import (
    DEFAULT_K,
    DEFAULT_MIN_RUNS,
    DEFAULT_QUALITY_TOL,
    DEFAULT_SPEED_TOL,
    LATENCY,
    higher_is_better,
)
from bench.history.steps import DEFAULT_PENALTY_FACTOR, Step, detect_steps
from bench.report.data import config_key, config_label

PASS, REGRESSION, IMPROVEMENT, CALIBRATION_NEEDED = "PASS", "REGRESSION", "IMPROVEMENT", "CALIBRATION_NEEDED"
LATENCY_MIN_REL = 0.10  # a latency step smaller than 10% is not reported


@dataclass
class NamedStep:
    axis: str  # the metric's name, or "latency"
    commit: str  # the first commit of the new level
    run_id: str
    index: int  # position in the configuration's series
    before: float
    after: float
    worse: bool

    def text(self) -> str:
        word = "worse" if self.worse else "better"
        return f"{self.axis} {self.before:.4g} -> {self.after:.4g} ({word}) from commit {self.commit[:10]} (run {self.run_id})"


@dataclass
class ConfigHistory:
    model: str
    label: str
    points: pd.DataFrame  # commit, run_id, started, cohort, status, value, low, high, latency, latency_iqr
    status: str
    reasons: list[str] = field(default_factory=list)
    steps: list[NamedStep] = field(default_factory=list)
    baseline_value: float = math.nan
    baseline_latency: float = math.nan
    n_baseline: int = 0


@dataclass
class History:
    suite: str
    metric: str
    k: int
    quality_tol: float
    speed_tol: float
    configs: list[ConfigHistory]
    commits: list[str]
    min_runs: int = DEFAULT_MIN_RUNS

    @property
    def ok(self) -> bool:
        return not any(c.status == REGRESSION for c in self.configs)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys((PASS, REGRESSION, IMPROVEMENT, CALIBRATION_NEEDED), 0)
        for c in self.configs:
            out[c.status] += 1
        return out


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _robust_sd(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return 1.4826 * float(np.median(np.abs(x - np.median(x)))) if len(x) else 0.0


def _series_steps(pts: pd.DataFrame, col: str, axis: str, worse_up: bool, min_rel: float, penalty: float) -> list[NamedStep]:
    out = []
    for _, g in pts.groupby("cohort", sort=False):
        idx = g.index.to_numpy()
        steps: list[Step] = detect_steps(g[col].to_numpy(float), penalty_factor=penalty, min_rel=min_rel)
        for s in steps:
            i = int(idx[s.index])
            out.append(
                NamedStep(
                    axis,
                    str(pts.at[i, "commit"]),
                    str(pts.at[i, "run_id"]),
                    i,
                    s.before,
                    s.after,
                    (s.after > s.before) == worse_up,
                )
            )
    return out


def analyse_config(
    pts: pd.DataFrame,
    metric: str,
    k: int,
    quality_tol: float,
    speed_tol: float,
    penalty: float = DEFAULT_PENALTY_FACTOR,
    min_runs: int = DEFAULT_MIN_RUNS,
) -> tuple[str, list[str], list[NamedStep], float, float, int]:
    """Status, reasons, steps, baseline value and latency, number of baseline runs of one configuration's series."""
    higher = higher_is_better(metric)
    ok = pts[pts["status"] == "ok"]
    steps = _series_steps(ok, "value", metric, not higher, quality_tol, penalty)
    steps += _series_steps(ok, "latency", "latency", True, LATENCY_MIN_REL, penalty)
    steps.sort(key=lambda s: s.index)
    last = pts.iloc[-1]
    earlier = ok[ok.index < pts.index[-1]]
    same = earlier[earlier["cohort"] == last["cohort"]].tail(k)
    if len(same) < min_runs:
        reasons = [f"{len(same)} earlier run(s) of this cohort, {min_runs} needed for a baseline: calibrating"]
        other = earlier[earlier["cohort"] != last["cohort"]]
        if len(other):
            prev = other.iloc[-1]
            first = pts[(pts.index > prev.name) & (pts["cohort"] == last["cohort"])].iloc[0]
            changed = cohort_diff(json.loads(prev["cohort_fields"] or "{}"), json.loads(last["cohort_fields"] or "{}"))
            reasons.append(f"cohort changed at commit {str(first['commit'])[:10]}: " + "; ".join(changed[:6]))
        return CALIBRATION_NEEDED, reasons, steps, math.nan, math.nan, len(same)
    base_v = float(np.nanmedian(same["value"])) if same["value"].notna().any() else math.nan
    base_l = float(np.nanmedian(same["latency"])) if same["latency"].notna().any() else math.nan
    if last["status"] != "ok":
        return REGRESSION, [f"failed in the latest run ({last.get('error', '')})"], steps, base_v, base_l, len(same)
    regress, improve = [], []
    v = _f(last["value"])
    if math.isfinite(v) and math.isfinite(base_v):
        half = (same["value"] - same["low"]) if higher else (same["high"] - same["value"])
        h = float(np.nanmedian(half.clip(lower=0))) if half.notna().any() else 0.0
        worse = (base_v - v) if higher else (v - base_v)
        band = h + quality_tol * abs(base_v)
        if worse > band:
            regress.append(f"{metric} {v:.4g} worse than the rolling baseline {base_v:.4g} by more than {band:.3g}")
        elif -worse > band:
            improve.append(f"{metric} {v:.4g} better than the rolling baseline {base_v:.4g} by more than {band:.3g}")
    lat = _f(last["latency"])
    if math.isfinite(lat) and math.isfinite(base_l) and base_l > 0:
        noise = 3 * _robust_sd(same["latency"].to_numpy(float))
        if lat > base_l * (1 + speed_tol) and lat - base_l > noise:
            regress.append(
                f"latency {lat * 1e3:.3g} ms per image, {lat / base_l:.2f}x the rolling baseline {base_l * 1e3:.3g} ms"
            )
        elif lat < base_l / (1 + speed_tol) and base_l - lat > noise:
            improve.append(
                f"latency {lat * 1e3:.3g} ms per image, {lat / base_l:.2f}x the rolling baseline {base_l * 1e3:.3g} ms"
            )
    status = REGRESSION if regress else IMPROVEMENT if improve else PASS
    return status, regress or improve, steps, base_v, base_l, len(same)


def build_history(
    rows: pd.DataFrame,
    suite: str,
    metric: str,
    k: int = DEFAULT_K,
    quality_tol: float = DEFAULT_QUALITY_TOL,
    speed_tol: float = DEFAULT_SPEED_TOL,
    penalty: float = DEFAULT_PENALTY_FACTOR,
    min_runs: int = DEFAULT_MIN_RUNS,
) -> History:
    """``rows``: :func:`bench.history.db.suite_history` output (with the metric, its CI and latency columns)."""
    if k < 1 or min_runs < 1 or min_runs > k or quality_tol < 0 or speed_tol < 0:
        raise ValueError("--k and --min-runs must be >= 1, --min-runs <= --k, and the tolerances >= 0")
    df = rows.reset_index(drop=True)
    df["_key"] = [config_key(r) for _, r in df.iterrows()]
    commits = list(dict.fromkeys(df["commit"].astype(str)))
    configs = []
    for key, g in df.groupby("_key", sort=True):
        first = g.iloc[0]
        pts = pd.DataFrame(
            {
                "commit": g["commit"].astype(str),
                "run_id": g["run_id"].astype(str),
                "started": g["started"].astype(str),
                "cohort": g["cohort"].fillna("unrecorded").astype(str),
                "cohort_fields": g["cohort_fields"].fillna("{}"),
                "status": g["status"].astype(str),
                "error": g["error"].astype(str) if "error" in g else "",
                "value": pd.to_numeric(g[metric], errors="coerce"),
                "low": pd.to_numeric(g[f"{metric}_ci_low"], errors="coerce"),
                "high": pd.to_numeric(g[f"{metric}_ci_high"], errors="coerce"),
                "latency": pd.to_numeric(g[LATENCY], errors="coerce"),
                "latency_iqr": pd.to_numeric(g.get("latency_per_image_iqr_s"), errors="coerce"),
            }
        ).reset_index(drop=True)
        status, reasons, steps, bv, bl, nb = analyse_config(pts, metric, k, quality_tol, speed_tol, penalty, min_runs)
        configs.append(ConfigHistory(str(key[0]), config_label(first), pts, status, reasons, steps, bv, bl, nb))
    return History(suite, metric, k, quality_tol, speed_tol, configs, commits, min_runs)


def markdown(h: History) -> str:
    from bench.report import fmt

    c = h.counts()
    out = [
        f"# bench history: {h.suite} ({len(h.commits)} commits, {len(h.configs)} configurations)\n",
        f"- quality metric: {h.metric} ({'higher' if higher_is_better(h.metric) else 'lower'} is better); rolling baseline: "
        f"median of the last {h.k} runs of the same cohort; tolerances: quality {h.quality_tol:.1%} beyond the CI, "
        f"latency {h.speed_tol:.0%} beyond 3 robust SDs",
        f"\n**{'PASS' if h.ok else 'FAIL'}**: " + ", ".join(f"{n} {s}" for s, n in c.items()) + "\n",
    ]
    rows = []
    for cfg in h.configs:
        last = cfg.points.iloc[-1]
        rows.append(
            [
                cfg.model,
                cfg.label,
                len(cfg.points),
                fmt.ci(last["value"], last["low"], last["high"]),
                fmt.num(cfg.baseline_value),
                fmt.ms(last["latency"]),
                fmt.ms(cfg.baseline_latency),
                "; ".join(s.text() for s in cfg.steps) or "-",
                cfg.status,
                "; ".join(cfg.reasons) or "-",
            ]
        )
    header = ["model", "configuration", "runs", f"{h.metric} (latest) [CI]", "baseline", "latency/img", "baseline", "steps",
              "status", "why"]  # fmt: skip
    out.append(fmt.markdown_table(header, rows))
    return "\n".join(out)
