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


def plot_quality_vs_latency(df: pd.DataFrame, path: Path) -> Path:
    ok = df[df["status"] == "ok"]
    metric = primary_metric(ok)
    models = sorted(ok["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sub = ok[ok["model"] == model]
        for (label, g), grp in sub.assign(label=sub.apply(config_label, axis=1)).groupby(["label", "guidance"]):
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
        ax.legend(fontsize=7)
    fig.suptitle("quality against latency (numbers: steps; bars: 95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
