"""Video samples through the harness (issue 15): clips (N, F, C, H, W) of the committed
moving-digits-dit run through `bench run` (runner, worker, job store), travel from worker to driver
as files, are scored by the registered video metrics (FVD-style distance, class adherence, motion
W1, jerk ratio: bootstrap intervals, a cached reference) and are shown in the report as frame
strips and animated GIFs for the same seeds across methods.

Fast: a few tiny jobs (6 clips, 2 and 4 steps) of the committed teacher; the metrics' own values
are checked on real clips, where the answer is known."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bench.metrics.base import MetricContext
from bench.metrics.video import REF_CLIPS, REFSET, SPACE, reference_stats
from bench.models import build_model
from bench.paths import ASSETS, REPO
from bench.registry import METRICS
from bench.report import build_report
from bench.report.clips import FRAME_MS, GAP, SCALE, SEEDS, clip_animation, frame_strip, is_clip
from bench.report.data import load_run
from bench.runner import INCOMING, run_suite
from bench.schema import SuiteError
from bench.store import samples_digest
from bench.suite import Job, ModelSpec, load_suite
from bench.video_data import FRAMES, VIDEO_SHAPE, moving_digits
from bench.worker import Task, execute, run_job

TINY = REPO / "tests" / "suites" / "video_tiny.yaml"
VIDEO_METRICS = ["fvd_digits", "video_class_acc", "motion_w1", "jerk_ratio"]

VIDEO_ASSETS_PRESENT = all((ASSETS / f"{n}.safetensors").is_file() for n in ("moving-digits-dit", "moving-digits-features"))
pytestmark = pytest.mark.skipif(not VIDEO_ASSETS_PRESENT, reason="bench/assets/moving-digits-*.safetensors not trained yet")


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def tiny_video_run(tmp: Path) -> Path:
    """The tiny video suite (euler and dpmpp_2m at 2 and 4 steps, 6 clips, guidance 2) run into
    ``tmp``; returns the run directory."""
    return run_suite(load_suite(TINY), run_id="tiny-video", results_dir=tmp / "results", progress=False)


@pytest.fixture(scope="module")
def video_run(tmp_path_factory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv("BENCH_HOME", str(tmp_path_factory.getbasetemp() / "home"))
    try:
        return tiny_video_run(tmp_path_factory.mktemp("video_run"))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def bundle():
    return build_model("moving-digits-dit")


# --- the run ---------------------------------------------------------------------------------


def test_video_suite_runs_end_to_end(video_run):
    df = pd.read_parquet(video_run / "results.parquet")
    assert len(df) == 4 and (df["status"] == "ok").all(), df.get("error")
    assert sorted(zip(df["method"], df["steps"], strict=True)) == [("dpmpp_2m", 2), ("dpmpp_2m", 4), ("euler", 2), ("euler", 4)]
    for _, r in df.iterrows():
        x = np.load(video_run / "jobs" / r["job_id"] / "samples.npy")
        assert x.shape == (6, *VIDEO_SHAPE) and x.dtype == np.float32 and np.isfinite(x).all()
        assert r["samples_sha256"] == samples_digest(x)
        assert r["nfe"] == r["steps"] and r["flops"] > 0 and r["latency_per_image_s"] > 0
        for m in VIDEO_METRICS:
            assert np.isfinite(r[m]) and r[f"{m}_ci_low"] <= r[m] <= r[f"{m}_ci_high"], m
        assert r["reference_set"] == REFSET
        assert r["reference_id"].startswith(f"{REFSET}/{SPACE}@")
    # more steps, closer to the data: the 4-step clips are nearer the held-out clips than the 2-step ones
    by = df.set_index(["method", "steps"])
    for m in ("euler", "dpmpp_2m"):
        assert by.loc[(m, 4), "fvd_digits"] < by.loc[(m, 2), "fvd_digits"]


def test_samples_travel_as_files_through_the_store(video_run):
    """The workers wrote the samples into the store's incoming/ directory; the driver moved each
    file into its store entry (the run's copy is a link to it) and cleared the session's files."""
    store = video_run.parent.parent / ".store"
    df = pd.read_parquet(video_run / "results.parquet")
    for _, r in df.iterrows():
        stored = store / "jobs" / r["store_key"] / "samples.npy"
        assert os.path.samefile(stored, video_run / "jobs" / r["job_id"] / "samples.npy")
    assert not any((store / INCOMING).rglob("*.npy"))


def test_worker_writes_samples_to_a_file_and_returns_its_path(tmp_path, bundle):
    from bench.worker import ModelCache

    suite = dataclasses.replace(load_suite(TINY), metrics=[])  # the run scores its clips; here only the files matter
    job = Job(ModelSpec("moving-digits-dit"), "euler", (), 2, 2.0, 0, 3, 3)
    models = ModelCache()
    models._m['["moving-digits-dit", {}]'] = bundle
    task = Task("j1", job, bundle.weights_hash, samples_dir=str(tmp_path / "incoming"))
    row, out = execute(models, task, suite, "cpu")
    assert isinstance(out, str) and Path(out).parent == tmp_path / "incoming"
    x = np.load(out)
    assert x.shape == (3, *VIDEO_SHAPE) and row["samples_sha256"] == samples_digest(x)
    # the same-seed reference samples reach the worker as a file too
    task2 = Task("j2", job, bundle.weights_hash, baseline=out, samples_dir=str(tmp_path / "incoming"))
    row2, out2 = execute(models, task2, suite, "cpu")
    assert np.array_equal(np.load(out2), x)  # same job, same seeds, same clips


def test_adopting_a_file_the_driver_cannot_see_names_the_fix(tmp_path):
    from bench.executors import ExecutorError
    from bench.runner import _adopt_samples
    from bench.store import JobStore

    with pytest.raises(ExecutorError, match="shares"):
        _adopt_samples(tmp_path / "nowhere.npy", JobStore(tmp_path / "store"), "k", "job1", {"status": "ok"})
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3), np.float32))
    with pytest.raises(ExecutorError, match="samples_sha256"):
        _adopt_samples(bad, JobStore(tmp_path / "store"), "k", "job1", {"status": "ok", "samples_sha256": "0" * 64})


def test_per_sample_seeds_give_the_same_clips_at_any_batch_size(bundle):
    """Clip k starts from the noise of seed k whatever the batch; the clips agree to float32
    rounding of the batched matmuls (CPU kernels split batches differently)."""
    suite = dataclasses.replace(load_suite(TINY), metrics=[])
    rows, xs = [], []
    for bs in (2, 6):
        row, x = run_job(Job(ModelSpec("moving-digits-dit"), "dpmpp_2m", (), 3, 2.0, 0, 6, bs), bundle, suite)
        rows.append(row)
        xs.append(x)
    for x in xs[1:]:
        assert (x - xs[0]).abs().max() <= 1e-4 * xs[0].abs().max()
    # and another seed gives other clips
    _, other = run_job(Job(ModelSpec("moving-digits-dit"), "dpmpp_2m", (), 3, 2.0, 1, 2, 2), bundle, suite)
    assert (other - xs[0][:2]).abs().max() > 0.5


# --- the metrics -----------------------------------------------------------------------------


def _ctx(bundle, clips: torch.Tensor, labels: torch.Tensor | None, bootstrap: int = 20) -> MetricContext:
    return MetricContext(clips, labels, bundle, bootstrap=bootstrap, seed=0)


def test_video_metrics_are_registered_as_video_metrics():
    for m in VIDEO_METRICS:
        meta = METRICS.entry(m).meta
        assert meta["data"] == "video", m
    assert METRICS.entry("video_class_acc").meta["higher_is_better"]
    assert not any(METRICS.entry(m).meta["higher_is_better"] for m in ("fvd_digits", "motion_w1", "jerk_ratio"))


def test_video_metrics_on_real_clips_say_what_real_clips_are(bundle):
    """Real held-out clips (another seed than the reference's): FVD near real-vs-real, speeds
    like the data's, jerk ratio near 1, the classifier names their digits; clips with their frames
    frozen or shuffled are far worse on the metric made to see it."""
    real = moving_digits("heldout", 200, seed=7)
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([c[torch.randperm(FRAMES, generator=g)] for c in real.clips])
    frozen = real.clips[:, :1].repeat(1, FRAMES, 1, 1, 1)
    v = {name: METRICS.get(name)(_ctx(bundle, real.clips, real.labels)) for name in VIDEO_METRICS}
    for name, mv in v.items():
        assert mv.ci_low <= mv.value <= mv.ci_high, name
    assert v["video_class_acc"].value >= 0.9
    assert v["motion_w1"].value < 0.15
    assert 0.7 < v["jerk_ratio"].value < 1.3
    fvd_shuffled = METRICS.get("fvd_digits")(_ctx(bundle, shuffled, real.labels)).value
    fvd_frozen = METRICS.get("fvd_digits")(_ctx(bundle, frozen, real.labels)).value
    assert min(fvd_shuffled, fvd_frozen) > 3 * v["fvd_digits"].value
    assert METRICS.get("motion_w1")(_ctx(bundle, frozen, real.labels)).value > 1.0  # frozen: speed 0 vs ~1.4 px/frame
    assert METRICS.get("jerk_ratio")(_ctx(bundle, shuffled, real.labels)).value > 2.0  # shuffled frames jump about
    assert METRICS.get("video_class_acc")(_ctx(bundle, real.clips, (real.labels + 1) % 10)).value < 0.2


def test_reference_features_are_cached_and_rebuilt_for_other_weights(bundle, tmp_path, monkeypatch):
    from bench.metrics import refs

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    path = refs.cache_path(REFSET, SPACE)
    assert not path.exists()
    ref = reference_stats()
    assert path.is_file() and len(ref.feats) == REF_CLIPS and ref.feats.shape[1] == 64
    meta = refs.load(REFSET, SPACE).meta
    assert meta["network_id"] == refs.SPACES[SPACE].network_id() and meta["n"] == REF_CLIPS
    mtime = path.stat().st_mtime_ns
    assert np.array_equal(reference_stats().feats, ref.feats) and path.stat().st_mtime_ns == mtime  # read, not rebuilt
    import json

    rec = path.with_suffix(".json")
    rec.write_text(json.dumps(json.loads(rec.read_text()) | {"network_id": "another-network"}))
    again = reference_stats()  # made by other weights: rebuilt, the same features
    assert np.allclose(again.feats, ref.feats) and refs.load(REFSET, SPACE).meta["network_id"] != "another-network"
    assert any(r.get("refset") == REFSET and r.get("space") == SPACE for r in refs.listing())


def test_video_metrics_on_a_non_video_model_name_the_fix(tmp_path):
    img = build_model("digits-dit")
    ctx = MetricContext(torch.zeros(4, 1, 16, 16), torch.arange(4), img)
    for m in VIDEO_METRICS:
        with pytest.raises(ValueError, match=r"moving-digits clips .*digits-dit makes image samples"):
            METRICS.get(m)(ctx)
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("models: [moving-digits-dit]", "models: [digits-dit]"))
    with pytest.raises(SuiteError, match="'fvd_digits' measures video data but models\\[0\\] \\(digits-dit\\) makes image"):
        load_suite(bad)


# --- the report ------------------------------------------------------------------------------


def test_frame_strip_and_animation_show_the_clips(tmp_path):
    clips = moving_digits("heldout", 5, seed=0).clips.numpy()
    assert is_clip(clips) and not is_clip(clips[:, 0]) and not is_clip(None)
    strip = Image.open(frame_strip(clips, tmp_path / "s.png", seeds=3))
    h = w = 16
    assert strip.size == (SCALE * (FRAMES * (w + GAP) - GAP), SCALE * (3 * (h + GAP) - GAP))
    a = np.asarray(strip)
    u8 = np.round((clips + 1) * 127.5).astype(np.uint8)
    for i in range(3):  # row i, frame j is clip i's frame j, enlarged
        for j in range(FRAMES):
            y, x = SCALE * i * (h + GAP), SCALE * j * (w + GAP)
            assert np.array_equal(a[y : y + SCALE * h : SCALE, x : x + SCALE * w : SCALE], u8[i, j, 0])
    gif = Image.open(clip_animation(clips, tmp_path / "a.gif", seeds=3))
    assert gif.n_frames == FRAMES and gif.info["loop"] == 0 and gif.info["duration"] == FRAME_MS
    # a frozen clip still animates F frames (the frame bar moves)
    assert Image.open(clip_animation(clips[:, :1].repeat(FRAMES, 1), tmp_path / "f.gif")).n_frames == FRAMES
    with pytest.raises(ValueError, match=r"\(N, F, C, H, W\)"):
        frame_strip(clips[:, 0], tmp_path / "x.png")


def test_report_shows_the_same_seeds_across_methods(video_run, tmp_path):
    rep = build_report(video_run, out=tmp_path / "rep")
    run = load_run(video_run)
    strips = sorted(rep.dir.glob("clip_*.png"))
    gifs = sorted(rep.dir.glob("clip_*.gif"))
    assert len(strips) == len(gifs) == 4
    html = rep.index.read_text()
    assert html.count("data:image/gif;base64,") == 4 and html.count('alt="frame strip of ') == 4
    assert "seeds 0-3" in html and "grid_" not in " ".join(p.name for p in rep.dir.iterdir())
    # each strip's rows are seeds 0..3 of its own job: the same seeds in every configuration
    for _, r in run.ok.iterrows():
        name = f"clip_moving-digits-dit_w2_{r['method']}_{int(r['steps'])}.png"
        a = np.asarray(Image.open(rep.dir / name))
        x = run.samples(r["job_id"])[:SEEDS]
        u8 = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
        for i in range(SEEDS):
            y = SCALE * i * (16 + GAP)
            assert np.array_equal(a[y : y + SCALE * 16 : SCALE, : SCALE * 16 : SCALE], u8[i, 0, 0])
        assert Image.open(rep.dir / name.replace(".png", ".gif")).n_frames == FRAMES
    lb = (rep.dir / "leaderboard.md").read_text()
    assert all(m in lb for m in VIDEO_METRICS)
    assert (rep.dir / "pareto_moving-digits-dit.png").is_file()
