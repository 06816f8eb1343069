"""The job store and the trained-artifact store (built once under concurrency, crash-safe)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from bench.artifacts import ArtifactStore
from bench.store import JobStore, content_key, link_or_copy, samples_digest


def test_content_key_ignores_key_order_and_sees_values():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_samples_digest_sees_every_bit_the_shape_and_the_dtype():
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    d = samples_digest(x)
    assert d == samples_digest(x.copy()) == samples_digest(np.asfortranarray(x))  # values, not memory layout
    y = x.copy()
    y.view(np.uint32)[1, 2, 3] ^= 1  # one bit of one value
    assert samples_digest(y) != d
    assert samples_digest(x.reshape(3, 2, 4)) != d and samples_digest(x.astype(np.float64)) != d


def test_job_store_round_trip_and_incomplete_entries(tmp_path):
    store = JobStore(tmp_path)
    x = np.arange(6.0).reshape(3, 2)
    assert store.get("k1") is None
    store.put("k1", {"status": "ok", "nfe": 5}, x)
    got = store.get("k1")
    assert got.row == {"status": "ok", "nfe": 5} and np.array_equal(np.load(got.samples), x)
    # samples without a row (a writer killed between the two writes) is not an entry
    (tmp_path / "jobs" / "k2").mkdir(parents=True)
    np.save(tmp_path / "jobs" / "k2" / "samples.npy", x)
    assert store.get("k2") is None
    # no temp files are left behind
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_link_keeps_the_old_samples_when_the_entry_is_replaced(tmp_path):
    store = JobStore(tmp_path / "store")
    store.put("k", {"status": "ok"}, np.zeros(3))
    dest = tmp_path / "run" / "samples.npy"
    link_or_copy(store.get("k").samples, dest)
    assert np.array_equal(np.load(dest), np.zeros(3))
    store.put("k", {"status": "ok"}, np.ones(3))  # recomputed (--fresh): replaced by rename
    assert np.array_equal(np.load(dest), np.zeros(3))
    assert np.array_equal(np.load(store.get("k").samples), np.ones(3))


def _build_in_process(root: str, spec: dict, log: str, sleep: float, start: float) -> str:
    time.sleep(max(0.0, start - time.time()))  # all processes ask at about the same moment

    def build(out: Path, work: Path) -> dict:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(sleep)
        (out / "weights.bin").write_bytes(b"trained")
        return {"train_wall_s": sleep}

    art = ArtifactStore(Path(root)).get_or_build(content_key(spec), build, describe={"spec": spec})
    assert (art.path / "weights.bin").read_bytes() == b"trained"
    return f"{art.path}|{art.built}"


def test_artifact_is_trained_once_when_many_processes_ask_at_once(tmp_path):
    spec = {"method": "toy_distill", "teacher": "abc", "steps": 10}
    log = tmp_path / "builds.log"
    start = time.time() + 0.5
    ctx = mp.get_context("fork")  # the children do no torch work, so fork is safe and fast
    with ctx.Pool(4) as pool:
        res = pool.starmap(_build_in_process, [(str(tmp_path / "a"), spec, str(log), 1.0, start)] * 4)
    assert len(log.read_text().split()) == 1  # built by exactly one process
    paths = {r.split("|")[0] for r in res}
    assert len(paths) == 1 and sorted(r.split("|")[1] for r in res) == ["False", "False", "False", "True"]
    meta = ArtifactStore(tmp_path / "a").get(content_key(spec)).record
    assert meta["spec"] == spec and meta["train_wall_s"] == 1.0 and meta["digest"]


def test_failed_build_is_not_visible_keeps_its_work_dir_and_the_next_caller_builds(tmp_path):
    store = ArtifactStore(tmp_path)

    def broken(out: Path, work: Path) -> None:
        (work / "ckpt").write_text("step 5")  # what a resumed build would start from
        (out / "half").write_text("x")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        store.get_or_build("k", broken)
    assert store.get("k") is None and not (tmp_path / "k").exists()
    assert (store.work_dir("k") / "ckpt").read_text() == "step 5"

    def resumed(out: Path, work: Path) -> None:
        assert not (out / "half").exists()  # a failed attempt's output is never carried over
        (out / "ok").write_text((work / "ckpt").read_text())

    art = store.get_or_build("k", resumed)
    assert art.built and (art.path / "ok").read_text() == "step 5"
    assert not store.work_dir("k").exists()  # finished: the work directory is gone
    assert store.get_or_build("k", broken).built is False  # found: the builder is not called again


def _die_while_building(root: str) -> None:
    def build(out: Path, work: Path) -> None:
        os._exit(3)  # killed mid-training while holding the lock

    ArtifactStore(Path(root)).get_or_build("s", build)


def test_a_builder_that_dies_releases_the_lock(tmp_path):
    p = mp.get_context("fork").Process(target=_die_while_building, args=(str(tmp_path),))
    p.start()
    p.join(60)
    assert p.exitcode == 3
    art = ArtifactStore(tmp_path).get_or_build("s", lambda out, work: (out / "w").write_text("z") and None)
    assert art.built and (art.path / "w").read_text() == "z"
