"""MMHM, the MinMax Harmonic Mean (arXiv 2603.14186), across the configurations of a run.

Definition used here (from the project's methods list; the paper's own text could not be read
from this machine, so any epsilon or clipping it adds is not reproduced): each component metric
is min-max normalised across the compared set, oriented so that 1 is the best value of the set
and 0 the worst (FID: (max - x) / (max - min); IS, CLIP score, PickScore: (x - min) / (max - min)),
and MMHM is the harmonic mean of the normalised components, k / sum_i 1/n_i. A configuration that
is the worst of the set on any component scores 0 (the limit of the harmonic mean), and a
component on which every configuration is equal normalises to 1.

The bounds (min, max per component) can be saved and reused, so a later run is normalised
against the same scale and its MMHM stays comparable; values outside reused bounds are clipped
to [0, 1] and counted. The interval reported beside MMHM is the conservative one obtained from
the components' confidence intervals (each at its pessimistic end, then at its optimistic end),
with the bounds held fixed; it is not itself a 95% bootstrap interval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.io import write_json
from bench.registry import METRICS

PAPER_COMPONENTS = ("fid_inception", "is_inception", "clip_score", "pickscore")
OFFLINE_COMPONENTS = ("fid", "inception_score", "class_acc")  # digits stand-ins: no text, so no CLIP/PickScore


@dataclass
class Bounds:
    """Per component: (min, max) over the set the normalisation was fitted on."""

    components: dict[str, tuple[float, float]]
    fitted_on: str = ""

    def save(self, path: Path) -> None:
        write_json(Path(path), {"components": {k: list(v) for k, v in self.components.items()}, "fitted_on": self.fitted_on})

    @classmethod
    def load(cls, path: Path) -> Bounds:
        d = json.loads(Path(path).read_text())
        return cls({k: (float(v[0]), float(v[1])) for k, v in d["components"].items()}, d.get("fitted_on", ""))


def higher_is_better(metric: str) -> bool:
    return bool(METRICS.entry(metric).meta["higher_is_better"])


def default_components(df: pd.DataFrame) -> tuple[str, ...]:
    """The paper's four when the run has them, else the offline stand-ins."""
    for comps in (PAPER_COMPONENTS, OFFLINE_COMPONENTS):
        if all(c in df.columns and df[c].notna().any() for c in comps):
            return comps
    raise ValueError(
        f"MMHM needs the columns {', '.join(PAPER_COMPONENTS)} (real tier) or {', '.join(OFFLINE_COMPONENTS)} "
        f"(offline tier); the run has {', '.join(c for c in df.columns if f'{c}_ci_low' in df.columns) or 'no metrics'}. "
        "Name the components explicitly to use others"
    )


def fit_bounds(df: pd.DataFrame, components: tuple[str, ...], fitted_on: str = "") -> Bounds:
    out = {}
    for c in components:
        v = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            raise ValueError(f"MMHM: no finite value of {c} to fit its bounds on")
        out[c] = (float(v.min()), float(v.max()))
    return Bounds(out, fitted_on)


def normalise(x: np.ndarray, lo: float, hi: float, higher: bool) -> np.ndarray:
    """Min-max normalisation oriented so that 1 is best; clipped to [0, 1]; 1 when hi == lo."""
    x = np.asarray(x, dtype=float)
    if hi == lo:
        return np.where(np.isnan(x), np.nan, 1.0)
    n = (x - lo) / (hi - lo) if higher else (hi - x) / (hi - lo)
    return np.clip(n, 0.0, 1.0)


def harmonic_mean(parts: np.ndarray) -> np.ndarray:
    """Row-wise harmonic mean of values in [0, 1]; 0 where any part is 0, NaN where any is NaN."""
    parts = np.asarray(parts, dtype=float)
    out = np.full(len(parts), np.nan)
    for i, r in enumerate(parts):
        if np.isnan(r).any():
            continue
        out[i] = 0.0 if (r <= 0).any() else len(r) / np.sum(1.0 / r)
    return out


def mmhm(
    df: pd.DataFrame, components: tuple[str, ...] | None = None, bounds: Bounds | None = None
) -> tuple[pd.DataFrame, Bounds, int]:
    """Columns ``mmhm``, ``mmhm_ci_low``, ``mmhm_ci_high`` and ``mmhm_<component>`` (normalised) for
    every row of ``df``; returns (table, bounds used, number of values clipped by reused bounds)."""
    components = tuple(components or (bounds.components if bounds else default_components(df)))
    missing = [c for c in components if c not in df.columns]
    if missing:
        raise ValueError(f"MMHM: the run has no column {', '.join(missing)}")
    if bounds is None:
        bounds = fit_bounds(df, components)
    else:
        absent = [c for c in components if c not in bounds.components]
        if absent:
            raise ValueError(f"MMHM: the saved bounds have no {', '.join(absent)}; refit them on this run")
    out = pd.DataFrame(index=df.index)
    mid, pess, opt = [], [], []
    clipped = 0
    for c in components:
        lo, hi = bounds.components[c]
        up = higher_is_better(c)
        v = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
        clipped += int(((v < lo) | (v > hi)).sum())
        n = normalise(v, lo, hi, up)
        out[f"mmhm_{c}"] = n
        mid.append(n)
        if f"{c}_ci_low" in df.columns and f"{c}_ci_high" in df.columns:
            a = normalise(pd.to_numeric(df[f"{c}_ci_low"], errors="coerce").to_numpy(dtype=float), lo, hi, up)
            b = normalise(pd.to_numeric(df[f"{c}_ci_high"], errors="coerce").to_numpy(dtype=float), lo, hi, up)
            pess.append(np.minimum(a, b))
            opt.append(np.maximum(a, b))
        else:
            nan = np.full(len(df), np.nan)
            pess.append(nan)
            opt.append(nan)
    out["mmhm"] = harmonic_mean(np.stack(mid, 1))
    out["mmhm_ci_low"] = harmonic_mean(np.stack(pess, 1))
    out["mmhm_ci_high"] = harmonic_mean(np.stack(opt, 1))
    return out, bounds, clipped


def mmhm_run(
    run_dir: Path,
    components: tuple[str, ...] | None = None,
    bounds_path: Path | None = None,
    save_bounds: Path | None = None,
    by: str | None = None,
) -> tuple[pd.DataFrame, int]:
    """MMHM over the finished jobs of a run (or within each ``by`` group), written to
    ``<run>/mmhm.csv``; bounds read from ``bounds_path`` or fitted and optionally saved."""
    df = pd.read_parquet(Path(run_dir) / "results.parquet")
    ok = df[df["status"] == "ok"]
    if ok.empty:
        raise ValueError(f"{run_dir}: no finished jobs to compare")
    bounds = Bounds.load(bounds_path) if bounds_path else None
    if bounds is not None and by is not None:
        raise ValueError("MMHM: reused bounds are global; drop --by to apply them")
    groups = [ok] if by is None else [g for _, g in ok.groupby(by)]
    parts, clipped = [], 0
    for g in groups:
        t, b, c = mmhm(g, components, bounds)
        clipped += c
        parts.append(t)
        if save_bounds and by is None:
            b.fitted_on = b.fitted_on or str(run_dir)
            b.save(save_bounds)
    keys = ["model", "method", "knobs", "steps", "guidance"]
    table = pd.concat([ok[keys], pd.concat(parts)], axis=1).sort_values("mmhm", ascending=False)
    table.to_csv(Path(run_dir) / "mmhm.csv", index=False)
    return table, clipped
