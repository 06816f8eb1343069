"""Registered metrics. Each takes a :class:`MetricContext` and returns a :class:`MetricValue`
(a value with a bootstrap confidence interval). Importing this package registers them.

A metric is written as a *statistic*: a function of a set of sample indices, evaluated on all
samples for the value and on bootstrap resamples for the interval. The same statistic evaluated
on the same index draws of two jobs that share seeds gives paired comparisons
(:mod:`bench.metrics.paired`).
"""

from __future__ import annotations

from bench.metrics.base import (
    MetricContext,
    MetricFn,
    MetricValue,
    Statistic,
    centred_interval,
    images_uint8,
    percentile_ci,
    register_metric,
)

__all__ = [
    "MetricContext",
    "MetricFn",
    "MetricValue",
    "Statistic",
    "centred_interval",
    "images_uint8",
    "percentile_ci",
    "register_metric",
]

from bench.metrics import clip, digits, fidelity, inception, oracle, preference, vbench, video  # noqa: E402,F401  (registration)
