"""Where bench keeps things: committed assets in the package, caches under $BENCH_HOME."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
REPO = Path(__file__).resolve().parent.parent


def bench_home() -> Path:
    """$BENCH_HOME, default ~/.cache/bench: training checkpoints, metric weights, reference stats."""
    return Path(os.environ.get("BENCH_HOME", Path.home() / ".cache" / "bench")).expanduser()
