"""pytest-benchmark's saved JSON joins the results history (bench.history.benchmarks): a slower
benchmark over commits is a REGRESSION with its step named, as a worse FID is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.cli import main
from bench.history.benchmarks import BENCH_METRIC, benchmark_rows, import_benchmarks

BENCH_FILE = """
def test_ratio(benchmark):
    benchmark.extra_info["bench_value"] = 1.01
    benchmark.extra_info["bench_value_ci"] = [1.0, 1.02]
    benchmark(sum, range(100))


def test_plain(benchmark):
    benchmark(sorted, range(100))
"""


def real_benchmark_json(tmp: Path) -> dict:
    """A file saved by pytest-benchmark itself (two benchmarks, one with a ratio in extra_info)."""
    (tmp / "test_tiny_bench.py").write_text(BENCH_FILE)
    out = tmp / "saved.json"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp / "test_tiny_bench.py"),
         f"--benchmark-json={out}", "--benchmark-min-rounds=5", "--benchmark-max-time=0.01", "--rootdir", str(tmp)],
        capture_output=True, text=True, cwd=tmp, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_benchmark_json_joins_the_history(tmp_path: Path, capsys):
    saved = real_benchmark_json(tmp_path)
    rows = {r["method"]: r for r in benchmark_rows(saved)}
    assert set(rows) == {"test_ratio", "test_plain"}
    assert rows["test_ratio"][BENCH_METRIC] == 1.01 and rows["test_ratio"][f"{BENCH_METRIC}_ci_high"] == 1.02
    plain = next(b for b in saved["benchmarks"] if b["name"] == "test_plain")
    assert rows["test_plain"]["latency_per_image_s"] == plain["stats"]["median"] == rows["test_plain"][BENCH_METRIC]

    # 12 commits: test_plain's time steps up 1.8x at commit 8 (a slower harness), test_ratio's ratio
    # steps up at commit 9; noise of a few percent on both
    rng = np.random.default_rng(0)
    store = tmp_path / "saved"
    store.mkdir()
    for i in range(12):
        d = json.loads(json.dumps(saved))
        d["commit_info"]["id"] = f"{i:02d}" + "c0ffee" * 6
        d["datetime"] = f"2026-01-{i + 1:02d}T00:00:00.000000+00:00"
        for b in d["benchmarks"]:
            noise = 1 + 0.02 * rng.standard_normal()
            if b["name"] == "test_plain":
                scale = (1.8 if i >= 8 else 1.0) * noise
                for k in ("median", "iqr", "mean", "min", "max"):
                    b["stats"][k] *= scale
            else:
                v = (1.3 if i >= 9 else 1.01) * noise
                b["extra_info"]["bench_value"] = v
                b["extra_info"]["bench_value_ci"] = [v - 0.01, v + 0.01]
        (store / f"{i:04d}_bench.json").write_text(json.dumps(d))
    results = tmp_path / "results"
    argv = ["history", "benchmarks", "--results", str(results), "--import", str(store), "--out", str(tmp_path / "h")]
    assert main(argv + ["--no-page"]) == 1  # a regression: exit 1, for CI
    out = capsys.readouterr().out
    assert "imported 12 benchmark run(s)" in out
    line = {m: next(x for x in out.splitlines() if f"| {m} " in x) for m in ("test_plain", "test_ratio")}
    # each step is found and named by its first commit; the ratio's, in the latest runs, is a REGRESSION
    assert "latency" in line["test_plain"] and "from commit 08c0ffee" in line["test_plain"]
    assert "from commit 09c0ffee" in line["test_ratio"] and "| REGRESSION |" in line["test_ratio"]
    assert "| PASS |" in line["test_plain"]  # its rolling baseline has caught up with the step
    # a commit whose harness is slower again: a latency REGRESSION against the rolling baseline
    d = json.loads((store / "0011_bench.json").read_text())
    d["commit_info"]["id"], d["datetime"] = "12" + "c0ffee" * 6, "2026-01-13T00:00:00.000000+00:00"
    for b in d["benchmarks"]:
        if b["name"] == "test_plain":
            b["stats"]["median"] *= 2
    (store / "0012_bench.json").write_text(json.dumps(d))
    assert main(argv) == 1
    page = (tmp_path / "h" / "index.html").read_text()
    assert "bench_value latest" in page and "test_plain" in page and "REGRESSION" in page
    out = capsys.readouterr().out
    assert "imported 1 benchmark run(s)" in out
    plain = next(x for x in out.splitlines() if "| test_plain " in x)
    assert "| REGRESSION |" in plain and "latency" in plain.split("| REGRESSION |")[1]
    # importing the same files again adds nothing; the database holds 13 runs of the suite
    assert import_benchmarks([store], results) == []
    assert main(["history", "benchmarks", "--results", str(results), "--sql", "SELECT count(*) AS n FROM runs"]) == 0
    assert capsys.readouterr().out.split()[-1] == "13"
    # a file that is not pytest-benchmark's is bad input
    (tmp_path / "bad.json").write_text("{}")
    assert main(["history", "benchmarks", "--results", str(results), "--import", str(tmp_path / "bad.json")]) == 2
