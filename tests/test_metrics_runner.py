"""Metrics inside the runner: CI columns for every metric, optional metrics recorded as missing,
fidelity against the same-seed reference configuration, cost columns, MMHM and paired
comparisons over a run."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_suite
from helpers import job, random_bundle, tiny_suite

from bench import accounting, weights
from bench.accounting import peak_memory_bytes, reset_peak_memory
from bench.cli import main
from bench.data import digits
from bench.runner import run_suite
from bench.suite import load_suite
from bench.worker import run_job

IMAGE_METRICS = ["fid", "kid", "class_acc", "precision", "recall", "inception_score", "psnr", "ssim"]


@pytest.fixture(autouse=True)
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    for name, s in list(weights.CATALOGUE.items()):
        monkeypatch.delenv(s.env, raising=False)
        monkeypatch.setitem(weights.CATALOGUE, name, dataclasses.replace(s, fallbacks=()))


@pytest.fixture(scope="module")
def bundle():
    return random_bundle("eps")


def test_every_metric_gets_ci_columns_and_optional_ones_are_recorded_missing(bundle):
    suite = tiny_suite(IMAGE_METRICS, optional_metrics=["clip_score", "lpips"], reference=[{"method": "ddim", "steps": 3}])
    _, ref = run_job(job("ddim", 3, 1.0, 8, 8), bundle, tiny_suite())
    row, samples = run_job(job("ddim", 2, 1.0, 8, 4), bundle, suite, baseline=ref)
    for m in IMAGE_METRICS:
        assert np.isfinite([row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"]]).all(), m
        assert row[f"{m}_ci_low"] <= row[m] <= row[f"{m}_ci_high"], m
    for m in ("clip_score", "lpips"):
        assert row[m] is None and row[f"{m}_ci_low"] is None and row[f"{m}_ci_high"] is None
    assert row["missing_metrics"] == "clip_score,lpips"
    assert "no prompts" in row["error"] and "`bench weights fetch alexnet-lpips`" in row["error"]
    assert row["psnr"] < 60 and 0 < row["ssim"] < 1  # 2 DDIM steps differ from 3
    assert row["peak_mem_bytes"] > 0 and row["latency_per_image_iqr_s"] == pytest.approx(row["latency_iqr_s"] / 4)


def test_fidelity_compares_with_the_same_seed_reference_samples(bundle):
    suite = tiny_suite(["psnr", "ssim"], reference=[{"method": "ddim", "steps": 3}])
    ref_row, ref_samples = run_job(job("ddim", 3, 1.0, 6, 3), bundle, suite, baseline_is_self=True)
    assert ref_row["psnr"] == float("inf") and ref_row["ssim"] == pytest.approx(1.0)
    row, samples = run_job(job("ddim", 2, 1.0, 6, 6), bundle, suite, baseline=ref_samples)  # another batch size: same seeds
    mse = ((samples.double().clamp(-1, 1) - ref_samples.double().clamp(-1, 1)) ** 2).mean()
    assert row["psnr"] == pytest.approx(float(10 * torch.log10(4 / mse)), rel=1e-9)


def test_the_reference_configuration_is_a_planned_job_run_first(tmp_path):
    """A suite whose grid lacks its reference configuration: the driver adds it as a job of its own,
    runs it first and hands its samples to the jobs that compare with it (never sampled inside them)."""
    from bench.runner import run_suite

    text = """
name: fid_ref
n_samples: 6
batch_size: 6
bootstrap: 3
models: [digits-unet]
methods: [ddim]
steps: [2]
guidance: [1.0]
metrics: [psnr]
reference: {method: ddim, steps: 3}
timing: {warmup: 0}
"""
    (tmp_path / "s.yaml").write_text(text)
    run = run_suite(load_suite(tmp_path / "s.yaml"), "r", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet").set_index("steps")
    assert sorted(df.index) == [2, 3] and df.loc[3, "planned_as"] == "reference" and df.loc[2, "planned_as"] == "grid"
    assert df.loc[3, "psnr"] == float("inf")
    ref = np.load(run / "jobs" / df.loc[3, "job_id"] / "samples.npy")
    own = np.load(run / "jobs" / df.loc[2, "job_id"] / "samples.npy")
    mse = ((np.clip(own, -1, 1).astype(np.float64) - np.clip(ref, -1, 1)) ** 2).mean()
    assert df.loc[2, "psnr"] == pytest.approx(10 * np.log10(4 / mse), rel=1e-9)
    log = [json.loads(line) for line in (run / "executions.jsonl").read_text().splitlines()]
    assert [e["job_id"] for e in log] == [df.loc[3, "job_id"], df.loc[2, "job_id"]]  # the reference first


def test_fidelity_without_a_reference_configuration_says_how_to_add_one(bundle):
    with pytest.raises(ValueError, match=r"add `reference: \{method: NAME, steps: N\}`"):
        run_job(job("ddim", 2, 1.0, 4, 4), bundle, tiny_suite(["psnr"]))


def _peak_above_rss() -> int:
    """Raise the peak RSS by 64 MiB over what stays resident, and return that peak."""
    big = np.ones(64 * 2**20 // 8)  # 64 MiB, written so resident
    peak = peak_memory_bytes()
    del big
    return peak


def test_peak_memory_window_resets_or_says_it_cannot():
    peak_with = _peak_above_rss()
    if reset_peak_memory():  # this kernel honours clear_refs: the window restarts at the current RSS
        rss = accounting._status_bytes("VmRSS")
        assert peak_memory_bytes() <= rss + 4 * 2**20
        if rss < peak_with - 32 * 2**20:  # the freed 64 MiB left the process: and the window
            assert peak_memory_bytes() < peak_with - 32 * 2**20
    else:  # it ignores it (gVisor, some containers): the lifetime peak, and the caller is told so
        assert peak_memory_bytes() >= peak_with


@pytest.mark.parametrize(("hwm_after", "expected"), [(900, False), (500, True)])
def test_the_peak_reset_is_checked_not_assumed(monkeypatch, tmp_path, hwm_after, expected):
    """/proc faked: the reset counts only when the peak afterwards is the current RSS (500 MB)."""
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython\nVmHWM:\t{hwm_after * 1024} kB\nVmRSS:\t{500 * 1024} kB\n")
    monkeypatch.setattr(accounting, "STATUS", str(status))
    monkeypatch.setattr(accounting, "CLEAR_REFS", str(tmp_path / "clear_refs"))
    assert reset_peak_memory() is expected
    assert (tmp_path / "clear_refs").read_text() == "5"
    assert peak_memory_bytes() == hwm_after * 2**20
    monkeypatch.setattr(accounting, "CLEAR_REFS", str(tmp_path / "no" / "clear_refs"))  # not writable
    assert reset_peak_memory() is False


def test_an_ignored_peak_reset_is_recorded_in_the_row(monkeypatch, tmp_path, bundle):
    """A kernel that takes the clear_refs write and keeps the old peak (faked): the row says its
    peak memory is the process's, not the sampling's; on this machine, what the check finds."""
    status = tmp_path / "status"
    status.write_text(f"VmHWM:\t{900 * 1024} kB\nVmRSS:\t{500 * 1024} kB\n")
    with monkeypatch.context() as mp:
        mp.setattr(accounting, "STATUS", str(status))
        mp.setattr(accounting, "CLEAR_REFS", str(tmp_path / "clear_refs"))
        row, _ = run_job(job("ddim", 2, 1.0, 4, 4), bundle, tiny_suite([]))
    assert row["peak_mem_scope"] == "process" and row["peak_mem_bytes"] == 900 * 2**20
    row, _ = run_job(job("ddim", 2, 1.0, 4, 4), bundle, tiny_suite([]))
    assert row["peak_mem_scope"] == ("sampling" if reset_peak_memory() else "process")


def test_results_parquet_has_ci_columns_for_every_metric(tmp_path, tmp_results):
    path = write_suite(
        tmp_path / "s.yaml",
        "models: [{name: gmm, options: {dim: 2}}]\nmethods: [ddim]\nsteps: [3]\nguidance: [1.0]\n"
        "metrics: [exact_mse, swd]\nn_samples: 16\nbatch_size: 16\nbootstrap: 5\n",
    )
    df = pd.read_parquet(run_suite(load_suite(path), "r", tmp_results, progress=False) / "results.parquet")
    for m in ("exact_mse", "swd"):
        assert df[[m, f"{m}_ci_low", f"{m}_ci_high"]].notna().all().all()


def test_suite_accepts_a_reference_set_name(tmp_path):
    path = write_suite(
        tmp_path / "s.yaml",
        "models: [digits-unet]\nmethods: [ddim]\nsteps: [3]\nguidance: [1.0]\nmetrics: [fid]\nreference_set: coco-val\n",
    )
    assert load_suite(path).raw["reference_set"] == "coco-val"


def fake_run(tmp_path) -> str:
    rows = pd.DataFrame(
        {
            "status": ["ok"] * 4,
            "model": ["m"] * 4,
            "method": list("ABCD"),
            "knobs": ["{}"] * 4,
            "steps": [1, 2, 3, 4],
            "guidance": [1.0] * 4,
            "fid": [10.0, 20.0, 15.0, 12.0],
            "inception_score": [3.0, 9.0, 6.0, 8.0],
            "class_acc": [0.5, 0.9, 0.7, 0.8],
        }
    )
    for c in ("fid", "inception_score", "class_acc"):
        rows[f"{c}_ci_low"], rows[f"{c}_ci_high"] = rows[c], rows[c]
    run = tmp_path / "run"
    run.mkdir()
    rows.to_parquet(run / "results.parquet")
    return str(run)


def test_mmhm_command_on_a_run_with_saved_and_reused_bounds(tmp_path, capsys):
    run = fake_run(tmp_path)
    assert main(["mmhm", run, "--save-bounds", str(tmp_path / "b.json")]) == 0
    table = pd.read_csv(f"{run}/mmhm.csv").set_index("method")
    # offline stand-ins: FID [10, 20], IS [3, 9], class_acc [0.5, 0.9];
    # D = (0.8, 5/6, 0.75): 3 / (1.25 + 1.2 + 4/3) = 0.792952
    assert table.loc["D", "mmhm"] == pytest.approx(3 / (1.25 + 1.2 + 4 / 3))
    assert table.loc["A", "mmhm"] == 0.0 and table.loc["C", "mmhm"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "b.json").read_text())["components"]["fid"] == [10.0, 20.0]
    assert main(["mmhm", run, "--bounds", str(tmp_path / "b.json")]) == 0
    assert pd.read_csv(f"{run}/mmhm.csv").set_index("method").loc["D", "mmhm"] == pytest.approx(table.loc["D", "mmhm"])
    assert main(["mmhm", run, "--components", "clip_score"]) == 2
    assert "no column clip_score" in capsys.readouterr().err


def test_paired_comparison_of_two_jobs_of_a_run(tmp_path):
    from bench.metrics.paired import paired_from_run

    x = digits("heldout")[0][:60]
    noisy = x + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for jid, s in (("a", x), ("b", noisy)):
        d = tmp_path / "jobs" / jid
        d.mkdir(parents=True)
        np.save(d / "samples.npy", s.numpy())
        (d / "row.json").write_text(json.dumps({"seed": 0, "n_samples": 60}))
    bundle = random_bundle("eps")
    (res,) = paired_from_run(tmp_path, "a", "b", ["fid"], bundle, bootstrap=50)
    assert res.a < res.b and res.significant and res.a_better
    (tmp_path / "jobs/b/row.json").write_text(json.dumps({"seed": 1, "n_samples": 60}))
    with pytest.raises(ValueError, match="do not share seeds"):
        paired_from_run(tmp_path, "a", "b", ["fid"], bundle)


PAIRED_SUITE = """
name: paired
n_samples: 24
batch_size: 24
bootstrap: 5
models: [digits-unet]
methods: [ddim]
steps: [2, 6]
guidance: [1.0]
metrics: [fid, class_acc, psnr]
reference: {model: digits-unet, method: ddim, steps: 6, guidance: 1.0}
timing: {warmup: 0}
"""


def test_bench_paired_command_pairs_two_jobs_of_a_run(tmp_path, capsys):
    """`bench paired RUN A B`: jobs chosen by spec, the paired difference equals the difference of the
    rows' values, metrics needing the reference configuration are left out by default; an
    ambiguous spec and an unpairable metric are errors that name the fix."""
    path = tmp_path / "paired.yaml"
    path.write_text(PAIRED_SUITE)
    run = run_suite(load_suite(path), "p", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet").set_index("steps")
    capsys.readouterr()
    assert main(["paired", str(run), "method=ddim,steps=2", "method=ddim,steps=6", "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "paired over 24 shared seeds" in out and "psnr" not in out.split("paired over")[1]
    for m in ("fid", "class_acc"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(m))
        diff = float(line.split("A-B")[1].split()[0])
        assert diff == pytest.approx(df.loc[2, m] - df.loc[6, m], abs=5e-4)
    assert main(["paired", str(run), "method=ddim", df.loc[6, "job_id"]]) == 2
    assert "2 finished jobs match 'method=ddim'" in capsys.readouterr().err
    assert main(["paired", str(run), "method=ddim,steps=2", "method=ddim,steps=6", "--metric", "psnr"]) == 2
    assert "choose another --metric" in capsys.readouterr().err
