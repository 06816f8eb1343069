"""`bench compare`: a run against itself passes; injected regressions fail; the quick suite
matches its committed baseline."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_helpers import edit_results, tiny_run

from bench.cli import main
from bench.compare import compare_runs, cost_increase, quality_regression
from bench.paths import REPO
from bench.report.data import load_run

BASELINE = REPO / "results" / "baselines" / "quick.parquet"
SLICE = Path(__file__).parent / "suites" / "quick_slice.yaml"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tiny_run(tmp_path)


def candidate(base: Path, tmp_path: Path, edit=None) -> Path:
    dst = tmp_path / "cand" / base.name
    shutil.copytree(base, dst)
    return edit_results(dst, edit) if edit else dst


def not_reference(df: pd.DataFrame) -> pd.Series:
    """A row that is not the rule's reference (the reference is the 8-step job)."""
    return (df["steps"] == 3) & (df["method"] == "ddim")


def test_run_against_itself_exits_0(base, tmp_path, capsys):
    out = tmp_path / "cmp.md"
    assert main(["compare", str(base), str(base), "--out", str(out)]) == 0
    text = out.read_text()
    assert "**PASS**: 4 matched jobs, 0 regression(s)" in text
    assert "exact_mse" in capsys.readouterr().out


def test_injected_quality_regression_exits_1(base, tmp_path, capsys):
    def worse(df):
        m = not_reference(df)
        # far outside the baseline CI and the 5% tolerance (exact_mse: lower is better)
        df.loc[m, "exact_mse"] = df.loc[m, "exact_mse_ci_high"] * 2 + df.loc[m, "exact_mse"]
        return df

    cand = candidate(base, tmp_path, worse)
    assert main(["compare", str(base), str(cand), "--out", str(tmp_path / "c.md")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION gmm[dim=2,prediction=eps] ddim 3 steps w=1: exact_mse worse" in out
    assert "**FAIL**: 4 matched jobs, 1 regression(s)" in out


def test_quality_change_inside_tolerance_passes(base, tmp_path):
    def slightly(df):
        m = not_reference(df)
        df.loc[m, "exact_mse"] = df.loc[m, "exact_mse_ci_high"]  # at the CI edge: not a regression
        return df

    assert main(["compare", str(base), str(candidate(base, tmp_path, slightly)), "--out", str(tmp_path / "c.md")]) == 0


def test_quality_improvement_is_not_a_regression(base, tmp_path):
    def better(df):
        df["exact_mse"] = df["exact_mse"] / 10
        df["swd"] = df["swd"] / 10
        return df

    assert main(["compare", str(base), str(candidate(base, tmp_path, better)), "--out", str(tmp_path / "c.md")]) == 0


def test_injected_nfe_increase_exits_1(base, tmp_path, capsys):
    def more_nfe(df):
        df.loc[not_reference(df), "nfe"] += 1
        return df

    cand = candidate(base, tmp_path, more_nfe)
    assert main(["compare", str(base), str(cand), "--out", str(tmp_path / "c.md")]) == 1
    assert "ddim 3 steps w=1: NFE up" in capsys.readouterr().out


def test_injected_flops_increase_exits_1(base, tmp_path, capsys):
    def more_flops(df):
        df.loc[not_reference(df), "flops"] += 1000
        return df

    assert main(["compare", str(base), str(candidate(base, tmp_path, more_flops)), "--out", str(tmp_path / "c.md")]) == 1
    assert "FLOPs up" in capsys.readouterr().out


def test_latency_is_normalised_by_the_reference(base, tmp_path, capsys):
    # a machine three times slower: every latency x3, normalised ratios unchanged -> pass
    def slower_machine(df):
        df["latency_per_image_s"] *= 3
        return df

    cand = candidate(base, tmp_path, slower_machine)
    assert main(["compare", str(base), str(cand), "--out", str(tmp_path / "c.md")]) == 0
    # one configuration three times slower relative to the reference -> regression, unless not gated
    shutil.rmtree(cand.parent)

    def one_slower(df):
        df.loc[not_reference(df), "latency_per_image_s"] *= 3
        return df

    cand = candidate(base, tmp_path, one_slower)
    assert main(["compare", str(base), str(cand), "--out", str(tmp_path / "c.md")]) == 1
    assert "ddim 3 steps w=1: slower" in capsys.readouterr().out
    assert main(["compare", str(base), str(cand), "--speed-tol", "off", "--out", str(tmp_path / "c.md")]) == 0
    assert main(["compare", str(base), str(cand), "--speed-tol", "2.5", "--out", str(tmp_path / "c.md")]) == 0


def test_failed_job_is_a_regression_and_missing_jobs_are_notes(base, tmp_path):
    def fail_one(df):
        m = not_reference(df)
        df.loc[m, "status"] = "failed"
        df.loc[m, "error"] = "RuntimeError: boom"
        return df

    cand = candidate(base, tmp_path, fail_one)
    r = compare_runs(load_run(base), load_run(cand))
    assert not r.ok and any("failed in the candidate (RuntimeError: boom)" in x for x in r.regressions)
    shutil.rmtree(cand.parent)
    cand = candidate(base, tmp_path, lambda df: df[~not_reference(df)])
    r = compare_runs(load_run(base), load_run(cand))
    assert r.ok and any("1 baseline job(s) not in the candidate" in n for n in r.notes)


def test_bad_inputs_exit_2(base, tmp_path, capsys):
    assert main(["compare", str(base), str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    other = candidate(base, tmp_path, lambda df: df.assign(model="other"))
    assert main(["compare", str(base), str(other)]) == 2
    assert "no job of" in capsys.readouterr().err


def test_regression_rules_read_the_direction():
    # lower is better: base 10 [9, 11], 5% tol -> regression above 11.5
    assert not quality_regression(10, 9, 11, 11.5, False, 0.05)
    assert quality_regression(10, 9, 11, 11.6, False, 0.05)
    assert not quality_regression(10, 9, 11, 1.0, False, 0.05)
    # higher is better: base 0.9 [0.88, 0.92], 0 tol -> regression below 0.88
    assert quality_regression(0.9, 0.88, 0.92, 0.87, True, 0.0)
    assert not quality_regression(0.9, 0.88, 0.92, 0.881, True, 0.0)
    assert not quality_regression(0.9, np.nan, np.nan, 0.9, True, 0.0)
    assert cost_increase(10, 11) and not cost_increase(10, 10) and not cost_increase(10, 9)


@pytest.mark.slow
@pytest.mark.skipif(not BASELINE.is_file(), reason="results/baselines/quick.parquet not committed yet (issue 6 open)")
def test_quick_slice_matches_committed_baseline(tmp_path):
    """Re-run a slice of the quick suite (same models, seeds and sample counts, fewer configurations)
    and compare it with results/baselines/quick.parquet: quality and NFE/FLOPs gated, latency not."""
    assert BASELINE.is_file(), "results/baselines/quick.parquet is missing; regenerate it (see tests/suites/quick_slice.yaml)"
    assert main(["run", str(SLICE), "--run-id", "slice", "--results", str(tmp_path)]) == 0
    run = tmp_path / "quick-slice" / "slice"
    out = tmp_path / "cmp.md"
    rc = main(["compare", str(BASELINE), str(run), "--speed-tol", "off", "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    matched = int(text.split("**PASS**: ")[1].split(" matched")[0])
    assert matched == len(pd.read_parquet(run / "results.parquet"))


def test_samples_column_tells_identical_from_changed_outputs(base, tmp_path):
    """Two run directories: each matched job's samples are compared bit for bit (informational,
    not a regression): a copy is identical; a sample nudged by 1e-3 shows its difference."""
    cand = candidate(base, tmp_path)
    df = pd.read_parquet(cand / "results.parquet")
    job = df.loc[not_reference(df), "job_id"].iloc[0]
    x = np.load(cand / "jobs" / job / "samples.npy")
    x[0, 0] += 1e-3
    np.save(cand / "jobs" / job / "samples.npy", x)
    cmp = compare_runs(load_run(base), load_run(cand))
    col = cmp.header.index("samples (same seeds)")
    cells = {row[1]: row[col] for row in cmp.rows}
    changed = [v for v in cells.values() if v != "identical"]
    assert len(cells) == 4 and len(changed) == 1 and changed[0] == "max |diff| 0.001"
    assert cmp.ok  # outputs changed, quality columns did not: no regression
    # a bare results table has no samples but each row's digest: the changed job is told apart
    bare = compare_runs(load_run(base / "results.parquet"), load_run(cand))
    col = bare.header.index("samples (same seeds)")
    assert sorted(row[col] for row in bare.rows) == ["changed", "identical", "identical", "identical"]
    both_bare = compare_runs(load_run(base / "results.parquet"), load_run(base / "results.parquet"))
    assert {row[col] for row in both_bare.rows} == {"identical"}
    # tables without digests (written before they were recorded): no column
    old = edit_results(candidate(base, tmp_path / "old"), lambda df: df.drop(columns="samples_sha256"))
    assert "samples (same seeds)" not in compare_runs(load_run(old / "results.parquet"), load_run(cand)).header


def shrunk_candidate(base: Path, tmp_path: Path, factor: float) -> Path:
    """A candidate whose 3-step DDIM samples are all pulled towards 0 by ``factor``: the same seeds,
    a consistent loss of spread; its swd and CI recomputed as the runner would."""
    import json

    import torch

    from bench.metrics import MetricContext
    from bench.metrics.paired import run_bundle
    from bench.registry import METRICS

    cand = candidate(base, tmp_path)
    df = pd.read_parquet(cand / "results.parquet")
    i = df.index[not_reference(df)][0]
    path = cand / "jobs" / df.loc[i, "job_id"] / "samples.npy"
    x = np.load(path) * factor
    np.save(path, x)
    bundle = run_bundle(json.loads((cand / "run.json").read_text()), df.loc[i, "model"])
    v = METRICS.get("swd")(MetricContext(torch.from_numpy(x), None, bundle, bootstrap=10, seed=int(df.loc[i, "seed"])))
    df.loc[i, ["swd", "swd_ci_low", "swd_ci_high"]] = [v.value, v.ci_low, v.ci_high]
    df.to_parquet(cand / "results.parquet", index=False)
    return cand


def test_paired_comparison_catches_a_loss_hidden_inside_the_cis(base, tmp_path, capsys):
    """Samples shrunk by 8%: swd worse by ~11%, more than the 5% tolerance yet inside the baseline's
    CI, so the unpaired rule passes it; the same-seed paired interval excludes 0 and flags it.
    Shrunk by 3% (within tolerance) nothing is flagged; by 15% both rules flag."""

    def swd_flags(factor: float, **kw) -> list[str]:
        cand = tmp_path / str(factor) / "cand" / base.name
        if not cand.exists():
            shrunk_candidate(base, tmp_path / str(factor), factor)
        return [r.split(": ")[-1] for r in compare_runs(load_run(base), load_run(cand), **kw).regressions]

    assert swd_flags(0.97) == []
    assert swd_flags(0.92) == ["swd worse (paired)"]
    assert swd_flags(0.92, paired=False) == []
    assert swd_flags(0.85) == ["swd worse"]
    cand = tmp_path / "0.92" / "cand" / base.name
    out = tmp_path / "cmp.md"
    assert main(["compare", str(base), str(cand), "--out", str(out)]) == 1
    text = out.read_text()
    assert "swd worse (paired)" in text and "paired +" in text and "paired 95% CI of candidate - baseline" in text
    assert main(["compare", str(base), str(cand), "--no-paired", "--out", str(out)]) == 0
