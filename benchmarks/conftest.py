"""The performance benchmarks (pytest-benchmark); not collected by `make test` (testpaths = tests).

    .venv/bin/pytest benchmarks/ --benchmark-autosave          # saves .benchmarks/<machine>/NNNN_<commit>.json
    .venv/bin/bench history benchmarks --import .benchmarks    # join them to the results history

Each benchmark records the time of its rounds (the history's latency) and, in
``extra_info["bench_value"]``, the number it is about (lower is better: a ratio of two timings
taken side by side, or seconds), with ``bench_value_ci`` where it has an interval.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts (overhead.py, ...) as modules
