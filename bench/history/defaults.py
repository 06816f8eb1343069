"""Defaults of ``bench history``, in a module of their own so that the command line can show them
without importing numpy, pandas or the report (``bench --help`` stays fast)."""

from __future__ import annotations

DEFAULT_K = 5
DEFAULT_MIN_RUNS = 2  # a cohort's first runs calibrate it: the baseline needs at least this many earlier runs
DEFAULT_QUALITY_TOL = 0.05
DEFAULT_SPEED_TOL = 0.2
LATENCY = "latency_per_image_s"  # the latency column tracked over commits
