"""Sample grids: the same seeds across methods (rows) and step counts (columns).

Sample k of every job starts from the noise of seed k, so a column of a grid shows what each
method made of the same starting noise.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.report.data import Run, method_label  # noqa: E402

SEEDS = 10  # one of each class for the class-conditional digits models


def image_strip(x: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` images (N,C,H,W) in [-1,1] side by side as one (H, k*(W+1)-1[, C]) array in [0,1]."""
    x = np.clip(np.asarray(x[:k], dtype=float), -1, 1) * 0.5 + 0.5
    n, c, h, w = x.shape
    out = np.full((h, n * (w + 1) - 1, c), 0.5)
    for i in range(n):
        out[:, i * (w + 1) : i * (w + 1) + w] = x[i].transpose(1, 2, 0)
    return out[..., 0] if c == 1 else out


def grid_figure(run: Run, model: str, guidance: float, path: Path, seeds: int = SEEDS) -> Path | None:
    """Rows: method variants; columns: step counts; cells: seeds 0..seeds-1. None if the run kept no samples."""
    ok = run.ok
    rows = ok[(ok["model"] == model) & np.isclose(ok["guidance"].astype(float), guidance)].copy()
    if rows.empty:
        return None
    rows["variant"] = rows.apply(method_label, axis=1)
    variants = sorted(rows["variant"].unique())
    steps = sorted(int(s) for s in rows["steps"].unique())
    cells: dict[tuple[str, int], np.ndarray | None] = {}
    for _, r in rows.iterrows():
        cells[(r["variant"], int(r["steps"]))] = run.samples(r["job_id"])
    if all(v is None for v in cells.values()):
        return None
    some = next(v for v in cells.values() if v is not None)
    if some.ndim == 5:  # clips (N, F, C, H, W): frame strips and animations per configuration (bench.report.clips)
        return None
    image = some.ndim == 4
    k = min(seeds, len(some))
    if image:
        cw, ch = 0.42 * k, 0.6
    else:
        cw, ch = 2.4, 2.4
    fig, axes = plt.subplots(len(variants), len(steps), figsize=(cw * len(steps) + 1.6, ch * len(variants) + 0.9), squeeze=False)
    lim = None
    if not image:
        allx = np.concatenate([v[:, :2] for v in cells.values() if v is not None])
        pad = 0.05 * (allx.max(0) - allx.min(0) + 1e-9)
        lim = (allx.min(0) - pad, allx.max(0) + pad)
    seed_colours = plt.get_cmap("tab10")
    for i, var in enumerate(variants):
        for j, s in enumerate(steps):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            x = cells.get((var, s))
            if x is None:
                ax.text(0.5, 0.5, "not run" if (var, s) not in cells else "no samples", ha="center", va="center", fontsize=7)
            elif image:
                ax.imshow(image_strip(x, k), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.scatter(x[:, 0], x[:, 1] if x.shape[1] > 1 else np.zeros(len(x)), s=2, color="0.7", lw=0)
                for q in range(k):
                    ax.scatter(
                        x[q, 0], x[q, 1] if x.shape[1] > 1 else 0, s=22, color=seed_colours(q % 10), edgecolor="black", lw=0.4
                    )
                ax.set_xlim(lim[0][0], lim[1][0])
                if x.shape[1] > 1:
                    ax.set_ylim(lim[0][1], lim[1][1])
            if i == 0:
                ax.set_title(f"{s} steps", fontsize=8)
            if j == 0:
                ax.set_ylabel(var, rotation=0, ha="right", va="center", fontsize=8)
    if image:
        what = f"seeds 0-{k - 1} left to right (sample k has class, or prompt, k mod their number)"
    else:
        what = f"dims 0-1 of all samples (grey); seeds 0-{k - 1} coloured, the same colour = the same seed in every cell"
    fig.suptitle(f"{model}, guidance {guidance:g}:\n{what}", fontsize=8.5)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_figures(run: Run, out: Path) -> list[tuple[str, float, Path]]:
    """Every (model, guidance) grid of a run that kept samples: [(model, guidance, png)]."""
    made = []
    ok = run.ok
    for model in sorted(ok["model"].unique()):
        for g in sorted(ok[ok["model"] == model]["guidance"].astype(float).unique()):
            p = grid_figure(run, model, g, out / f"grid_{slug(model)}_w{g:g}.png")
            if p is not None:
                made.append((model, g, p))
    return made


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(s)).strip("-")
