"""Torn files, failed runs and paths: what bench loads is checked, what it writes stays under its roots.

- a finished job whose samples are torn (half a file, empty, missing, or not the samples its row's
  digest names) is done again, never loaded: in a run (``--resume``) and in the job store, and the
  final table equals an uninterrupted run's;
- a torn artifact is built again; a corrupt reference cache names its file and the command that
  rebuilds it; ``bench compare`` on unreadable inputs exits 2 naming the file;
- a run whose jobs all failed ends with its failure table and exit code 3;
- no suite value, run id or store key makes bench write outside its results, store or $BENCH_HOME.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bench.worker
from bench.artifacts import ArtifactStore
from bench.cli import main
from bench.paths import PathEscapeError
from bench.runner import read_executions, run_suite
from bench.store import JobStore
from bench.suite import load_suite

SUITE = """
name: torn
n_samples: 24
batch_size: 24
bootstrap: 5
models:
  - {name: gmm, options: {dim: 2}}
methods: [ddim, euler, dpmpp_2m]
steps: [3, 6]
guidance: [1.0]
metrics: [exact_mse]
timing: {warmup: 0}
"""

# where and when a job ran, and whether it was copied: the rest of a row must not change
VOLATILE = {
    "run_id", "latency_s", "latency_iqr_s", "latency_per_image_s", "latency_per_image_iqr_s", "peak_mem_bytes",
    "node_id", "worker_id", "host", "threads", "session", "attempts", "reused", "reused_from", "produced_git_sha",
    "train_cost_s", "device_name", "workers", "node_workers", "executor", "peak_mem_scope",
}  # fmt: skip


def _table(run: Path) -> pd.DataFrame:
    df = pd.read_parquet(run / "results.parquet")
    return df[sorted(c for c in df.columns if c not in VOLATILE)].sort_values("job_id").reset_index(drop=True)


def _tear(path: Path, how: str) -> None:
    """Damage a samples file the four ways a crash or a person can: each a new file (the run's
    copy is a hard link of the store's: damaging one must not damage the other)."""
    data = path.read_bytes()
    path.unlink()
    if how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "digest":  # a whole, readable file, but not the samples the row's digest names
        np.save(path, np.zeros_like(np.load(io.BytesIO(data))))
    elif how != "missing":
        raise ValueError(how)


HOW = ("half", "empty", "missing", "digest")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run (its table is what every repaired run must equal) and a second run of
    the same suite, with its own store, to damage."""
    d = tmp_path_factory.mktemp("torn")
    (d / "torn.yaml").write_text(SUITE)
    suite = load_suite(d / "torn.yaml")
    clean = run_suite(suite, "clean", d / "res0", progress=False)
    return d, suite, clean


def test_a_resumed_run_redoes_exactly_its_torn_jobs_and_ends_as_an_uninterrupted_run(runs, capsys):
    d, suite, clean = runs
    res = d / "res1"
    run = run_suite(suite, "r", res, progress=False)
    jobs = sorted(p.name for p in (run / "jobs").iterdir())
    assert len(jobs) == 6
    torn = dict(zip(jobs[:4], HOW, strict=True))
    for job, how in torn.items():
        _tear(run / "jobs" / job / "samples.npy", how)
    untouched = {p: p.stat().st_mtime_ns for j in jobs[4:] for p in (run / "jobs" / j).iterdir()}
    capsys.readouterr()
    assert main(["run", str(d / "torn.yaml"), "--results", str(res), "--resume", "r", "--no-progress"]) == 0
    err = capsys.readouterr().err
    for job in torn:
        assert f"bench: job {job}: " in err and "doing the job again" in err
    last = json.loads((run / "run.json").read_text())["sessions"][-1]
    assert sorted(r["job_id"] for r in last["redone"]) == sorted(torn) and {r["where"] for r in last["redone"]} == {"run"}
    whys = {r["job_id"]: r["why"] for r in last["redone"]}
    assert "is unreadable" in whys[jobs[0]] and "is unreadable" in whys[jobs[1]]
    assert whys[jobs[2]] == "is missing" and "does not match the row's samples_sha256" in whys[jobs[3]]
    # the store's copies were whole: the torn jobs are copied from it again, nothing is computed
    assert last["reused"] == 4 and last["computed"] == 0 and last["already_done"] == 2
    assert untouched == {p: p.stat().st_mtime_ns for p in untouched}  # the other jobs were left alone
    pd.testing.assert_frame_equal(_table(run), _table(clean))
    for job in jobs:
        assert np.array_equal(np.load(run / "jobs" / job / "samples.npy"), np.load(clean / "jobs" / job / "samples.npy"))


def test_torn_store_entries_are_computed_again_never_loaded(runs, capsys):
    d, suite, clean = runs
    res = d / "res2"
    first = run_suite(suite, "a", res, progress=False)
    store = JobStore(res / ".store")
    keys = sorted(json.loads((first / "jobs" / j / "row.json").read_text())["store_key"] for j in os.listdir(first / "jobs"))
    torn = dict(zip(keys[:4], HOW, strict=True))
    for key, how in torn.items():
        _tear(store.path(key) / "samples.npy", how)
    # a torn entry is not an entry
    assert all(store.get(k) is None for k in torn) and all(store.get(k) is not None for k in keys[4:])
    assert [k for k, _ in store.rejected] == list(torn)
    capsys.readouterr()
    second = run_suite(suite, "b", res, progress=False)
    err = capsys.readouterr().err
    last = json.loads((second / "run.json").read_text())["sessions"][-1]
    assert {r["where"] for r in last["redone"]} == {"store"} and len(last["redone"]) == 4
    assert last["computed"] == 4 and last["reused"] == 2 and err.count("doing the job again") == 4
    df = pd.read_parquet(second / "results.parquet")
    computed = set(df.loc[~df["reused"], "store_key"])
    assert computed == set(torn)  # exactly the torn entries were computed
    assert sorted(e["job_id"] for e in read_executions(second)) == sorted(df.loc[~df["reused"], "job_id"])
    pd.testing.assert_frame_equal(_table(second), _table(clean))
    assert all(store.get(k) is not None for k in keys)  # and written whole again
    # a row whose digest names other samples is torn too (the row, not the samples, was damaged)
    row_path = store.path(keys[5]) / "row.json"
    row = json.loads(row_path.read_text())
    row_path.write_text(json.dumps(row | {"samples_sha256": "0" * 64}))
    assert store.get(keys[5]) is None and "does not match" in store.rejected[-1][1]


def test_a_torn_artifact_is_built_again_never_loaded(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(out: Path, work: Path) -> dict:
        calls.append(1)
        (out / "weights.bin").write_bytes(b"trained" * 100)
        (out / "table.json").write_text("[1, 2, 3]")
        return {}

    art = store.get_or_build("k1", build)
    assert art.built and store.get("k1") is not None and len(calls) == 1
    for how in ("half", "empty", "missing", "changed"):
        f = art.path / "weights.bin"
        data = f.read_bytes()
        if how == "missing":
            f.unlink()
        else:
            f.write_bytes({"half": data[: len(data) // 2], "empty": b"", "changed": data.upper()}[how])
        assert store.get("k1") is None, how
        assert "do not match its record's digest" in store.rejected[-1][1]
        again = store.get_or_build("k1", build)
        assert again.built and (again.path / "weights.bin").read_bytes() == b"trained" * 100
    assert len(calls) == 5
    assert "it is not used, and is built again" in capsys.readouterr().err
    # a torn record is no artifact either
    rec = art.path / "artifact.json"
    rec.write_text(rec.read_text()[:10])
    assert store.get("k1") is None and store.get_or_build("k1", build).built


DIGITS = """
name: refcache
n_samples: 8
batch_size: 8
bootstrap: 5
models: [digits-unet]
methods: [ddim]
steps: [2]
guidance: [1.0]
metrics: [fid]
timing: {warmup: 0}
"""


def test_a_corrupt_reference_cache_fails_the_run_with_exit_3_naming_the_file_and_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    from bench.metrics import refs

    cache = refs.cache_path("digits-train", "digits")
    cache.parent.mkdir(parents=True)
    feats = np.random.default_rng(0).normal(size=(20, 64))
    meta = {"refset": "digits-train", "space": "digits", "n": 20, "dim": 64, "network_id": refs.SPACES["digits"].network_id()}
    meta["features_sha256"] = hashlib.sha256(feats.astype(np.float32).tobytes()).hexdigest()[:16]
    cache.with_suffix(".json").write_text(json.dumps(meta))
    with open(cache, "wb") as f:
        np.savez(f, feats=feats.astype(np.float32), mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    assert refs.load("digits-train", "digits").feats.shape == (20, 64)  # whole: loaded
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 3])  # torn: the zip directory at its end is gone
    (tmp_path / "s.yaml").write_text(DIGITS)
    args = ["run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "res"), "--run-id", "r", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 3
    out, err = capsys.readouterr()
    fix = "`bench ref build digits-train --features digits`"
    assert f"reference statistics {cache} are corrupt: it is unreadable (BadZipFile" in out and fix in out
    assert "1 of 1 jobs failed" in err and "Traceback" not in out + err
    # a cache that loads but is not what its record says (its features changed) is corrupt too
    with open(cache, "wb") as f:
        np.savez(f, feats=feats.astype(np.float32) + 1, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    with pytest.raises(refs.CorruptReferenceError, match=f"do not match its record's features_sha256.*{re.escape(fix)}"):
        refs.load("digits-train", "digits")


def test_a_run_whose_jobs_all_fail_ends_with_its_failure_table_and_exit_3(runs, monkeypatch, capsys):
    d, _, _ = runs

    def broken(job, bundle, suite, device="cpu", **kw):
        raise RuntimeError(f"boom in {job.method}")

    monkeypatch.setattr(bench.worker, "run_job", broken)
    res = d / "res-failed"
    capsys.readouterr()
    assert main(["run", str(d / "torn.yaml"), "--results", str(res), "--run-id", "f", "--no-progress"]) == 3
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [ln for ln in out.splitlines() if "FAILED" in ln]
    assert len(lines) == 6 and all("RuntimeError: boom in" in ln for ln in lines)
    assert "plot: none" in out and "6 of 6 jobs failed" in err and "--resume f" in err
    table = (res / "torn" / "f" / "table.md").read_text()
    assert "6 of 6 jobs failed" in table and table.count("boom in") == 6


def test_compare_on_unreadable_inputs_exits_2_and_names_the_file(runs, capsys):
    d, suite, clean = runs
    cand = run_suite(suite, "cand", d / "res-cmp", progress=False)
    job = sorted(os.listdir(cand / "jobs"))[0]
    (cand / "jobs" / job / "samples.npy").unlink()
    (cand / "jobs" / job / "samples.npy").write_bytes(b"\x93NUMPY")  # torn after its first bytes
    capsys.readouterr()
    assert main(["compare", str(clean), str(cand)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {cand / 'jobs' / job / 'samples.npy'}" in err and "Traceback" not in err
    (cand / "run.json").write_text('{"run_id": ')
    assert main(["compare", str(clean), str(cand)]) == 2
    assert f"cannot read {cand / 'run.json'}" in capsys.readouterr().err
    (cand / "results.parquet").write_bytes(b"PAR1 torn")
    assert main(["compare", str(clean), str(cand)]) == 2
    assert f"cannot read {cand / 'results.parquet'}" in capsys.readouterr().err


# --- paths: every write under bench's roots --------------------------------------------------------


def test_names_that_would_leave_a_root_are_errors_and_nothing_is_written(runs, tmp_path):
    _, suite, _ = runs
    res = tmp_path / "box" / "results"
    for name, run_id in [("../../escaped", "r"), ("/abs", "r"), ("ok", "../../escaped"), ("ok", "a/../../b"), ("ok", ".")]:
        bad = type(suite)(**{**suite.__dict__, "name": name})  # past the schema: the runner checks again
        with pytest.raises(PathEscapeError):
            run_suite(bad, run_id, res, progress=False)
    assert not (tmp_path / "box").exists() and not (tmp_path / "escaped").exists()
    for key in ("../x", "/etc", "a/b", "..", ""):
        with pytest.raises(PathEscapeError):
            JobStore(tmp_path / "s").path(key)
        with pytest.raises(PathEscapeError):
            ArtifactStore(tmp_path / "a").path(key)
        with pytest.raises(PathEscapeError):
            ArtifactStore(tmp_path / "a").work_dir(key)
    # a link inside a root that points out of it is followed, and refused
    (tmp_path / "outside").mkdir()
    res.mkdir(parents=True)
    (res / "torn").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(PathEscapeError, match="is outside"):
        run_suite(suite, "r", res, progress=False)
    assert not list((tmp_path / "outside").iterdir())


def test_a_run_writes_only_under_its_results_store_and_bench_home(tmp_path, monkeypatch):
    """Every file a whole `bench run` creates, renames, links or removes, seen by an audit hook."""
    home, res, store = tmp_path / "home", tmp_path / "results", tmp_path / "store"
    monkeypatch.setenv("BENCH_HOME", str(home))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / "mpl"))  # matplotlib's own cache, if it makes one
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "s.yaml").write_text(SUITE.replace("name: torn", "name: audited"))
    written: list[str] = []
    _AUDIT.append(written)
    try:
        args = ["run", str(tmp_path / "suite" / "s.yaml"), "--results", str(res), "--store", str(store), "--no-progress"]
        assert main(args) == 0
    finally:
        _AUDIT.remove(written)
    roots = [Path(p).resolve() for p in (res, store, home)]
    roots += [Path("/proc"), Path("/dev/null")]  # not files: the peak-memory reset (clear_refs), a child's discarded output
    outside = sorted({p for p in written if not any(Path(p).resolve().is_relative_to(r) for r in roots)})
    assert written and not outside, outside
    assert not [p for p in (tmp_path / "suite").iterdir() if p.name != "s.yaml"]


_AUDIT: list[list[str]] = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args: tuple) -> None:
    if not _AUDIT:
        return
    paths: list = []
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        paths = [path] if writing and isinstance(path, str | bytes | os.PathLike) else []
    elif event in ("os.rename", "os.link", "os.symlink"):
        paths = list(args[:2])
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "shutil.rmtree"):
        paths = [args[0]]
    for p in paths:
        if isinstance(p, int) or "__pycache__" in os.fsdecode(p):  # a file descriptor; Python's own bytecode cache
            continue
        _AUDIT[-1].append(os.fsdecode(p))


sys.addaudithook(_audit)
