"""Per-category tables of a run on a named prompt set (PartiPrompts, DrawBench, GenEval): each
metric of each configuration on the samples of each prompt category, from the rows' ``per_category``
records (written by the worker, :mod:`bench.metrics.breakdown`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from bench.report import fmt
from bench.report.data import config_label, higher_is_better
from bench.report.html import esc


@dataclass
class CategoryTable:
    model: str
    prompt_set: str
    metric: str
    header: list[str]
    rows: list[list[str]]


def _records(value: object) -> dict:
    if not isinstance(value, str) or not value:
        return {}
    try:
        d = json.loads(value)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def category_tables(ok: pd.DataFrame) -> list[CategoryTable]:
    """One table per (model, prompt set, metric): rows are configurations, columns the categories
    (value [95% CI]) and the number of samples per category; empty when no row has a breakdown."""
    if "per_category" not in ok:
        return []
    out = []
    df = ok.assign(_rec=ok["per_category"].map(_records), _set=ok.get("prompt_set", pd.Series("", index=ok.index)).fillna(""))
    df = df[df["_rec"].map(bool)]
    for (model, pset), g in df.groupby(["model", "_set"], sort=True):
        metrics = sorted({m for rec in g["_rec"] for m in rec})
        for metric in metrics:
            cats = sorted({c for rec in g["_rec"] for c in rec.get(metric, {})})
            if not cats:
                continue
            n = {c: next(rec[metric][c]["n"] for rec in g["_rec"] if c in rec.get(metric, {})) for c in cats}
            header = ["configuration"] + [f"{c} (n={n[c]})" for c in cats]
            rows = []
            for _, r in g.sort_values(["method", "steps", "guidance"]).iterrows():
                per = r["_rec"].get(metric, {})
                rows.append(
                    [config_label(r)]
                    + [fmt.ci(*(per[c][k] for k in ("value", "ci_low", "ci_high"))) if c in per else "-" for c in cats]
                )
            out.append(CategoryTable(str(model), str(pset), metric, header, rows))
    return out


def _direction(metric: str) -> str:
    try:
        return "higher is better" if higher_is_better(metric) else "lower is better"
    except Exception:  # a metric no longer registered
        return "direction unknown"


def categories_html(tables: list[CategoryTable]) -> str:
    body = [
        "<p>Each metric on the samples of each prompt category of the run's prompt set (sample k is conditioned on "
        "prompt k mod the number of prompts; 95% bootstrap intervals within the category). Set distances to a reference "
        "(FID, KID) are not broken down: a category's few samples would measure the sample size.</p>"
    ]
    for t in tables:
        body.append(f"<h3>{esc(t.model)} · {esc(t.prompt_set)} · {esc(t.metric)} ({_direction(t.metric)})</h3>")
        body.append(fmt.html_table(t.header, t.rows))
    return "\n".join(body)


def categories_markdown(tables: list[CategoryTable]) -> str:
    parts = ["# Per-category metrics\n"]
    for t in tables:
        parts.append(f"## {t.model} · {t.prompt_set} · {t.metric} ({_direction(t.metric)})\n")
        parts.append(fmt.markdown_table(t.header, t.rows))
    return "\n".join(parts)
