"""Per-category metric values: a metric's statistic evaluated on the samples of each prompt category.

Every metric is a :class:`~bench.metrics.base.Statistic` (a function of sample indices), so its
value on one category is the statistic on that category's indices, with a bootstrap interval
drawn within the category. Set distances to a reference (FID, KID, CMMD, precision/recall) are
left out: on a category's few dozen samples they measure the sample size more than the images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.metrics.base import MetricContext, centred_interval
from bench.registry import METRICS

MIN_SAMPLES = 2  # a category with fewer samples gets no value (no interval can be drawn)


def per_category(ctx: MetricContext, metrics: Sequence[str], categories: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{metric: {category: {value, ci_low, ci_high, n}}}`` for each metric of ``metrics`` that is
    a per-sample statistic over ``ctx``'s samples (``categories[k]`` is sample k's category)."""
    cats = np.asarray([str(c) for c in categories])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in metrics:
        if "reference" in METRICS.entry(name).meta.get("consumes", ()):
            continue
        stat = METRICS.get(name).statistic(ctx)  # the metric's per-sample values are cached in ctx.cache
        if stat.n != len(cats):
            continue
        per: dict[str, dict[str, Any]] = {}
        for c in sorted(set(cats.tolist())):
            idx = np.flatnonzero(cats == c)
            if len(idx) < MIN_SAMPLES:
                continue
            value = float(stat.fn(idx))
            rng = np.random.default_rng([ctx.seed, len(idx)])
            boots = np.array([float(stat.fn(idx[rng.integers(0, len(idx), len(idx))])) for _ in range(ctx.bootstrap)])
            lo, hi = centred_interval(value, boots)
            if np.isfinite(value) and np.isfinite(lo):
                lo, hi = min(float(np.clip(lo, *stat.support)), value), max(float(np.clip(hi, *stat.support)), value)
            per[c] = {"value": value, "ci_low": lo, "ci_high": hi, "n": int(len(idx))}
        out[name] = per
    return out
