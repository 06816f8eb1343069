"""Accuracy windows: a suite's ``accuracy_windows: {metric: [low, high]}`` (MLPerf's SDXL closed
division: FID in [23.011, 23.950], CLIP score in [31.686, 31.813]) checked against each configuration's
value. A value inside its window passes; the report says which configurations pass every window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from bench.report import fmt
from bench.report.data import config_label
from bench.report.html import esc


@dataclass
class WindowCheck:
    model: str
    configuration: str
    metric: str
    value: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if not math.isfinite(self.value):
            return "missing"
        return (
            "in window" if self.low <= self.value <= self.high else ("below window" if self.value < self.low else "above window")
        )

    @property
    def ok(self) -> bool:
        return self.verdict == "in window"


def windows_of(suite: dict) -> dict[str, tuple[float, float]]:
    """The resolved suite's accuracy windows, ``{metric: (low, high)}``."""
    raw = (suite or {}).get("accuracy_windows") or {}
    return {str(m): (float(w[0]), float(w[1])) for m, w in raw.items()}


def check_windows(ok: pd.DataFrame, windows: dict[str, tuple[float, float]]) -> list[WindowCheck]:
    """Every finished configuration's value of each windowed metric against its window (a metric
    the run did not record is 'missing', never a pass)."""
    out = []
    for _, r in ok.iterrows():
        for metric, (lo, hi) in windows.items():
            v = r.get(metric)
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = math.nan
            out.append(WindowCheck(str(r["model"]), config_label(r), metric, v, lo, hi))
    return out


HEADER = ["model", "configuration", "metric", "value", "window", "verdict"]


def _rows(checks: list[WindowCheck]) -> list[list[str]]:
    return [[c.model, c.configuration, c.metric, fmt.num(c.value), f"[{c.low:g}, {c.high:g}]", c.verdict.upper() if not c.ok else "in window"]
            for c in checks]  # fmt: skip


def passing(checks: list[WindowCheck]) -> list[tuple[str, str]]:
    """(model, configuration) of the configurations inside every window."""
    by: dict[tuple[str, str], bool] = {}
    for c in checks:
        by[(c.model, c.configuration)] = by.get((c.model, c.configuration), True) and c.ok
    return [k for k, v in by.items() if v]


def windows_html(checks: list[WindowCheck]) -> str:
    good = passing(checks)
    text = ", ".join(f"{esc(c)}" for _, c in good) or "none"
    intro = (
        "<p>The suite's accuracy windows (for <code>sdxl-mlperf</code>, MLPerf Inference's SDXL accuracy targets). "
        f"Configurations inside every window: <b>{text}</b>.</p>"
    )
    return intro + fmt.html_table(HEADER, _rows(checks), ["" if c.ok else "fail" for c in checks])


def windows_markdown(checks: list[WindowCheck]) -> str:
    good = passing(checks)
    return (
        "# Accuracy windows\n\nInside every window: " + (", ".join(c for _, c in good) or "none") + "\n\n"
        + fmt.markdown_table(HEADER, _rows(checks))
    )  # fmt: skip
