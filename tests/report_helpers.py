"""A tiny real run (gmm oracle, seconds) shared by the report, compare and browser tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from bench.suite import MethodSpec, ModelSpec, Suite

_CACHE: dict[str, Path] = {}


def tiny_gmm_suite() -> Suite:
    return Suite(
        name="tiny",
        source="tests/report_helpers.py",
        models=[ModelSpec("gmm", {"dim": 2, "prediction": "eps"})],
        methods=[MethodSpec("ddim"), MethodSpec("euler")],
        steps=[3, 8],
        guidance=[1.0],
        metrics=["exact_mse", "swd"],
        n_samples=64,
        batch_size=32,
        bootstrap=10,
        warmup=0,
        description="tiny gmm run for report tests",
    )


def tiny_run(root: Path) -> Path:
    """Run the tiny suite once per test session; returns a fresh copy of the run directory under ``root``."""
    from bench.runner import run_suite

    if "run" not in _CACHE or not _CACHE["run"].is_dir():
        _CACHE["run"] = run_suite(tiny_gmm_suite(), run_id="tiny-run", results_dir=root / "_shared", progress=False)
    dst = root / "results" / "tiny" / "tiny-run"
    if not dst.exists():
        shutil.copytree(_CACHE["run"], dst)
    return dst


def edit_results(run_dir: Path, edit) -> Path:
    """Apply ``edit(df) -> df`` to a copy of a run's results.parquet, in place."""
    p = run_dir / "results.parquet"
    df = edit(pd.read_parquet(p).copy())
    df.to_parquet(p, index=False)
    return run_dir
