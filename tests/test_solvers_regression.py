"""Regression: a small slice of the issue-3 solver suites re-run and compared with the committed run.

The baselines are the suites' result tables as run for reports/solvers.md
(``results/baselines/solvers.parquet``, ``results/baselines/solvers-digits.parquet``). Tolerances:
gmm is float64 and deterministic, so the exact error must agree to 1e-6 relative and the NFE
exactly; digits FID is float32 through convolutions whose reduction order can change with the
thread count, so it must agree to 1% relative (the solvers' 10-NFE FIDs differ by more than that).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench.models import build_model
from bench.paths import REPO
from bench.registry import METHODS
from bench.suite import Job, load_suite
from bench.worker import run_job

BASELINES = REPO / "results" / "baselines"

GMM_SLICE = [
    ("gmm[dim=2,prediction=eps]", "euler", {"schedule": "uniform"}, 10),
    ("gmm[dim=2,prediction=eps]", "dpmpp_2m", {"schedule": "karras"}, 10),
    ("gmm[dim=2,prediction=eps]", "unipc", {"schedule": "logsnr", "order": 2, "variant": "bh2"}, 8),
    ("gmm[dim=2,prediction=eps]", "heun", {"schedule": "ays", "budget": "nfe"}, 15),
    ("gmm[dim=2,prediction=eps]", "deis", {"schedule": "gits", "order": 3}, 6),
    ("gmm[dim=2,prediction=flow]", "euler", {"schedule": "uniform"}, 10),
    ("gmm[dim=2,prediction=flow]", "dpm_solver", {"schedule": "logsnr", "order": 3, "budget": "nfe"}, 10),
    ("gmm[dim=2,prediction=flow]", "pndm", {"schedule": "uniform", "variant": "f", "budget": "nfe"}, 20),
]


def baseline_row(table: pd.DataFrame, model: str, method: str, knobs: dict, steps: int) -> pd.Series:
    full = METHODS.get(method).resolve_knobs(knobs)
    hit = table[
        (table["model"] == model)
        & (table["method"] == method)
        & (table["steps"] == steps)
        & (table["knobs"].map(lambda k: json.loads(k) == full))
    ]
    assert len(hit) == 1, f"no baseline row for {model} {method} {knobs} {steps}"
    return hit.iloc[0]


def rerun(suite_name: str, model: str, method: str, knobs: dict, steps: int) -> dict:
    suite = load_suite(suite_name)
    spec = next(m for m in suite.models if m.label == model)
    full = tuple(sorted(METHODS.get(method).resolve_knobs(knobs).items()))
    job = Job(spec, method, full, steps, suite.guidance[0], suite.seed, suite.n_samples, suite.batch_size)
    row, _ = run_job(job, build_model(spec.name, **spec.options), suite)
    return row


@pytest.mark.skipif(
    not (BASELINES / "solvers.parquet").is_file(), reason="results/baselines/solvers.parquet not committed yet (issue 3 open)"
)
@pytest.mark.parametrize("model,method,knobs,steps", GMM_SLICE)
def test_gmm_slice_reproduces_the_committed_run(model, method, knobs, steps):
    base = baseline_row(pd.read_parquet(BASELINES / "solvers.parquet"), model, method, knobs, steps)
    row = rerun("solvers", model, method, knobs, steps)
    assert row["nfe"] == base["nfe"]
    assert row["exact_mse"] == pytest.approx(base["exact_mse"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    not (BASELINES / "solvers-digits.parquet").is_file(),
    reason="results/baselines/solvers-digits.parquet not committed yet (issue 3 open)",
)
def test_digits_slice_reproduces_the_committed_run():
    table = pd.read_parquet(BASELINES / "solvers-digits.parquet")
    base = baseline_row(table, "digits-dit", "dpmpp_2m", {}, 10)
    row = rerun("solvers-digits", "digits-dit", "dpmpp_2m", {}, 10)
    assert row["nfe"] == base["nfe"]
    assert row["fid"] == pytest.approx(base["fid"], rel=0.01)
    assert row["class_acc"] == pytest.approx(base["class_acc"], abs=0.01)
