"""A run's first views: a quality-vs-latency plot per model and a Markdown table (the full
report with Pareto frontiers and the leaderboard is built on the same results table)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.registry import METRICS  # noqa: E402

PREFERRED = ("fid", "fid_inception", "exact_mse", "kid", "swd", "clip_score", "pickscore", "class_acc")


def primary_metric(df: pd.DataFrame) -> str:
    """The metric the first views plot: the first of ``PREFERRED`` with values, else the first
    registered metric with values (in column order), e.g. PSNR to a reference configuration."""
    names = set(METRICS.names())
    for m in (*PREFERRED, *(c for c in df.columns if c in names)):
        if m in df.columns and pd.to_numeric(df[m], errors="coerce").notna().any():
            return m
    raise ValueError("the results hold no metric to plot")


def config_label(r: pd.Series) -> str:
    knobs = json.loads(r["knobs"]) if isinstance(r["knobs"], str) else {}
    extra = ",".join(f"{k}={v}" for k, v in knobs.items() if v not in (0.0, True, False, None))
    return f"{r['method']}{'[' + extra + ']' if extra else ''}"


LEGEND_INSIDE = 12  # configurations a panel's legend holds inside the axes
LEGEND_ROWS = 30  # rows of a legend beside the panel
LEGEND_CHAR_IN = 0.033  # inches of figure width per character of a legend label beside the panel (6 pt)


def plot_quality_vs_latency(df: pd.DataFrame, path: Path) -> Path:
    ok = df[df["status"] == "ok"]
    metric = primary_metric(ok)
    models = sorted(ok["model"].unique())
    labelled = ok.assign(label=ok.apply(config_label, axis=1)) if len(ok) else ok.assign(label="")
    n_lines = max((len(g.groupby(["label", "guidance"])) for _, g in labelled.groupby("model")), default=0)
    legend_cols = -(-n_lines // LEGEND_ROWS) if n_lines > LEGEND_INSIDE else 0
    longest = max((len(f"{lab} w={g:g}") for lab, g in zip(labelled["label"], labelled["guidance"], strict=True)), default=0)
    width = 6 + legend_cols * (0.6 + LEGEND_CHAR_IN * longest)  # a long legend gets its own columns beside the panel
    fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), 4.5), squeeze=False, layout="constrained")
    for ax, model in zip(axes[0], models, strict=True):
        sub = labelled[labelled["model"] == model]
        for (label, g), grp in sub.groupby(["label", "guidance"]):
            grp = grp.sort_values("latency_per_image_s")
            yerr = [grp[metric] - grp[f"{metric}_ci_low"], grp[f"{metric}_ci_high"] - grp[metric]]
            ax.errorbar(1e3 * grp["latency_per_image_s"], grp[metric], yerr=yerr, marker="o", capsize=2, label=f"{label} w={g:g}")
            for _, r in grp.iterrows():
                ax.annotate(
                    str(int(r["steps"])),
                    (1e3 * r["latency_per_image_s"], r[metric]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        better = "lower" if not METRICS.entry(metric).meta["higher_is_better"] else "higher"
        ax.set(xlabel="latency per image (ms, median)", ylabel=f"{metric} ({better} is better)", title=model)
        if metric in ("exact_mse", "swd"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if legend_cols:  # beside the panel, in columns, not over the points
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=legend_cols, frameon=False)
        else:
            ax.legend(fontsize=7)
    fig.suptitle("quality against latency (numbers: steps; bars: 95% bootstrap CI)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame) -> str:
    metrics = [c for c in df.columns if f"{c}_ci_low" in df.columns]
    cols = ["model", "method", "steps", "guidance", "nfe", "latency_per_image_s", "flops"]
    lines = ["| " + " | ".join(cols + metrics + ["status"]) + " |", "|" + "---|" * (len(cols) + len(metrics) + 1)]
    for _, r in df.iterrows():
        cells = [str(r["model"]), config_label(r), str(r["steps"]), f"{r['guidance']:g}"]
        if r["status"] == "ok":
            cells += [f"{r['nfe']:g}", f"{1e3 * r['latency_per_image_s']:.2f} ms", f"{r['flops'] / 1e6:.1f} M"]
            cells += [
                f"{r[m]:.4g} [{r[m + '_ci_low']:.3g}, {r[m + '_ci_high']:.3g}]" if pd.notna(r[m]) else "missing" for m in metrics
            ]
        else:
            cells += ["-"] * (3 + len(metrics))
        lines.append("| " + " | ".join(cells + [str(r["status"])]) + " |")
    return "\n".join(lines) + "\n"


def failure_lines(df: pd.DataFrame) -> list[str]:
    """One line per failed job: what it was and its error."""
    from bench.report.data import config_label as label

    failed = df[df["status"] != "ok"]
    return [f"FAILED {r['model']} {label(r)}: {r.get('error') or 'no error recorded'}" for _, r in failed.iterrows()]


def write_summary(run_dir: Path) -> tuple[Path | None, Path]:
    """The run's table (``table.md``, failed jobs included, with their errors) and its quality-vs-
    latency plot; no plot (None) when no job finished with a metric value (every job failed, or
    a suite without metrics)."""
    from bench.io import atomic_write

    df = pd.read_parquet(run_dir / "results.parquet")
    ok = df[df["status"] == "ok"]
    try:
        primary_metric(ok)
        plottable = len(ok) > 0
    except ValueError:
        plottable = False
    png = plot_quality_vs_latency(df, run_dir / "quality_vs_latency.png") if plottable else None
    md = run_dir / "table.md"
    text = f"# {run_dir.parent.name} / {run_dir.name}\n\n" + markdown_table(df)
    failures = failure_lines(df)
    if failures:
        text += f"\n## {len(failures)} of {len(df)} jobs failed\n\n" + "".join(f"- {line}\n" for line in failures)
    atomic_write(md, lambda p: p.write_text(text))
    return png, md


def labelled_grid(images: torch.Tensor, labels: list[str], path: Path, title: str, per_row: int) -> Path:
    """Save [-1,1] images (N,1,H,W) as a grid, ``per_row`` per row, each row labelled."""
    from bench.data import to_uint8

    rows = (len(images) + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 0.8, rows * 0.85), squeeze=False)
    pix = to_uint8(images)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < len(pix):
            ax.imshow(pix[i, ..., 0], cmap="gray", vmin=0, vmax=255)
        if i % per_row == 0:
            ax.set_ylabel(labels[i // per_row], rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
