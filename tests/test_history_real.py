"""``bench history quick`` over three real runs of a slice of the quick suite (acceptance 2 of issue 17).

The slice (digits-unet; DDIM and Euler at 2 and 4 steps; 20 samples in two timed batches) is run three times with
``--fresh`` (every job sampled and timed again, none taken from the job store); each run is then
given a fake commit in its run.json, as if made on three successive commits. ``bench history``
must read them as one cohort over three commits, and its page must open in headless Chromium
with every image loaded and no console error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from history_helpers import fake_commit

from bench.cli import main
from bench.history.db import open_db
from bench.report.browser import INSTALL_HINT, check_page, find_chromium

SLICE = """name: quick
description: a slice of the quick suite for the history test
seed: 0
n_samples: 20
batch_size: 10
bootstrap: 10
models: [digits-unet]
methods: [ddim, euler]
steps: [2, 4]
guidance: [1.0]
metrics: [fid]
timing:
  warmup: 1
"""
REQUIRED = os.environ.get("BENCH_REQUIRE_BROWSER") == "1"


def _set_commit(run_dir: Path, commit: str) -> None:
    rec = json.loads((run_dir / "run.json").read_text())
    rec["git_sha"] = commit
    (run_dir / "run.json").write_text(json.dumps(rec))
    df = pd.read_parquet(run_dir / "results.parquet")
    df["git_sha"] = commit
    df.to_parquet(run_dir / "results.parquet", index=False)


@pytest.mark.skipif(find_chromium() is None and not REQUIRED, reason=f"the page check needs Chromium: {INSTALL_HINT}")
def test_history_of_three_real_quick_runs(tmp_path: Path, capsys):
    suite = tmp_path / "quick-slice.yaml"
    suite.write_text(SLICE)
    results = tmp_path / "results"
    commits = [fake_commit(100 + i) for i in range(3)]
    for i, c in enumerate(commits):
        rc = main(["run", str(suite), "--results", str(results), "--run-id", f"r{i}", "--fresh", "--no-progress"])
        assert rc == 0
        _set_commit(results / "quick" / f"r{i}", c)
        side = json.loads((results / "quick" / f"r{i}" / "cohort.json").read_text())
        assert len(side["weights"]["digits-unet"]) >= 12 and set(side["metric_code"]) == {"fid"} and side["harness_code"]
    capsys.readouterr()
    out = tmp_path / "page"
    rc = main(["history", "quick", "--results", str(results), "--out", str(out), "--screenshot"])
    text = capsys.readouterr().out
    print(text)
    assert rc in (0, 1)  # a real latency swing on a busy machine may be flagged; the page is what is checked
    assert "quick (3 commits, 4 configurations)" in text
    db = open_db(results)
    try:
        runs = db.sql("SELECT run_id, git_sha FROM runs ORDER BY started, run_id")
        assert runs["git_sha"].tolist() == commits
        cohorts = db.sql("SELECT DISTINCT cohort FROM cohorts")
        assert len(cohorts) == 1  # same suite, machine, code: one cohort
        n = db.sql("SELECT count(*) AS n FROM history WHERE suite = 'quick' AND status = 'ok'")["n"].iloc[0]
        assert n == 12
    finally:
        db.close()
    assert "0 CALIBRATION_NEEDED" in text  # by the third run each configuration has a baseline in its cohort
    check = check_page(out / "index.html", out / "shot.png")
    assert check.ok, check.summary()
    assert len(check.images) == 4 and not check.broken_images and not check.console_errors
    assert all(i["width"] > 100 for i in check.images)
