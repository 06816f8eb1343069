"""Defaults of ``bench history``, in a module of their own so that the command line can show them
without importing numpy, pandas or the report (``bench --help`` stays fast)."""

from __future__ import annotations

DEFAULT_K = 5
DEFAULT_MIN_RUNS = 2  # a cohort's first runs calibrate it: the baseline needs at least this many earlier runs
DEFAULT_QUALITY_TOL = 0.05
DEFAULT_SPEED_TOL = 0.2
LATENCY = "latency_per_image_s"  # the latency column tracked over commits
BENCH_METRIC = "bench_value"  # the value of an imported performance benchmark (bench.history.benchmarks)


def higher_is_better(metric: str) -> bool:
    """A metric's direction: the registry's, and lower for a performance benchmark's value."""
    if metric == BENCH_METRIC:
        return False
    from bench.report.data import higher_is_better as registered

    return registered(metric)
