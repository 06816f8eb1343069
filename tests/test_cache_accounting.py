"""Caching accounting in result rows: blocks computed, FLOPs actually spent, and the report's
FLOPs-implied against measured speedups."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from helpers import job, random_bundle, tiny_suite

import methods.caching  # noqa: F401  (registers the caches)
import methods.solvers  # noqa: F401
from bench.accounting import UNIT_COLUMNS, cache_units, units_of
from bench.registry import METHODS
from bench.report.cache_speedups import cache_speedups, cache_speedups_markdown
from bench.report.matched import ReferenceSpec
from bench.runner import run_suite
from bench.suite import load_suite
from bench.worker import run_job

SUITE = """
n_samples: 2
batch_size: 2
bootstrap: 5
models: [digits-dit]
methods:
  - euler
  - {name: delta_dit, knobs: {interval: [2]}}
  - {name: block_caching, knobs: {threshold: [1.0]}}
  - {name: fora, knobs: {interval: [3]}}
steps: [4]
guidance: [2.0]
metrics: [psnr]
reference:
  - {model: digits-dit, method: euler, steps: 4, guidance: 2.0}
timing:
  warmup: 0
"""


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


def test_units_of_counts_and_is_nan_without_units():
    b = random_bundle("flow")
    assert cache_units(METHODS.get("euler")(), b.denoiser.net) == {}
    assert all(math.isnan(v) for v in units_of({}, lambda: None).values())
    ad = METHODS.get("delta_dit")(interval=2, span=3)
    units = cache_units(ad, b.denoiser.net)
    assert len(units) == 6  # the digits DiT's 2 double + 4 single blocks
    sampler = ad.prepare(b, 4)
    from bench.seeds import generators, noise

    g = generators(0, range(1))
    z = noise(g, b.sample_shape, b.dtype)
    got = units_of(units, lambda: sampler(z, None, 1.0, g))
    # calls 0, 1 (rear stage: 1 cached) and 2, 3 (front stage: 3 cached): 3 of 6 blocks skipped twice
    assert got == {"units_called": 24.0, "units_computed": 18.0, "units_fraction": 0.75}


def test_run_job_rows_have_units_and_cached_flops_below_uncached():
    b = random_bundle("flow")
    suite = tiny_suite()
    rows = {m: run_job(job(m, 4, 2.0, 1, 1, knobs=k), b, suite)[0] for m, k in
            [("euler", ()), ("delta_dit", (("interval", 2),)), ("block_caching", (("threshold", 0.5),))]}  # fmt: skip
    assert all(math.isnan(rows["euler"][c]) for c in UNIT_COLUMNS)
    for m in ("delta_dit", "block_caching"):
        r = rows[m]
        assert r["units_computed"] < r["units_called"] and r["units_fraction"] == r["units_computed"] / r["units_called"]
        assert r["flops"] < rows["euler"]["flops"], m  # FLOPs actually spent, with the cache's hooks installed
        assert r["nfe"] == rows["euler"]["nfe"]  # a cache skips blocks, not network calls
    assert rows["block_caching"]["training"] == "calibration" and rows["block_caching"]["train_cost_s"] > 0
    assert rows["delta_dit"]["train_cost_s"] == 0


def test_tiny_caching_suite_rows_and_report_speedups(tmp_path):
    p = tmp_path / "cache.yaml"
    p.write_text(SUITE)
    run = run_suite(load_suite(p), "a", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet")
    assert (df["status"] == "ok").all() and len(df) == 4
    for c in UNIT_COLUMNS:
        assert c in df.columns
    ref = df[df["method"] == "euler"].iloc[0]
    assert pd.isna(ref["units_fraction"])
    cached = df[df["family"] == "caching"]
    assert (cached["units_fraction"] < 1).all() and (cached["flops"] < ref["flops"]).all()
    sp = cache_speedups(df, [ReferenceSpec.from_mapping({"model": "digits-dit", "method": "euler", "steps": 4, "guidance": 2.0})])
    assert len(sp) == 3 and (sp["speedup_flops_implied"] > 1).all()
    for _, r in sp.iterrows():
        row = cached[cached["method"] == r["configuration"].split("[")[0].split(" ")[0]].iloc[0]
        assert r["speedup_flops_implied"] == pytest.approx(ref["flops"] / row["flops"])
        assert r["speedup_measured"] == pytest.approx(ref["latency_per_image_s"] / row["latency_per_image_s"])
    assert "speedup (FLOPs)" in cache_speedups_markdown(sp)
    # no reference at the cache's solver/steps: no row
    assert cache_speedups(df, [ReferenceSpec(method="euler", steps=8)]).empty


def test_report_has_the_caching_table(tmp_path):
    from bench.report.build import build_report

    p = tmp_path / "cache.yaml"
    p.write_text(
        SUITE.replace("  - {name: block_caching, knobs: {threshold: [1.0]}}\n  - {name: fora, knobs: {interval: [3]}}\n", "")
    )
    run = run_suite(load_suite(p), "a", tmp_path / "res", progress=False)
    rep = build_report(run, out=tmp_path / "rep")
    html = rep.index.read_text()
    assert 'id="caching"' in html and "speedup (measured)" in html
    assert (rep.dir / "cache_speedups.md").is_file()
