"""The run's quality-against-latency plot: a long legend goes beside the panels, with no layout warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
from PIL import Image

from bench.summary import LEGEND_INSIDE, plot_quality_vs_latency


def _rows(n_configs: int) -> pd.DataFrame:
    rows = []
    for c in range(n_configs):
        for steps in (3, 5):
            knobs = {"schedule": "uniform", "a_long_knob_name_that_makes_the_label_long": 0.001 * (c + 1)}
            rows.append(
                {"model": "m", "method": f"method{c}", "knobs": json.dumps(knobs), "guidance": 1.0, "steps": steps,
                 "status": "ok", "latency_per_image_s": 0.001 * steps * (c + 1), "fid": 1.0 / steps + 0.01 * c,
                 "fid_ci_low": 0.9 / steps, "fid_ci_high": 1.1 / steps + 0.02 * c}
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_many_configurations_plot_without_a_layout_warning_and_a_wider_figure(tmp_path: Path) -> None:
    sizes = {}
    for n in (3, LEGEND_INSIDE + 20):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # tight/constrained layout failing warns; that must not happen
            path = plot_quality_vs_latency(_rows(n), tmp_path / f"p{n}.png")
        sizes[n] = Image.open(path).size
    small, large = sizes[3], sizes[LEGEND_INSIDE + 20]
    assert large[0] > small[0] * 1.3  # the legend beside the panel widened the figure
