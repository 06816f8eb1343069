"""The speedup-versus-training-cost chart with quoted training costs (released students): on a
synthetic results table, a quoted cost is carried into the speedup table as quoted, drawn as a
diamond (hollow where the paper publishes none) with its own legend entry and a 'quoted' label,
never as a measured circle; measured costs keep their circles."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.markers import MarkerStyle

from bench.report.charts import speedup_figure
from bench.report.matched import choose_references, matched_speedups


def row(method, family, training, steps, clip, latency, cost_s=0.0, quoted=None) -> dict:
    """One finished job; ``quoted`` = (GPU-hours or NaN, citation) for a released student."""
    r = {
        "model": "diffusers[sdxl]", "method": method, "family": family, "training": training, "knobs": json.dumps({}),
        "steps": steps, "guidance": 5.0, "nfe": float(steps), "flops": 1e12 * steps, "latency_per_image_s": latency,
        "clip_score": clip, "clip_score_ci_low": clip - 0.1, "clip_score_ci_high": clip + 0.1, "train_cost_s": cost_s,
    }  # fmt: skip
    if quoted is not None:
        r |= {"train_cost_source": "quoted", "train_cost_quoted_gpu_h": quoted[0], "train_cost_citation": quoted[1]}
    else:
        r |= {"train_cost_source": "measured", "train_cost_quoted_gpu_h": math.nan, "train_cost_citation": ""}
    return r


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        [
            row("dpmpp_2m", "solver", "free", 50, 30.0, 1.0),
            row("dpmpp_2m", "solver", "free", 20, 29.9, 0.4),
            row("kd", "distillation", "finetune", 1, 29.95, 0.05, cost_s=3600.0),
            row("lcm_unet", "consistency", "finetune", 4, 29.9, 0.08, quoted=(32.0, "Luo et al. 2023, arXiv 2310.04378")),
            row("sdxl_turbo", "distillation", "finetune", 1, 29.8, 0.02, quoted=(math.nan, "not published")),
            row("dmd2_sdxl", "distillation", "finetune", 4, 20.0, 0.03, quoted=(math.nan, "not published")),
        ]
    )


def is_marker(collection, marker: str) -> bool:
    m = MarkerStyle(marker)
    want = m.get_path().transformed(m.get_transform()).vertices
    got = collection.get_paths()[0].vertices
    return got.shape == want.shape and np.allclose(got, want)


def test_quoted_costs_reach_the_speedup_table(table):
    sp = matched_speedups(table, "clip_score", choose_references(table, "clip_score"))
    t = sp.table.set_index("method")
    assert t.loc["lcm_unet", "train_cost_source"] == "quoted" and t.loc["lcm_unet", "train_cost_quoted_gpu_h"] == 32.0
    assert t.loc["kd", "train_cost_source"] == "measured" and np.isnan(t.loc["kd", "train_cost_quoted_gpu_h"])
    assert t.loc["sdxl_turbo", "train_cost_source"] == "quoted" and np.isnan(t.loc["sdxl_turbo", "train_cost_quoted_gpu_h"])
    assert t.loc["lcm_unet", "train_cost_s"] == 0  # the measured column stays what bench measured: nothing
    assert not t.loc["dmd2_sdxl", "matched"] and t.loc["lcm_unet", "matched"]
    # a table from before quoted costs existed reads as measured
    old = matched_speedups(table.drop(columns=["train_cost_source"]), "clip_score", choose_references(table, "clip_score"))
    assert (old.table["train_cost_source"] == "measured").all()


def test_the_chart_draws_quoted_costs_as_diamonds_with_their_own_legend(table, tmp_path, monkeypatch):
    figs: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), real(self, *a, **k))[1])
    sp = matched_speedups(table, "clip_score", choose_references(table, "clip_score"))
    path = speedup_figure(sp, tmp_path / "speedup.png")
    assert path.stat().st_size > 0 and len(figs) == 1
    fig = figs[0]
    main, strip = fig.axes[0], fig.axes[1]
    points = {tuple(np.round(c.get_offsets()[0], 6)): c for c in main.collections if len(c.get_offsets())}
    labels = {t.get_text().split("\n")[0]: t for t in main.texts}
    assert {"dpmpp_2m (ref)", "kd", "lcm_unet", "sdxl_turbo"} <= set(labels)

    def point_of(method: str):
        x, y = labels[method].xy
        return points[tuple(np.round((x, y), 6))]

    assert is_marker(point_of("lcm_unet"), "D") and is_marker(point_of("sdxl_turbo"), "D")
    assert is_marker(point_of("kd"), "o") and is_marker(point_of("dpmpp_2m (ref)"), "o")
    # published quote: filled; not published: hollow (white face)
    assert not np.allclose(point_of("lcm_unet").get_facecolor()[0][:3], 1.0)
    assert np.allclose(point_of("sdxl_turbo").get_facecolor()[0][:3], 1.0)
    assert "quoted 32 GPU-h" in labels["lcm_unet"].get_text() and "not published" in labels["sdxl_turbo"].get_text()
    # on the cost axis, 32 GPU-hours (115200 GPU-seconds) sits right of kd's measured hour, in the same band
    assert labels["lcm_unet"].xy[0] > labels["kd"].xy[0]
    # the unmatched quoted student is a hollow diamond in the strip
    assert any(is_marker(c, "D") for c in strip.collections)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("quoted" in t and "GPU-hours" in t and "not measured" in t for t in legend)
    assert any("not published" in t for t in legend)
    assert "diamonds: quoted GPU-h" in strip.get_xlabel()


def test_a_chart_without_quoted_costs_has_no_quoted_entry(table, tmp_path, monkeypatch):
    figs: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), real(self, *a, **k))[1])
    measured = table[table["train_cost_source"] == "measured"]
    speedup_figure(matched_speedups(measured, "clip_score", choose_references(measured, "clip_score")), tmp_path / "s.png")
    legend = [t.get_text() for t in figs[0].legends[0].get_texts()]
    assert not any("quoted" in t for t in legend)
    assert not any(is_marker(c, "D") for ax in figs[0].axes for c in ax.collections if len(c.get_offsets()))


def test_the_leaderboard_says_a_cost_is_quoted(table):
    from bench.report.leaderboard import build_leaderboard

    sp = matched_speedups(table, "clip_score", choose_references(table, "clip_score"))
    md = build_leaderboard(table, sp, ["clip_score"]).markdown(sp)
    line = {ln.split("|")[2].strip(): ln for ln in md.splitlines() if ln.count("|") > 5}
    assert "32 GPU-h (quoted)" in line["lcm_unet"] and "not published (quoted)" in line["sdxl_turbo"]
    assert "1 h" in line["kd"] or "60 min" in line["kd"]  # measured: a duration, as before
