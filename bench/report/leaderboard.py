"""The leaderboard: per model, methods ranked by speedup at matched quality, with cost, every
metric with its CI, MMHM and training cost."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bench.report import fmt
from bench.report.data import higher_is_better, method_label
from bench.report.deployment import deployment_marker
from bench.report.matched import Speedups


def mmhm_table(ok: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, dict[str, tuple[str, ...]]]:
    """MMHM (bench.metrics.mmhm) of every finished job, normalised within each model; components:
    the paper's or the offline stand-ins when the run has them, else all of the run's metrics."""
    from bench.metrics.mmhm import default_components, mmhm

    parts, used = [], {}
    for model, g in ok.groupby("model", sort=True):
        try:
            comps = default_components(g)
        except ValueError:
            comps = tuple(m for m in metrics if g[m].notna().any())
        if not comps:
            continue
        parts.append(mmhm(g, comps)[0][["mmhm", "mmhm_ci_low", "mmhm_ci_high"]])
        used[str(model)] = comps
    table = pd.concat(parts) if parts else pd.DataFrame(columns=["mmhm", "mmhm_ci_low", "mmhm_ci_high"])
    return table, used


@dataclass
class Leaderboard:
    """Per model: a header and rows of display strings (ranked), and the reference's label."""

    header: list[str]
    tables: dict[str, list[list[str]]]
    row_classes: dict[str, list[str]]
    references: dict[str, str]
    mmhm_components: dict[str, tuple[str, ...]]

    def markdown(self, speedups: Speedups) -> str:
        out = []
        for model, rows in self.tables.items():
            out.append(f"### {model}\n")
            out.append(
                f"Reference: {self.references[model]}. Speedup = reference {speedups.cost} / {speedups.cost} of the "
                f"method's cheapest configuration whose {speedups.rule()} (FLOPs speedup: the same configuration's "
                "FLOPs ratio). "
                f"MMHM over {', '.join(self.mmhm_components.get(model, ())) or '-'}, normalised over this model's jobs.\n"
            )
            out.append(fmt.markdown_table(self.header, rows))
        return "\n".join(out)


def cost_and_quality(
    r: pd.Series, metrics: list[str], mm: pd.DataFrame, idx: int, train_cost_s: float | None = None
) -> list[str]:
    """The leaderboard cells after the speedups: cost, every metric with CI, MMHM, training."""
    cells = [fmt.num(r["nfe"]), fmt.ms(r["latency_per_image_s"]), fmt.flops(r["flops"])]
    cells += [fmt.ci(r[m], r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")) for m in metrics]
    m = mm.loc[idx] if idx in mm.index else None
    cells.append("-" if m is None else fmt.ci(m["mmhm"], m["mmhm_ci_low"], m["mmhm_ci_high"], 3))
    cost = r.get("train_cost_s") if train_cost_s is None else train_cost_s
    return cells + [str(r["training"]), train_cost_cell(r, cost), _teacher_nfe(r), _artifact(r)]


def train_cost_cell(r: pd.Series, cost: Any) -> str:
    """The training-cost cell: bench's measured duration, or a released student's cost quoted from its
    paper (GPU-hours, or "not published"), said to be quoted and never shown as a measured 0 s."""
    if r.get("train_cost_source") == "quoted":
        h = pd.to_numeric(pd.Series([r.get("train_cost_quoted_gpu_h")]), errors="coerce").iloc[0]
        return f"{float(h):g} GPU-h (quoted)" if pd.notna(h) else "not published (quoted)"
    return fmt.duration(cost)


def _teacher_nfe(r: pd.Series) -> str:
    """Teacher network rows spent making the method's artifacts (counted by the harness)."""
    v = r.get("train_teacher_nfe")
    return "-" if v is None or pd.isna(v) or not float(v) else f"{int(v):,}"


def _artifact(r: pd.Series) -> str:
    """The artifacts a configuration ran with (their store keys, shortened)."""
    v = r.get("artifact_id")
    return ", ".join(k[:10] for k in str(v).split(",")) if isinstance(v, str) and v else "-"


INERT = " [inert]"  # after the method of a configuration that is an inert cache (computes every unit)


def build_leaderboard(ok: pd.DataFrame, speedups: Speedups, metrics: list[str], inert: Collection = ()) -> Leaderboard:
    """One row per method of each model: its matched configuration (or, for a method with none,
    its best-quality configuration, unranked). Rows of ``inert`` (indices of ``ok``: caches that
    compute every unit, :func:`bench.history.audit.inert_rows`) are marked inert."""
    header = ["rank", "method", "steps", "w", "speedup", "FLOPs speedup", "NFE", "latency/img", "FLOPs/img"]
    header += [f"{m} {'↑' if higher_is_better(m) else '↓'} [95% CI]" for m in metrics]
    header += ["MMHM [CI from the metric CIs]", "training", "train cost", "train teacher NFE", "artifact"]
    tables: dict[str, list[list[str]]] = {}
    classes: dict[str, list[str]] = {}
    refs: dict[str, str] = {}
    mm, components = mmhm_table(ok, metrics)
    for model, t in speedups.table.groupby("model", sort=True):
        rows, cls = [], []
        rank = 0
        ref_idx = speedups.references[model].index
        refs[model] = speedups.references[model].label
        rr = ok.loc[ref_idx]
        rows.append(
            [
                "ref",
                method_label(rr) + (INERT if ref_idx in inert else "") + " (reference)",
                fmt.num(rr["steps"]),
                fmt.num(rr["guidance"]),
                "1x",
                "1x",
            ]
            + cost_and_quality(rr, metrics, mm, ref_idx)
        )
        cls.append("reference inert" if ref_idx in inert else "reference")
        for _, s in t.iterrows():
            r = ok.loc[s["row"]]
            if s["matched"]:
                rank += 1
            speed = fmt.ratio(s["speedup"]) if s["matched"] else f"no match (best {fmt.num(r[speedups.metric])})"
            name = method_label(r) + (INERT if s["row"] in inert else "") + (" (= reference)" if s["row"] == ref_idx else "")
            name += deployment_marker(r, rr)  # ran under another dtype / compile / memory format than the reference
            row = [str(rank) if s["matched"] else "-", name, fmt.num(r["steps"]), fmt.num(r["guidance"]), speed]
            row.append(fmt.ratio(s["speedup_flops"]) if s["matched"] else "-")
            rows.append(row + cost_and_quality(r, metrics, mm, s["row"], s["train_cost_s"]))
            cls.append(" ".join(c for c in ("" if s["matched"] else "nomatch", "inert" if s["row"] in inert else "") if c))
        tables[model], classes[model] = rows, cls
    return Leaderboard(header, tables, classes, refs, components)
