"""The reference configuration of each model and speedup at matched quality.

*Reference configuration* (per model), in this order:
1. an explicit spec (``bench report --reference method=dpmpp_2m,steps=20,guidance=2`` or the
   suite's ``reference:`` entry); if it leaves fields open, the rule below picks among the
   jobs it matches;
2. otherwise the rule: among finished jobs of training-free solvers (family ``solver``,
   training ``free``) at the model's most common guidance scale, the one with the most NFE;
   ties (between equally common scales, then between jobs) go to the better quality, then to
   the method name.

*Matched quality*: a configuration matches when its quality metric is no worse than the
reference's by more than the margin ``tol * |reference|`` plus, by default, the half-width of
the reference's 95% CI on the worse side (the same rule as ``bench compare`` uses for a
regression: a difference the reference's own measurement cannot resolve is not held against a
configuration). The direction of "worse" comes from the metric registry. *Speedup at matched
quality* of a method: reference cost divided by the cost of the cheapest configuration of that
method (any knobs, steps, guidance) that matches. Cost is the median latency per image unless
another cost column is chosen.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench.adapter import TRAINING_CLASSES
from bench.report.data import RunError, canonical_knobs, config_label, higher_is_better, method_defaults

DEFAULT_QUALITY_TOL = 0.10
COST_NAMES = {"latency_per_image_s": "latency", "nfe": "nfe", "flops": "flops"}
COSTS = tuple(COST_NAMES)


@dataclass(frozen=True)
class ReferenceSpec:
    """Which job is the reference; a field left None is open (the default rule chooses)."""

    method: str | None = None
    steps: int | None = None
    guidance: float | None = None
    knobs: Mapping[str, Any] | None = None
    model: str | None = None  # None: applies to every model

    @classmethod
    def parse(cls, text: str) -> ReferenceSpec:
        """``method=ddim,steps=20,guidance=2[,model=digits-unet][,<knob>=<value>...]``."""
        fields: dict[str, Any] = {}
        knobs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in _split_outside_brackets(text))):
            if "=" not in part:
                raise RunError(f"reference {text!r}: {part!r} is not key=value; e.g. method=dpmpp_2m,steps=20,guidance=2")
            k, v = (s.strip() for s in part.split("=", 1))
            if k == "steps":
                fields[k] = int(v)
            elif k == "guidance":
                fields[k] = float(v)
            elif k in ("method", "model"):
                fields[k] = v
            else:
                knobs[k] = _scalar(v)
        return cls(**fields, knobs=knobs or None)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> ReferenceSpec:
        bad = sorted(set(d) - {"method", "steps", "guidance", "knobs", "model"})
        if bad:
            raise RunError(f"reference: unknown key {bad[0]!r}; use method, steps, guidance, knobs, model")
        return cls(
            method=d.get("method"),
            steps=None if d.get("steps") is None else int(d["steps"]),
            guidance=None if d.get("guidance") is None else float(d["guidance"]),
            knobs=dict(d["knobs"]) if d.get("knobs") else None,
            model=d.get("model"),
        )

    def selects(self, row: pd.Series) -> bool:
        if self.method is not None and row["method"] != self.method:
            return False
        if self.steps is not None and int(row["steps"]) != self.steps:
            return False
        if self.guidance is not None and not np.isclose(float(row["guidance"]), self.guidance):
            return False
        if self.knobs:
            have = {**method_defaults(str(row["method"])), **json.loads(canonical_knobs(row["knobs"]))}
            if any(have.get(k) != v for k, v in self.knobs.items()):
                return False
        return True

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("model", self.model), ("method", self.method), ("steps", self.steps)) if v is not None]
        if self.guidance is not None:
            parts.append(f"guidance={self.guidance:g}")
        parts += [f"{k}={v}" for k, v in (self.knobs or {}).items()]
        return ",".join(parts) or "(open)"


def _split_outside_brackets(text: str) -> list[str]:
    """Split on commas that are not inside [...] (model labels look like ``gmm[dim=2,prediction=eps]``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def _scalar(v: str) -> Any:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def specs_from(value: Any) -> list[ReferenceSpec]:
    """Specs from a suite's ``reference:`` value (a mapping, or a list of mappings with ``model``)."""
    if not value:
        return []
    if isinstance(value, Mapping):
        return [ReferenceSpec.from_mapping(value)]
    if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        return [ReferenceSpec.from_mapping(v) for v in value]
    raise RunError(f"reference: expected a mapping or a list of mappings, got {value!r}")


@dataclass(frozen=True)
class Reference:
    """A model's reference job (``index`` into the run's table) and how it was chosen."""

    model: str
    index: int
    rule: str
    label: str = ""


def worse_by(value: float, ref: float, higher: bool) -> float:
    """How much worse ``value`` is than ``ref`` (positive: worse), in the metric's units."""
    return (ref - value) if higher else (value - ref)


def within_tolerance(
    value: float, ref: float, higher: bool, tol: float, ref_low: float = np.nan, ref_high: float = np.nan
) -> bool:
    """Quality no worse than the reference by more than ``tol * |ref|`` plus the reference's CI
    half-width on the worse side (pass no CI to use the tolerance alone)."""
    if np.isnan(value) or np.isnan(ref):
        return False
    half = (ref - ref_low) if higher else (ref_high - ref)
    half = 0.0 if np.isnan(half) else max(half, 0.0)
    return worse_by(value, ref, higher) <= half + tol * abs(ref) + 1e-12 * max(1.0, abs(ref))


def _most_common_guidances(rows: pd.DataFrame) -> list[float]:
    """The guidance scale(s) with the most jobs (several when tied)."""
    counts = rows["guidance"].astype(float).value_counts()
    return sorted(float(g) for g in counts[counts == counts.max()].index)


TIE_RTOL = 1e-9  # scores this close are one score: rounding, not quality (two solvers that are one algorithm)


def _pick_highest_nfe(rows: pd.DataFrame, metric: str) -> int:
    """Most NFE; ties: better quality (within :data:`TIE_RTOL` a tie), then method name, then knobs.
    Without the tolerance, DDIM and Euler on the GMM (one algorithm there) swapped places as the
    reference from one machine to another on the last bit of their scores."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    order = rows.assign(_q=sign * rows[metric].astype(float), _nfe=-rows["nfe"].astype(float))
    order = order.sort_values(["_nfe", "_q", "method", "knobs"], kind="stable", na_position="last")
    first = order["_nfe"].iloc[0]
    top = order[order["_nfe"].isna()] if np.isnan(first) else order[order["_nfe"] == first]
    best = top["_q"].iloc[0]
    if np.isfinite(best):
        top = top[np.isclose(top["_q"], best, rtol=TIE_RTOL, atol=0.0)]
    return int(top.sort_values(["method", "knobs"], kind="stable").index[0])


def default_rule_text() -> str:
    return (
        "the training-free solver job (family solver, training free) with the most NFE at the model's most common "
        "guidance scale; ties (of scales, then of jobs) go to the better quality (scores within 1e-9 of each other tie), "
        "then to the method name"
    )


def choose_references(ok: pd.DataFrame, metric: str, specs: Iterable[ReferenceSpec] = ()) -> dict[str, Reference]:
    """The reference job of every model in ``ok`` (finished jobs only)."""
    specs = list(specs)
    models = sorted(ok["model"].unique())
    for s in specs:
        if s.model is not None and s.model not in models:
            raise RunError(f"reference {s.describe()}: model {s.model!r} is not in this run; its models: {', '.join(models)}")
    refs: dict[str, Reference] = {}
    for model, rows in ok.groupby("model", sort=True):
        rows = rows[rows[metric].notna()]
        if rows.empty:
            continue
        mine = [s for s in specs if s.model == model] or [s for s in specs if s.model is None]
        if mine:
            spec = mine[0]
            chosen = rows[rows.apply(spec.selects, axis=1)]
            if chosen.empty:
                valid = sorted({config_label(r) for _, r in rows.iterrows()})[:12]
                if spec.model is not None:
                    raise RunError(
                        f"reference {spec.describe()} matches no finished job of {model}; "
                        f"choose one of: {'; '.join(valid)}{' ...' if len(rows) > 12 else ''}"
                    )
                # a suite-wide spec that does not fit this model: fall back to the rule
            else:
                idx = _pick_highest_nfe(chosen, metric)
                refs[model] = Reference(model, idx, f"given: {spec.describe()}", config_label(ok.loc[idx]))
                continue
        pool = rows[(rows["training"] == "free") & (rows["family"] == "solver")]
        note = ""
        if pool.empty:
            pool, note = rows, " (no training-free solver ran: chosen among all jobs)"
        common = _most_common_guidances(pool)
        pool = pool[[any(np.isclose(float(g), c) for c in common) for g in pool["guidance"]]]
        idx = _pick_highest_nfe(pool, metric)
        refs[model] = Reference(model, idx, "rule: " + default_rule_text() + note, config_label(ok.loc[idx]))
    return refs


@dataclass
class Speedups:
    """Per (model, method): the matched configuration and its speedups over the reference."""

    table: pd.DataFrame
    references: dict[str, Reference]
    metric: str
    tol: float
    cost: str = "latency_per_image_s"
    match_ci: bool = True
    notes: list[str] = field(default_factory=list)
    paired: bool = False

    def rule(self) -> str:
        """The matching rule in words, for reports."""
        if self.paired:
            return (
                f"paired 95% CI of {self.metric} minus the reference's, over the same seeds, excludes a loss of more than "
                f"{self.tol:.0%} of the reference value"
            )
        ci = " plus the half-width of the reference's 95% CI on the worse side" if self.match_ci else ""
        return f"{self.metric} is no worse than the reference's by more than {self.tol:.0%} of the reference value{ci}"


def paired_within_tolerance(ci: tuple[float, float] | None, ref: float, higher: bool, tol: float) -> bool:
    """A configuration matches by the paired rule when the worse end of the paired 95% interval of
    (configuration - reference) is no worse than ``tol * |ref|``; no interval: no match."""
    if ci is None or not np.isfinite(ref):
        return False
    lo, hi = ci
    worst = -lo if higher else hi
    return bool(np.isfinite(worst)) and worst <= tol * abs(ref) + 1e-12 * max(1.0, abs(ref))


def quoted_columns(row: pd.Series) -> dict[str, Any]:
    """Where a row's training cost comes from: ``measured`` (bench's own builds) or ``quoted`` (a
    released student's paper: GPU-hours, NaN where not published, and the citation)."""
    source = row.get("train_cost_source")
    quoted = isinstance(source, str) and source == "quoted"
    gpu_h = pd.to_numeric(pd.Series([row.get("train_cost_quoted_gpu_h")]), errors="coerce").iloc[0]
    return {
        "train_cost_source": "quoted" if quoted else "measured",
        "train_cost_quoted_gpu_h": float(gpu_h) if quoted else np.nan,
        "train_cost_citation": str(row.get("train_cost_citation") or "") if quoted else "",
    }


def matched_speedups(
    ok: pd.DataFrame,
    metric: str,
    references: dict[str, Reference],
    tol: float = DEFAULT_QUALITY_TOL,
    cost: str = "latency_per_image_s",
    match_ci: bool = True,
    paired: Mapping[int, tuple[float, float]] | None = None,
) -> Speedups:
    """For each method of each model, the cheapest configuration that matches the reference's
    quality (``tol`` plus, with ``match_ci``, the reference's CI half-width; or, given ``paired``
    intervals of each row's difference to its reference over the same seeds, by
    :func:`paired_within_tolerance`), and reference cost / its cost (also in NFE, FLOPs and latency).

    Methods with no matching configuration get ``matched=False``, NaN speedups, and their
    best-quality configuration in ``row`` (so the leaderboard can still show it).
    """
    if cost not in COSTS:
        raise RunError(f"cost {cost!r} is not one of {', '.join(COSTS)}")
    if tol < 0:
        raise RunError(f"quality tolerance must be >= 0, got {tol}")
    higher = higher_is_better(metric)
    out = []
    for model, ref in references.items():
        rows = ok[(ok["model"] == model) & ok[metric].notna()]
        r = ok.loc[ref.index]
        for method, mrows in rows.groupby("method", sort=True):
            lo, hi = (float(r.get(f"{metric}_ci_{e}", np.nan)) if match_ci else np.nan for e in ("low", "high"))
            if paired is not None:
                ok_rows = [
                    idx == ref.index or paired_within_tolerance(paired.get(idx), float(r[metric]), higher, tol)
                    for idx in mrows.index
                ]
            else:
                ok_rows = [within_tolerance(float(q), float(r[metric]), higher, tol, lo, hi) for q in mrows[metric]]
            match = mrows[ok_rows]
            rec: dict[str, Any] = {
                "model": model,
                "method": method,
                "family": mrows["family"].iloc[0],
                "training": mrows["training"].iloc[0],
                "ref_row": ref.index,
                "is_reference_method": method == r["method"],
            }
            if len(match):
                sign = -1.0 if higher else 1.0
                best = match.assign(_c=match[cost].astype(float), _q=sign * match[metric].astype(float))
                idx = int(best.sort_values(["_c", "_q"], kind="stable").index[0])
                c = ok.loc[idx]
                rec |= {"matched": True, "row": idx}
                for col, name in COST_NAMES.items():
                    rec[f"speedup_{name}"] = float(r[col]) / float(c[col]) if float(c[col]) > 0 else np.nan
                rec["speedup"] = rec[f"speedup_{COST_NAMES[cost]}"]
                rec["train_cost_s"] = float(c.get("train_cost_s") or 0.0)
            else:
                sign = -1.0 if higher else 1.0
                idx = int(mrows.assign(_q=sign * mrows[metric].astype(float)).sort_values("_q", kind="stable").index[0])
                rec |= {"matched": False, "row": idx, "speedup": np.nan}
                rec |= {"speedup_latency": np.nan, "speedup_nfe": np.nan, "speedup_flops": np.nan}
                rec["train_cost_s"] = float(pd.to_numeric(mrows["train_cost_s"], errors="coerce").fillna(0).max())
            rec |= quoted_columns(ok.loc[rec["row"]])
            out.append(rec)
    table = pd.DataFrame(out)
    if len(table):
        table["training_rank"] = [
            TRAINING_CLASSES.index(t) if t in TRAINING_CLASSES else len(TRAINING_CLASSES) for t in table["training"]
        ]
        table = table.sort_values(["model", "matched", "speedup"], ascending=[True, False, False], kind="stable").reset_index(
            drop=True
        )
    return Speedups(table, references, metric, tol, cost, match_ci, paired=paired is not None)
