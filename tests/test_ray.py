"""Sweeps on Ray: the same samples and metrics as the local executor, a two-node cluster on
loopback, and workers killed mid-job (retried, then failed). Ray start-up is slow on two busy
cores, so the tests share one cluster and use tiny suites."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.runner import plan_jobs, read_executions, run_suite
from bench.suite import SUITE_DIR, expand, load_suite

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # each test starts Ray workers (tens of seconds here)

# A slice of the quick suite (same models, methods, guidance and metrics), few samples.
QUICK_SLICE = f"""
include: {SUITE_DIR / "quick.yaml"}
name: quick-ray-slice
n_samples: 20
batch_size: 10
bootstrap: 10
steps: [4]
timing: {{warmup: 0}}
"""

TINY = """
n_samples: 16
batch_size: 8
bootstrap: 5
models:
  - {name: gmm, options: {dim: 2}}
methods: [ddim, euler]
steps: [2, 3, 4]
guidance: [1.0]
metrics: [exact_mse]
timing: {warmup: 0}
"""

SAME = ["nfe", "network_calls", "flops", "n_samples", "seed", "status"]


def suite_file(tmp_path: Path, text: str, name: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def test_ray_gives_the_same_samples_metrics_and_nfe_as_local(tmp_path):
    """Acceptance 1 on a slice of the quick suite: a local Ray started (and stopped) by bench.

    Both at one torch thread per worker: CPU kernels split a small batch differently with the
    thread count (about 1e-6 apart at batch 10), so bitwise equality needs equal threads."""
    suite = load_suite(suite_file(tmp_path, QUICK_SLICE, "slice"))
    assert not ray.is_initialized()
    local = run_suite(suite, "local", tmp_path / "local", progress=False, executor="local", threads=1)
    remote = run_suite(suite, "ray", tmp_path / "ray", progress=False, executor="ray", workers=2, threads=1)
    assert not ray.is_initialized()  # bench stopped the Ray it started
    a = pd.read_parquet(local / "results.parquet").set_index("job_id").sort_index()
    b = pd.read_parquet(remote / "results.parquet").set_index("job_id").sort_index()
    assert len(a) >= 8 and a.index.equals(b.index) and (a["status"] == "ok").all()
    metrics = [m for m in suite.metrics if m in a.columns]
    cols = SAME + metrics + [f"{m}_ci_{s}" for m in metrics for s in ("low", "high")]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
    for j in a.index:  # bitwise-identical samples (per-sample seeds)
        assert np.array_equal(np.load(local / "jobs" / j / "samples.npy"), np.load(remote / "jobs" / j / "samples.npy"))
    assert (b["executor"] == "ray").all() and (b["workers"] == 2).all() and (b["threads"] == 1).all()
    assert b["worker_id"].nunique() == 2 and (b["device"] == "cpu").all()
    ex = json.loads((remote / "run.json").read_text())["executor"]
    assert ex["address"] == "local (started by bench)" and len(ex["nodes"]) == 1


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of two nodes (one CPU each) on 127.0.0.1, stopped at the end.

    ``ray start`` cannot bind a node to loopback (it swaps 127.0.0.1 for the host's address),
    and ``ray stop`` would stop every Ray of this user on the machine; Ray's own test cluster
    (``ray.cluster_utils``) in single-machine mode puts both nodes on 127.0.0.1 and shuts down
    exactly the processes it started."""
    import ray._private.ray_constants as rc
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setattr(rc, "ENABLE_RAY_CLUSTER", False)
        # Cluster() records its address in /tmp/ray/ray_current_cluster, where any later plain
        # ray.init() on this machine would find it (and, once we stop it, fail on a dead address)
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        if not (Path.home() / ".ray" / "auth_token").is_file() and "RAY_AUTH_TOKEN" not in os.environ:
            subprocess.run([Path(sys.executable).parent / "ray", "get-auth-token", "--generate"], check=True, capture_output=True)
        c = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
            },
        )
        session = c.head_node.get_session_dir_path()
        try:
            c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            assert [n.node_ip_address for n in (c.head_node, *c.worker_nodes)] == ["127.0.0.1", "127.0.0.1"]
            yield c
        finally:
            if ray.is_initialized():
                ray.shutdown()
            c.shutdown()
            left = _processes_of(session)
            for pid in left:  # ours: their command line names this cluster's session directory
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the test cluster outlived its shutdown: {left}"


def _processes_of(session: str, wait_s: float = 15.0) -> list[int]:
    """Pids whose command line names ``session`` (waits up to ``wait_s`` for them to exit)."""
    import time

    deadline = time.time() + wait_s
    while True:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and d.name != str(os.getpid()):
                try:
                    if session.encode() in (d / "cmdline").read_bytes():
                        pids.append(int(d.name))
                except OSError:
                    continue
        if not pids or time.time() > deadline:
            return pids
        time.sleep(0.5)


def test_jobs_run_on_both_nodes_of_a_cluster(cluster, tmp_path):
    path = suite_file(tmp_path, TINY, "tiny")
    args = ["run", str(path), "--results", str(tmp_path / "res"), "--run-id", "mn", "--no-progress"]
    assert main([*args, "--executor", "ray", "--address", cluster.address]) == 0
    run = tmp_path / "res" / "tiny" / "mn"
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 6 and (df["status"] == "ok").all()
    assert df["node_id"].nunique() == 2, df[["node_id", "worker_id"]]
    assert (df["node_workers"] == 1).all() and (df["workers"] == 2).all()
    ex = json.loads((run / "run.json").read_text())["executor"]
    assert len(ex["nodes"]) == 2 and ex["address"] == cluster.address
    assert ray.is_initialized() is False  # bench disconnected; the cluster itself is the fixture's


def _fault_job(suite) -> str:
    planned, _ = plan_jobs(suite, expand(suite)[0], "cpu", 1)
    return planned[-1].job_id


def test_worker_killed_mid_job_is_retried(cluster, tmp_path, monkeypatch):
    suite = load_suite(suite_file(tmp_path, TINY, "tiny"))
    jid, marker = _fault_job(suite), tmp_path / "killed-once"
    monkeypatch.setenv("BENCH_FAULT_KILL", f"{jid}:{marker}")
    run = run_suite(suite, "f1", tmp_path / "res", progress=False, executor="ray", address=cluster.address, retries=1)
    assert marker.is_file()  # the worker really died in the job
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 6 and df["job_id"].is_unique and (df["status"] == "ok").all()  # no duplicate or missing rows
    assert df.set_index("job_id").loc[jid, "attempts"] == 2
    log = read_executions(run)
    mine = [(e["attempt"], e["status"]) for e in log if e["job_id"] == jid]
    assert mine == [(1, "lost"), (2, "ok")]
    assert sorted(e["job_id"] for e in log if e["status"] == "ok") == sorted(df["job_id"])
    session = json.loads((run / "run.json").read_text())["sessions"][-1]
    assert session["retried"] == 1 and session["failed"] == 0


def test_worker_killed_without_retries_is_recorded_failed(cluster, tmp_path, monkeypatch):
    suite = load_suite(suite_file(tmp_path, TINY, "tiny"))
    jid, marker = _fault_job(suite), tmp_path / "killed-once"
    monkeypatch.setenv("BENCH_FAULT_KILL", f"{jid}:{marker}")
    run = run_suite(suite, "f0", tmp_path / "res", progress=False, executor="ray", address=cluster.address, retries=0)
    df = pd.read_parquet(run / "results.parquet").set_index("job_id")
    assert len(df) == 6 and (df.drop(index=jid)["status"] == "ok").all()  # the sweep went on
    assert df.loc[jid, "status"] == "failed" and "worker lost" in df.loc[jid, "error"]
    record = json.loads((run / "run.json").read_text())
    assert [f["job_id"] for f in record["failed_jobs"]] == [jid]


KD_GMM = """
n_samples: 16
batch_size: 16
bootstrap: 5
models: [{name: gmm, options: {dim: 2}}]
methods:
  - {name: kd, steps: [1], knobs: {pairs: [128], teacher_steps: [6], train_steps: [30, 40], batch_size: [32]}}
  - {name: ddim, steps: [2]}
steps: [2]
guidance: [1.0]
metrics: [exact_mse]
timing: {warmup: 0}
"""


def test_ray_builds_each_artifact_once_before_the_jobs_that_need_it(cluster, tmp_path, monkeypatch):
    """Two students share one pairs artifact: three builds, each once, the pairs first; the jobs run
    after their students, and the job that needs no artifact runs meanwhile."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    suite = load_suite(suite_file(tmp_path, KD_GMM, "kdray"))
    run = run_suite(suite, "k", tmp_path / "res", progress=False, executor="ray", address=cluster.address)
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 3 and (df["status"] == "ok").all()
    assert (df[df["method"] == "kd"]["nfe"] == 1.0).all() and df[df["method"] == "kd"]["artifact_id"].nunique() == 2
    log = read_executions(run)
    builds = [e["job_id"] for e in log if e["kind"] == "build"]
    assert len(builds) == 3 == len(set(builds))
    rec = json.loads((run / "run.json").read_text())
    pairs = [k for k, v in rec["artifacts"].items() if "kd:pairs" in v["label"]]
    assert len(pairs) == 1 and builds[0] == f"build:{pairs[0]}"  # the shared parent, built first and once
    order = [e["job_id"] for e in log]
    for _, r in df[df["method"] == "kd"].iterrows():
        assert order.index(r["job_id"]) > order.index(f"build:{r['artifact_id']}")
    assert sorted(v["status"] for v in rec["artifacts"].values()) == ["built"] * 3


def test_two_ray_workers_that_need_the_same_artifact_build_it_once(cluster, tmp_path):
    """Without a driver to plan it (two workers asking the store at the same moment, on two nodes),
    the artifact and its parent are still built exactly once: the store's lock."""
    import time

    root = str(tmp_path / "artifacts")

    def need(root: str, start: float) -> tuple:
        import os as _os
        import time as _time

        import ray as _ray

        from bench.artifacts import ArtifactStore, ensure
        from bench.models import build_model
        from bench.registry import METHODS

        b = build_model("gmm", dim=2, prediction="eps")
        kd = METHODS.get("kd")(pairs=512, teacher_steps=20, train_steps=200, batch_size=64)
        (spec,) = kd.artifacts(b, 1, 1.0)
        _time.sleep(max(0.0, start - _time.time()))
        art = ensure(spec, b, ArtifactStore(root))
        return art.key, art.built, _os.getpid(), _ray.get_runtime_context().get_node_id()

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(need)
        start = time.time() + 5.0
        res = ray.get([remote.remote(root, start) for _ in range(2)])
    finally:
        ray.shutdown()
    assert res[0][0] == res[1][0] and sorted(r[1] for r in res) == [False, True]
    assert res[0][3] != res[1][3]  # one worker on each node
    from bench.artifacts import ArtifactStore

    art = ArtifactStore(Path(root)).get(res[0][0])
    assert len(art.cost["sessions"]) == 1  # one build, never two racing ones
    (pairs_key,) = art.record["parents"].values()
    assert len(ArtifactStore(Path(root)).get(pairs_key).cost["sessions"]) == 1
