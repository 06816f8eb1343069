"""The history page: per configuration, the quality metric and the latency over commits, with
their bands (the metric's 95% bootstrap CI, the latency's interquartile range over timed batches),
the detected steps marked at their first commit, cohort changes, and the rolling baseline; in
the report's HTML style (:mod:`bench.report.html`: one self-contained page, images embedded)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.history.audit import AuditFinding  # noqa: E402
from bench.history.defaults import higher_is_better  # noqa: E402
from bench.history.track import CALIBRATION_NEEDED, IMPROVEMENT, PASS, REGRESSION, ConfigHistory, History  # noqa: E402
from bench.report import fmt  # noqa: E402
from bench.report.html import esc, figure, page  # noqa: E402

STATUS_CLASS = {REGRESSION: "regression", CALIBRATION_NEEDED: "nomatch", IMPROVEMENT: "", PASS: ""}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:80]


def _mark(ax: plt.Axes, pts: pd.DataFrame, cfg: ConfigHistory, axis: str, ymax_text: bool = True) -> None:
    cohorts = pts["cohort"].tolist()
    for i in range(1, len(cohorts)):
        if cohorts[i] != cohorts[i - 1]:
            ax.axvline(i - 0.5, color="#888", ls="--", lw=1)
            ax.text(i - 0.45, 0.98, "new cohort", transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="#555")
    for s in cfg.steps:
        if s.axis != axis:
            continue
        colour = "#c62828" if s.worse else "#1a7f37"
        ax.axvline(s.index - 0.5, color=colour, lw=1.5)
        ax.text(s.index - 0.45, 0.02, f"step at {s.commit[:7]}", transform=ax.get_xaxis_transform(), fontsize=7, color=colour)


def config_figure(cfg: ConfigHistory, metric: str, path: Path) -> Path:
    pts = cfg.points
    x = np.arange(len(pts))
    fig, (aq, al) = plt.subplots(1, 2, figsize=(11, 3.0))
    v, lo, hi = (pts[c].to_numpy(float) for c in ("value", "low", "high"))
    aq.fill_between(x, lo, hi, color="#1f77b4", alpha=0.2, lw=0, label="95% CI")
    aq.plot(x, v, "o-", color="#1f77b4", ms=3.5, lw=1, label=metric)
    if math.isfinite(cfg.baseline_value):
        aq.axhline(cfg.baseline_value, color="#444", ls=":", lw=1, label=f"rolling baseline (median of last {cfg.n_baseline})")
    aq.set_ylabel(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
    _mark(aq, pts, cfg, metric)
    lat, iqr = 1e3 * pts["latency"].to_numpy(float), 1e3 * pts["latency_iqr"].to_numpy(float)
    iqr = np.where(np.isfinite(iqr), iqr, 0.0)
    al.fill_between(x, lat - iqr / 2, lat + iqr / 2, color="#ff7f0e", alpha=0.25, lw=0, label="IQR of timed batches")
    al.plot(x, lat, "o-", color="#ff7f0e", ms=3.5, lw=1, label="latency per image (median)")
    if math.isfinite(cfg.baseline_latency):
        al.axhline(1e3 * cfg.baseline_latency, color="#444", ls=":", lw=1, label="rolling baseline")
    al.set_ylabel("latency per image (ms)")
    _mark(al, pts, cfg, "latency")
    labels = [c[:7] for c in pts["commit"]]
    for ax in (aq, al):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, fontsize=7, family="monospace")
        ax.set_xlim(-0.6, len(x) - 0.4)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{cfg.model} {cfg.label}: {cfg.status}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_page(h: History, out: Path, db_path: Path | None = None, inert: list[AuditFinding] | None = None) -> Path:
    """``out/index.html`` and one PNG per configuration beside it; ``inert``: the latest run's inert caches."""
    out.mkdir(parents=True, exist_ok=True)
    c = h.counts()
    verdict = (
        f'<p class="{"pass" if h.ok else "fail"}">{"PASS" if h.ok else "FAIL"}: '
        + esc(", ".join(f"{n} {s}" for s, n in c.items()))
        + "</p>"
    )
    header = [
        "model",
        "configuration",
        "runs",
        f"{h.metric} latest [CI]",
        "baseline",
        "latency/img",
        "baseline",
        "status",
        "why",
        "steps",
    ]
    rows, classes = [], []
    for cfg in h.configs:
        last = cfg.points.iloc[-1]
        rows.append(
            [cfg.model, cfg.label, len(cfg.points), fmt.ci(last["value"], last["low"], last["high"]), fmt.num(cfg.baseline_value),
             fmt.ms(last["latency"]), fmt.ms(cfg.baseline_latency), cfg.status, "; ".join(cfg.reasons) or "-",
             "; ".join(s.text() for s in cfg.steps) or "-"]
        )  # fmt: skip
        classes.append(STATUS_CLASS[cfg.status])
    rule = (
        f"<p>Each configuration's latest run against its <b>rolling baseline</b>, the median of the last {h.k} earlier runs of "
        f"its cohort (same suite settings, device, libraries, bench, model weights and metric code); a configuration with "
        f"fewer than {h.min_runs} earlier runs in its cohort is CALIBRATION_NEEDED, never a regression. Regression: quality worse than the baseline by "
        f"more than its CI half-width plus {h.quality_tol:.1%}, or latency above {1 + h.speed_tol:.2g}x the baseline and beyond 3 "
        f"robust SDs of its runs. Steps: penalised piecewise-constant L1 fit within each cohort, named by their first commit.</p>"
    )
    summary = verdict + rule + fmt.html_table(header, rows, classes)
    figs = []
    for i, cfg in enumerate(h.configs):
        png = config_figure(cfg, h.metric, out / f"{i:03d}_{_slug(cfg.model + '_' + cfg.label)}.png")
        cap = (
            f"{esc(cfg.model)} {esc(cfg.label)}: <b>{esc(cfg.status)}</b>. Left: {esc(h.metric)} with its 95% CI band; right: "
            "latency per image with the IQR of the timed batches. Dotted: rolling baseline; grey dashed: cohort change; "
            "red / green: a step to worse / better at its first commit."
        )
        figs.append(figure(png, cap, f"{cfg.model} {cfg.label} history"))
    commits = "<p>" + " ".join(f"<code>{esc(x[:10])}</code>" for x in h.commits) + "</p>"
    db = f'<p>Query every run\'s rows with SQL: <code>bench history {esc(h.suite)} --sql "SELECT ..."</code>' + (
        f" (DuckDB file <code>{esc(db_path)}</code>: tables runs, cohorts; views rows, history)</p>" if db_path else "</p>"
    )
    audits = (
        "<p>Caching configurations of the latest run that compute every unit they enter (units_fraction = 1): their "
        "knobs make them skip nothing, so any speedup they show is noise.</p>"
        + fmt.html_table(["configuration", "finding"], [[f.label, f.detail] for f in inert], ["regression"] * len(inert))
        if inert
        else "<p>No inert cache in the latest run (no caching configuration computes every unit).</p>"
    )
    sections = [
        ("status", "Status per configuration", summary),
        ("audits", "Inert caches", audits),
        ("trends", "Trends", "\n".join(figs)),
        ("commits", "Commits in order", commits + db),
    ]
    index = out / "index.html"
    sub = f"{len(h.commits)} commits, {len(h.configs)} configurations, quality metric {esc(h.metric)}"
    index.write_text(page(f"bench history: {h.suite}", sections, sub))
    return index
