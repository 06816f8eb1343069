"""Figures: Pareto frontiers of quality against cost, and speedup against training cost."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from bench.adapter import FAMILIES, TRAINING_CLASSES  # noqa: E402
from bench.report import fmt  # noqa: E402
from bench.report.data import COST_COLUMNS, higher_is_better, method_label  # noqa: E402
from bench.report.matched import Speedups  # noqa: E402
from bench.report.pareto import pareto_front  # noqa: E402

MARKERS = "osD^vP*Xhp"
TRAINING_NAMES = {
    "free": "training-free",
    "calibration": "calibration",
    "params": "O(1) parameters",
    "finetune": "fine-tuning",
    "full": "full training",
}


def colours(labels: list[str]) -> dict[str, tuple[float, ...]]:
    """A fixed colour per label (sorted), the same in every figure of a report."""
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(sorted(labels))}


def _cost_values(rows: pd.DataFrame, cost: str) -> tuple[np.ndarray, str]:
    """The cost column in readable units, and its axis label."""
    v = rows[cost].astype(float).to_numpy()
    if cost == "latency_per_image_s":
        return 1e3 * v, COST_COLUMNS[cost]
    if cost == "flops":
        top = np.nanmax(v) if np.isfinite(v).any() else 0.0
        for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
            if top >= scale:
                return v / scale, f"{unit} per image"
    return v, COST_COLUMNS[cost]


def _spread(v: np.ndarray) -> float:
    v = v[np.isfinite(v) & (v > 0)]
    return float(v.max() / v.min()) if len(v) else 1.0


def pareto_figure(ok: pd.DataFrame, model: str, metrics: list[str], path: Path, palette: dict[str, tuple[float, ...]]) -> Path:
    """One model: a panel per (quality metric, cost) with CI bars, the frontier as a staircase,
    frontier points labelled 'method steps', others by steps; faded points are surely dominated
    (dominated even at the favourable ends of the CIs)."""
    rows = ok[ok["model"] == model].copy()
    rows["variant"] = rows.apply(method_label, axis=1)
    guidances = sorted(rows["guidance"].astype(float).unique())
    # a cost the run did not measure (e.g. FLOPs of an analytic model: no torch ops) gets no column
    costs = [c for c in COST_COLUMNS if (pd.to_numeric(rows[c], errors="coerce") > 0).any()]
    fig, axes = plt.subplots(len(metrics), len(costs), figsize=(5.2 * len(costs), 3.9 * len(metrics)), squeeze=False)
    front_labels: dict[Any, list[tuple[float, float, str]]] = {}
    for i, m in enumerate(metrics):
        higher = higher_is_better(m)
        sub = rows[rows[m].notna()]
        for j, cost in enumerate(costs):
            ax = axes[i][j]
            x, label = _cost_values(sub, cost)
            y = sub[m].astype(float).to_numpy()
            lo = sub[f"{m}_ci_low"].astype(float).to_numpy()
            hi = sub[f"{m}_ci_high"].astype(float).to_numpy()
            nan = np.full_like(x, np.nan)
            front = pareto_front(np.c_[x, y], [False, higher], np.c_[nan, lo], np.c_[nan, hi])
            for k, (_, r) in enumerate(sub.iterrows()):
                on, plaus = front.on_front[k], front.plausible[k]
                mk = MARKERS[guidances.index(float(r["guidance"])) % len(MARKERS)]
                err = [[max(y[k] - lo[k], 0)], [max(hi[k] - y[k], 0)]] if np.isfinite(lo[k]) else None
                ax.errorbar(
                    x[k], y[k], yerr=err, fmt=mk, color=palette[r["variant"]], alpha=1.0 if plaus else 0.3,
                    ms=7 if on else 5, mec="black" if on else palette[r["variant"]], mew=1.2 if on else 0.5,
                    capsize=2, elinewidth=0.8, zorder=3 if on else 2,
                )  # fmt: skip
                if on:  # frontier labels are placed apart from each other once the layout is final
                    front_labels.setdefault(ax, []).append((float(x[k]), float(y[k]), f"{r['method']} {int(r['steps'])}"))
                else:
                    ax.annotate(str(int(r["steps"])), (x[k], y[k]), fontsize=5.5, xytext=(3, 3), textcoords="offset points",
                                alpha=1.0 if plaus else 0.5)  # fmt: skip
            order = front.order(x)
            if len(order):
                ax.step(x[order], y[order], where="post", color="black", lw=1, ls="--", zorder=1)
            if _spread(x) > 20:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            if (y > 0).all() and _spread(y) > 30:
                ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{m} ({'higher' if higher else 'lower'} is better)")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{m} vs {cost}", fontsize=9)
    handles = [plt.Line2D([], [], color=palette[v], marker="o", ls="", label=v) for v in sorted(rows["variant"].unique())]
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS[k % len(MARKERS)], ls="", label=f"guidance {g:g}")
                for k, g in enumerate(guidances)]  # fmt: skip
    handles += [plt.Line2D([], [], color="black", ls="--", label="Pareto frontier")]
    top = 1 - 0.6 / fig.get_figheight()
    title = f"{model}: quality against cost (bars: 95% bootstrap CI; faded: dominated even within the CIs)"
    fig.suptitle(title, y=0.995, fontsize=10)
    anchor = (0.5, 1 - 0.28 / fig.get_figheight())
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=anchor, ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    for ax, items in front_labels.items():
        place_labels(ax, items, fontsize=6.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def speedup_figure(speedups: Speedups, path: Path, teacher_costs: dict[str, float] | None = None) -> Path:
    """Speedup at matched quality (y) against training class and measured training cost (x), one
    point per method, coloured by family; the closing chart of the seed talk. ``teacher_costs``
    (model -> seconds): the teacher network's own training, drawn for scale in the full-training
    band at 1x (the reference sampler runs that network). Methods with no configuration within
    tolerance have no speedup at matched quality: they sit in a strip under each panel, in their
    training band at their measured cost, one row each, never on the speedup scale."""
    t = speedups.table
    teacher_costs = teacher_costs or {}
    models = sorted(t["model"].unique()) if len(t) else []
    ncol = max(len(models), 1)
    n_floor = max([int((~t[t["model"] == m]["matched"]).sum()) for m in models] or [0])
    strip_h = 0.16 * n_floor + 0.5 if n_floor else 0.0
    fig = plt.figure(figsize=(6.5 * ncol, 4.8 + strip_h))
    rule = textwrap.fill(f"matched: {speedups.rule()}", width=int(24 * fig.get_figwidth()))
    w, h = fig.get_figwidth(), fig.get_figheight()
    grid = fig.add_gridspec(
        2 if n_floor else 1,
        ncol,
        height_ratios=[4.0, strip_h] if n_floor else [1.0],
        hspace=0.05,
        wspace=0.9 / 6.5,
        left=0.8 / w,
        right=1 - 2.2 / w,  # room for the legend
        bottom=0.7 / h,
        top=1 - (0.75 + 0.15 * (rule.count("\n") + 2)) / h,  # room for the title and the panel titles
    )
    fam_colour = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(FAMILIES)}
    t = t.assign(
        **{c: t[c] if c in t else d for c, d in (("train_cost_source", "measured"), ("train_cost_quoted_gpu_h", np.nan))}
    )
    quoted = t["train_cost_source"] == "quoted"
    # a quoted cost (a released student's paper, GPU-hours) sits on the same log axis in GPU-seconds, drawn
    # as a diamond with its own legend entry: never mixed silently with bench's measured costs
    t = t.assign(train_cost_s=np.where(quoted, 3600.0 * t["train_cost_quoted_gpu_h"].astype(float), t["train_cost_s"]))
    costs = [c for c in [*(t["train_cost_s"].astype(float) if len(t) else []), *teacher_costs.values()] if c > 0]
    lo, hi = (np.log(min(costs)), np.log(max(costs))) if costs else (0.0, 1.0)

    def xpos(cls: str, cost: float, k: int, n: int) -> float:
        band = TRAINING_CLASSES.index(cls) if cls in TRAINING_CLASSES else len(TRAINING_CLASSES)
        if cost > 0 and hi > lo:  # log cost between the cheapest and the dearest training of the chart
            return band - 0.35 + 0.7 * (np.log(cost) - lo) / (hi - lo)
        if cost > 0:
            return float(band)
        return band - 0.4 + 0.8 * (k + 0.5) / max(n, 1)  # no training: spread so labels stay apart

    labels: dict[Any, list[tuple[float, float, str]]] = {}
    bottoms = []
    for col, model in enumerate(models):
        ax = fig.add_subplot(grid[0, col])
        sub = t[t["model"] == model]
        matched = sub[sub["matched"]]
        for band in range(len(TRAINING_CLASSES)):
            if band % 2 == 0:
                ax.axvspan(band - 0.5, band + 0.5, color="0.95", zorder=0)
        for cls, grp in matched.groupby("training"):
            for k, (_, s) in enumerate(grp.sort_values("method").iterrows()):
                x = xpos(str(cls), _cost(s), k, len(grp))
                ax.scatter(x, s["speedup"], s=60, zorder=3, **_point_style(s, fam_colour))
                ref = " (ref)" if s["is_reference_method"] else ""
                cost = _cost_text(s, "\n")
                labels.setdefault(ax, []).append((x, float(s["speedup"]), f"{s['method']}{ref}{cost}"))
        if model in teacher_costs:  # the teacher's own training, for scale
            x = xpos("full", teacher_costs[model], 0, 1)
            ax.scatter(x, 1.0, s=130, marker="*", color="0.25", zorder=3)
            labels.setdefault(ax, []).append((x, 1.0, f"teacher's own\ntraining {fmt.duration(teacher_costs[model])}"))
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_xlim(-0.5, len(TRAINING_CLASSES) - 0.5)
        if len(matched) and (matched["speedup"] > 0).all():
            ax.set_yscale("log")
            ymin, ymax = matched["speedup"].min(), matched["speedup"].max()
            ax.set_ylim(min(ymin, 1.0) / 1.6, max(ymax, 1.0) * 1.6)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if str(f"{v:g}")[0] in "25" else ""))
        ax.set_ylabel(f"speedup at matched {speedups.metric} (x reference)")
        ax.set_title(f"{model}\nreference: {speedups.references[model].label}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        bottom = ax
        unmatched = sub[~sub["matched"]].sort_values(["train_cost_s", "method"])
        if n_floor:
            ax.tick_params(axis="x", labelbottom=False)
            bottom = fig.add_subplot(grid[1, col], sharex=ax)
            for band in range(len(TRAINING_CLASSES)):
                if band % 2 == 0:
                    bottom.axvspan(band - 0.5, band + 0.5, color="0.95", zorder=0)
            for k, (_, s) in enumerate(unmatched.iterrows()):
                x = xpos(str(s["training"]), _cost(s), k, len(unmatched))
                marker = "D" if s["train_cost_source"] == "quoted" else "o"
                bottom.scatter(x, k, s=30, marker=marker, facecolor="white", edgecolor=fam_colour.get(s["family"], "black"), lw=1.5, zorder=3)  # fmt: skip
                text = s["method"] + _cost_text(s, " ")
                right = x < len(TRAINING_CLASSES) - 1.2  # labels of the last band go to the left of their point
                bottom.annotate(text, (x, k), xytext=(5 if right else -5, 0), textcoords="offset points",
                                ha="left" if right else "right", va="center", fontsize=6.5, color="0.25")  # fmt: skip
            bottom.set_ylim(n_floor - 0.4, -0.6)
            bottom.set_yticks([])
            bottom.set_ylabel("not matched", fontsize=8)
        bottom.set_xticks(range(len(TRAINING_CLASSES)), [TRAINING_NAMES[c] for c in TRAINING_CLASSES], fontsize=8)
        bottom.set_xlabel(
            "training class (position in a class: cost, log; diamonds: quoted GPU-h)"
            if quoted.any()
            else "training class (position within a class: measured training cost, log)"
        )
        bottoms.append(bottom)
    fams = sorted(set(t["family"])) if len(t) else []
    handles = [plt.Line2D([], [], color=fam_colour.get(f, "black"), marker="o", ls="", mec="black", label=f) for f in fams]
    if teacher_costs:
        handles.append(
            plt.Line2D([], [], color="0.25", marker="*", ls="", ms=10, label="the teacher network's\nown training (1x)")
        )
    if quoted.any():
        handles.append(
            plt.Line2D(
                [],
                [],
                color="0.5",
                marker="D",
                ls="",
                mec="black",
                label="training cost quoted from\nthe paper (GPU-hours),\nnot measured by bench",
            )
        )
    if (quoted & ~np.isfinite(t["train_cost_quoted_gpu_h"].astype(float))).any():
        handles.append(
            plt.Line2D(
                [], [], color="0.5", marker="D", mfc="white", ls="", label="quoted: cost not published\n(placed without a cost)"
            )
        )
    if len(t) and (~t["matched"]).any():
        handles.append(
            plt.Line2D(
                [],
                [],
                color="0.3",
                marker="o",
                mfc="none",
                ls="",
                label="hollow, in the strip below:\nno configuration\nwithin tolerance",
            )  # fmt: skip
        )
    if handles:
        fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(0.995, 0.8), fontsize=8, title="family", title_fontsize=8)
    fig.suptitle(f"speedup at matched quality (reference {speedups.cost} / method's) vs training cost\n{rule}", fontsize=10)
    for ax, items in labels.items():  # after the layout: placement works in display coordinates
        place_labels(ax, items)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cost(s: pd.Series) -> float:
    """A record's training cost on the chart's axis (seconds; a quoted one as GPU-seconds), 0 if none."""
    v = float(s["train_cost_s"]) if pd.notna(s["train_cost_s"]) else 0.0
    return v if v > 0 else 0.0


def _cost_text(s: pd.Series, sep: str) -> str:
    """The cost in a point's label: measured as a duration, quoted as the paper's GPU-hours (or "not published")."""
    if s["train_cost_source"] == "quoted":
        h = float(s["train_cost_quoted_gpu_h"])
        return f"{sep}quoted {h:g} GPU-h" if np.isfinite(h) else f"{sep}quoted: not published"
    return f"{sep}{fmt.duration(s['train_cost_s'])}" if _cost(s) > 0 else ""


def _point_style(s: pd.Series, fam_colour: dict[str, Any]) -> dict[str, Any]:
    """A matched point: a filled circle for a measured cost; a diamond for a quoted one (hollow when not published)."""
    colour = fam_colour.get(s["family"], "black")
    if s["train_cost_source"] != "quoted":
        return {"marker": "o", "color": colour, "edgecolor": "black"}
    if np.isfinite(float(s["train_cost_quoted_gpu_h"])):
        return {"marker": "D", "color": colour, "edgecolor": "black"}
    return {"marker": "D", "facecolor": "white", "edgecolor": colour, "linewidths": 1.5}


# label offsets tried around a point, in points: right, left, above, below, then further out
_OFFSETS = [(6, 2, "left", "bottom"), (-6, 2, "right", "bottom"), (6, -4, "left", "top"), (-6, -4, "right", "top"),
            (0, 8, "center", "bottom"), (0, -8, "center", "top"), (6, 8, "left", "bottom"), (-6, 8, "right", "bottom"),
            (6, -10, "left", "top"), (-6, -10, "right", "top")]  # fmt: skip


def place_labels(ax: Any, items: list[tuple[float, float, str]], fontsize: float = 7) -> None:
    """Annotate each (x, y, text) next to its point where it overlaps no label placed before and no
    point, trying the offsets of ``_OFFSETS`` at growing distances (with a leader line when far);
    if none is free, the least-overlapping position is kept. Greedy, top to bottom."""
    items = [it for it in items if np.isfinite(it[0]) and np.isfinite(it[1])]  # unplotted points get no label
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = [ax.transData.transform((x, y)) for x, y, _ in items]
    dots = [Bbox.from_extents(px - 5, py - 5, px + 5, py + 5) for px, py in points]
    placed: list[Bbox] = []
    for x, y, text in sorted(items, key=lambda it: -it[1]):
        best: tuple[float, Any, Bbox] | None = None
        for scale in (1, 2, 3, 4.5, 6.5, 9):
            for dx, dy, ha, va in _OFFSETS:
                far = scale > 1
                ann = ax.annotate(text, (x, y), xytext=(dx * scale, dy * scale), textcoords="offset points", ha=ha, va=va,
                                  fontsize=fontsize, arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5} if far else None)  # fmt: skip
                ann.update_positions(renderer)
                box = Text.get_window_extent(ann, renderer)  # the label alone, not its leader line
                clash = sum(_overlap(box, b) for b in placed + dots) + 10 * (box.width * box.height - _overlap(box, frame))
                if best is None or clash < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (clash, ann, box)
                else:
                    ann.remove()
                if clash == 0:
                    break
            if best is not None and best[0] == 0:
                break
        if best is not None:
            placed.append(best[2])


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area of the intersection of two display boxes (0 when apart)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)
