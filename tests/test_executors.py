"""The sweep driver with the local executor: job store reuse, --fresh, failures, plan, and a
driver killed with SIGKILL then resumed (no finished job recomputed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bench.worker
from bench.cli import main
from bench.executors import ExecutorError, make_executor
from bench.runner import plan_jobs, read_executions, run_suite
from bench.store import samples_digest
from bench.suite import expand, load_suite

TINY = """
n_samples: 32
batch_size: 16
bootstrap: 5
models:
  - {name: gmm, options: {dim: 2}}
methods: [ddim, euler]
steps: [3, 6]
guidance: [1.0]
metrics: [exact_mse, swd]
"""

# Timing columns and where/when a job ran differ between runs; everything else must not.
VOLATILE = {
    "run_id", "latency_s", "latency_iqr_s", "latency_per_image_s", "latency_per_image_iqr_s", "peak_mem_bytes",
    "node_id", "worker_id", "host", "threads", "session", "attempts", "reused", "reused_from", "produced_git_sha",
    "train_cost_s", "device_name", "workers", "node_workers", "executor",
}  # fmt: skip


def suite_file(tmp_path: Path, text: str = TINY, name: str = "tiny") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def sessions(run: Path) -> list[dict]:
    return json.loads((run / "run.json").read_text())["sessions"]


def test_rerun_reuses_every_job_from_the_store_and_fresh_recomputes(tmp_path):
    suite = load_suite(suite_file(tmp_path))
    res = tmp_path / "res"
    first = run_suite(suite, "a", res, progress=False)
    second = run_suite(suite, "b", res, progress=False)
    a, b = (pd.read_parquet(r / "results.parquet") for r in (first, second))
    assert len(a) == len(b) == 4 and not a["reused"].any() and b["reused"].all()
    assert set(b["reused_from"]) == {"tiny/a"}
    assert sessions(second)[-1]["computed"] == 0 and sessions(second)[-1]["reused"] == 4
    assert not read_executions(second)  # nothing ran: no model was evaluated
    assert sessions(second)[-1]["executor"]["started"] is False  # and no executor was started
    for c in ("nfe", "exact_mse", "swd", "latency_s", "job_id"):
        assert a[c].tolist() == b[c].tolist(), c
    for j in a["job_id"]:
        assert np.array_equal(np.load(first / "jobs" / j / "samples.npy"), np.load(second / "jobs" / j / "samples.npy"))
    # --fresh recomputes everything (and gives the same numbers)
    third = run_suite(suite, "c", res, progress=False, fresh=True)
    c = pd.read_parquet(third / "results.parquet")
    assert not c["reused"].any() and len(read_executions(third)) == 4
    assert c["exact_mse"].tolist() == a["exact_mse"].tolist()
    # a change in how jobs are scored is a different store entry: not reused
    other = load_suite(suite_file(tmp_path, TINY.replace("bootstrap: 5", "bootstrap: 7")))
    d = pd.read_parquet(run_suite(other, "d", res, progress=False) / "results.parquet")
    assert not d["reused"].any()


def test_rows_record_where_and_how_a_job_ran(tmp_path):
    run = run_suite(load_suite(suite_file(tmp_path)), "a", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet")
    for c in ("node_id", "worker_id", "device", "workers", "node_workers", "threads", "executor", "attempts", "session"):
        assert df[c].notna().all(), c
    assert (df["executor"] == "local").all() and (df["workers"] == 1).all() and (df["device"] == "cpu").all()
    log = read_executions(run)
    assert sorted(e["job_id"] for e in log) == sorted(df["job_id"]) and all(e["status"] == "ok" for e in log)
    assert sum(e["network_calls"] for e in log) == df["network_calls"].sum()
    for _, r in df.iterrows():  # the digest is of the samples kept
        assert r["samples_sha256"] == samples_digest(np.load(run / "jobs" / r["job_id"] / "samples.npy"))


def test_a_job_that_raises_is_recorded_failed_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    path = suite_file(tmp_path)
    real = bench.worker.run_job

    def flaky(job, bundle, suite, device="cpu", **kw):
        if job.method == "euler" and job.steps == 6:
            raise ValueError("boom in the sampler")
        return real(job, bundle, suite, device, **kw)

    monkeypatch.setattr(bench.worker, "run_job", flaky)
    assert main(["run", str(path), "--results", str(tmp_path / "res"), "--run-id", "f", "--no-progress"]) == 3
    out = capsys.readouterr().out
    assert "FAILED gmm[dim=2] euler 6 steps" in out and "boom in the sampler" in out
    run = tmp_path / "res" / "tiny" / "f"
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 4 and df["job_id"].is_unique and (df["status"] == "failed").sum() == 1
    bad = df[df["status"] == "failed"].iloc[0]
    assert "ValueError: boom in the sampler" in bad["error"] and bad["attempts"] == 1  # an exception is not retried
    record = json.loads((run / "run.json").read_text())
    assert [f["method"] for f in record["failed_jobs"]] == ["euler"] and record["jobs"] == {"total": 4, "failed": 1}
    # resuming retries the failed job only; the finished ones are left alone
    monkeypatch.setattr(bench.worker, "run_job", real)
    before = {p: p.stat().st_mtime_ns for p in run.glob("jobs/*/row.json") if json.loads(p.read_text())["status"] == "ok"}
    assert main(["run", str(path), "--results", str(tmp_path / "res"), "--resume", "f", "--no-progress"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in before}
    assert [e["job_id"] for e in read_executions(run) if e["session"] == sessions(run)[-1]["session"]] == [bad["job_id"]]
    assert (pd.read_parquet(run / "results.parquet")["status"] == "ok").all()


def test_progress_display_shows_done_total_running_failed_and_eta(tmp_path, capsys):
    run_suite(load_suite(suite_file(tmp_path)), "p", tmp_path / "res", progress=True)
    err = capsys.readouterr().err
    assert "tiny p" in err and "4/4" in err and "2/4" in err  # done/total as jobs finish
    assert "running 1 | failed 0" in err and "reused 0" in err
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", err)  # elapsed<ETA


def test_local_threads_apply_to_torch_and_blas_and_are_restored():
    """Bitwise-equal results across executors need equal thread counts in torch and in numpy's
    BLAS (KID's matrix products at 300 samples differ by 1e-13 between 1 and 2 BLAS threads)."""
    from threadpoolctl import threadpool_info

    before = (torch.get_num_threads(), [i["num_threads"] for i in threadpool_info()])
    ex = make_executor("local", threads=1)
    assert torch.get_num_threads() == 1 and all(i["num_threads"] == 1 for i in threadpool_info())
    assert ex.info["threads"] == 1
    ex.close()
    assert (torch.get_num_threads(), [i["num_threads"] for i in threadpool_info()]) == before


def test_bad_executor_settings_name_the_fix(tmp_path, capsys):
    with pytest.raises(ExecutorError, match="use --executor ray --workers N"):
        make_executor("local", workers=2)
    with pytest.raises(ExecutorError, match="use it with --executor ray"):
        make_executor("local", address="127.0.0.1:6379")
    with pytest.raises(ExecutorError, match="use one of local, ray"):
        make_executor("dask")
    path = suite_file(tmp_path)
    assert main(["run", str(path), "--results", str(tmp_path / "r"), "--workers", "3", "--no-progress"]) == 2
    assert "use --executor ray --workers N" in capsys.readouterr().err
    assert main(["run", str(path), "--results", str(tmp_path / "r"), "--resume", "nope"]) == 2
    assert "no run 'nope' of suite tiny" in capsys.readouterr().err


def test_plan_lists_jobs_with_probed_nfe_cost_and_cache_state(tmp_path, capsys):
    path = suite_file(tmp_path, TINY.replace("methods: [ddim, euler]", "methods: [ddim, heun]"))
    res = tmp_path / "res"
    assert main(["plan", str(path), "--results", str(res), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["to_run"] == 4 and plan["cached"] == 0 and plan["est_s"] > 0
    nfe = {(r["method"], r["steps"]): r["nfe"] for r in plan["jobs"]}
    # measured by the probe: DDIM one evaluation per step; Heun (EDM Alg. 1) two per step but the last
    assert nfe == {("ddim", 3): 3, ("ddim", 6): 6, ("heun", 3): 5, ("heun", 6): 11}
    assert all(r["nfe_source"] == "probe" for r in plan["jobs"])
    suite = load_suite(path)
    run = run_suite(suite, "a", res, progress=False)
    df = pd.read_parquet(run / "results.parquet")
    assert sorted(zip(df["method"], df["steps"], df["nfe"], strict=True)) == sorted((m, s, n) for (m, s), n in nfe.items())
    assert main(["plan", str(path), "--results", str(res)]) == 0
    text = capsys.readouterr().out
    assert "to run: 0 jobs (4 already in the job store" in text and "heun" in text and "probe: one network call" in text
    ids = {p.job_id for p in plan_jobs(suite, expand(suite)[0], "cpu", 1)[0]}
    assert ids == {r["job_id"] for r in plan["jobs"]} == set(df["job_id"])


KILL_SUITE = """
n_samples: 32
batch_size: 16
bootstrap: 5
models:
  - {name: gmm, options: {dim: 2}}
methods: [ddim, euler, dpmpp_2m]
steps: [3, 4, 6, 8]
guidance: [1.0]
metrics: [exact_mse, swd]
timing: {warmup: 1}
"""


@pytest.mark.slow
def test_driver_killed_with_sigkill_resumes_without_recomputing(tmp_path):
    path = suite_file(tmp_path, KILL_SUITE, "killme")
    res = tmp_path / "res"
    run = res / "killme" / "k"
    cmd = [sys.executable, "-m", "bench.cli", "run", str(path), "--results", str(res), "--run-id", "k", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(list(run.glob("jobs/*/row.json"))) < 3:
            assert proc.poll() is None, f"bench run ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "no jobs finished in 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    finished = {p.parent.name for p in run.glob("jobs/*/row.json")}
    assert 3 <= len(finished) < 12, "the driver should have been killed mid-sweep"
    mtimes = {j: (run / "jobs" / j / "row.json").stat().st_mtime_ns for j in finished}
    assert not (run / "results.parquet").exists()

    assert main(["run", str(path), "--results", str(res), "--resume", "k", "--no-progress"]) == 0
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 12 and df["job_id"].is_unique and (df["status"] == "ok").all()
    assert mtimes == {j: (run / "jobs" / j / "row.json").stat().st_mtime_ns for j in finished}
    last = sessions(run)[-1]
    resumed = [e for e in read_executions(run) if e["session"] == last["session"]]
    ran = {e["job_id"] for e in resumed}
    reused = set(df.loc[df["reused"], "job_id"])  # killed between the store write and the run's row
    assert not ran & finished, "a finished job was computed again"
    assert ran | finished | reused == set(df["job_id"]) and len(resumed) == len(ran)
    # model evaluations in the resumed session: exactly those of the jobs that had not finished
    todo = df[df["job_id"].isin(ran)]
    assert last["network_calls"] == sum(e["network_calls"] for e in resumed) == todo["network_calls"].sum()
    assert last["network_calls"] < df["network_calls"].sum()

    # the final table equals an uninterrupted run's (timing and placement columns aside)
    full = run_suite(load_suite(path), "u", tmp_path / "res2", progress=False)
    ref = pd.read_parquet(full / "results.parquet")
    cols = sorted(set(df.columns) - VOLATILE - {"store_key"})
    assert set(cols) <= set(ref.columns)
    a = df[cols].sort_values("job_id").reset_index(drop=True)
    b = ref[cols].sort_values("job_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
