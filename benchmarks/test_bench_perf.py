"""bench's performance benchmarks under pytest-benchmark (see conftest.py for how to run and import them).

- CLI start: `bench --help` and `bench list methods` (the catalogue warm), seconds, 5 rounds each;
- harness overhead: harness / bare time of the same sampler call, paired (overhead.py);
- KID bootstrap: kernel-sum / clean-fid time of the same KID resamples (kid_bootstrap.py);
- cache wall / FLOPs: FLOPs-implied / time-implied speedup of a cache computing half the blocks of
  the digits DiT (cache_profile.py; 1 = the clock delivers what the FLOPs promise);
- video cache speedup: measured / FLOPs-implied speedup of four video caches on moving-digits-dit,
  uncached and cached runs in alternation (cache_speedup.py; 1 = the clock delivers what the FLOPs promise);
- Ray scaling: sweep seconds with 2 Ray workers / with 1 (sweep.py's suite, smaller; 0.5 is ideal);
- warm-up batch: latency after a 16-sample warm-up / after a full-batch one, fresh processes, paired
  (warmup_batch.py; 1 = the small warm-up leaves nothing cold);
- demo time: `make demo`'s two commands (bench run quick, bench report) into a fresh results root
  (no job store hits), seconds, one round. The longest by far (minutes): `-k "not demo"` skips it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, "-m", "bench.cli"]


def _wall(argv: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


@pytest.mark.parametrize("command", [["--help"], ["list", "methods"]], ids=["help", "list-methods"])
def test_cli_start(benchmark, command):
    _wall(BENCH + command)  # writes the catalogue if it is cold (an edited method): the first call after an edit
    times = []
    benchmark.pedantic(lambda: times.append(_wall(BENCH + command)), rounds=5, iterations=1)
    benchmark.extra_info["bench_value"] = statistics.median(times)
    benchmark.extra_info["target_s"] = 2.0


def test_harness_overhead(benchmark):
    import overhead
    import torch

    torch.set_num_threads(1)
    res = benchmark.pedantic(lambda: overhead.overhead(11, 5, 16, 2.0, "ddim"), rounds=1, iterations=1)
    benchmark.extra_info["bench_value"] = res["median_of_paired_ratios"]
    benchmark.extra_info["bench_value_ci"] = res["median_of_paired_ratios_ci95"]
    benchmark.extra_info["target"] = 1.02


def test_kid_bootstrap(benchmark):
    import kid_bootstrap

    res = benchmark.pedantic(lambda: kid_bootstrap.compare(300, 20, 20, 2), rounds=1, iterations=1)
    benchmark.extra_info["bench_value"] = statistics.median(f / s for s, f in zip(res["slow_s"], res["fast_s"], strict=True))
    benchmark.extra_info["largest_rel_diff"] = res["largest_rel_diff"]
    assert res["largest_rel_diff"] < 1e-6


def test_cache_wall_vs_flops(benchmark):
    import cache_profile

    res = benchmark.pedantic(lambda: cache_profile.profile("digits-dit", 128, 2.0, 9), rounds=1, iterations=1)
    by_flops, by_time = cache_profile.speedups(res["time_in"], res["flops_in"], 0.5)
    benchmark.extra_info["bench_value"] = by_flops / by_time
    benchmark.extra_info.update(time_in_blocks=res["time_in"], flops_in_blocks=res["flops_in"])


@pytest.mark.parametrize("cache", ["first_block_cache:threshold=0.3", "teacache:threshold=0.3", "taylorseer", "pab"])
def test_video_cache_speedup(benchmark, cache):
    """Measured / FLOPs-implied speedup of a video cache on moving-digits-dit, side by side
    (cache_speedup.py); the history tracks the ratio (1 = the clock delivers what the FLOPs promise)."""
    import cache_speedup

    (res,) = benchmark.pedantic(
        lambda: cache_speedup.measure("moving-digits-dit", [cache], 16, 12, 2.0, 4), rounds=1, iterations=1
    )
    benchmark.extra_info["bench_value"] = res["ratio"]
    benchmark.extra_info.update(implied=res["implied"], measured=res["measured"], units=res["units"])
    assert res["units"] < 1 and res["implied"] > 1


def test_ray_scaling(benchmark):
    pytest.importorskip("ray")
    import sweep

    from bench.runner import run_suite
    from bench.suite import load_suite

    def run() -> dict:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            path = Path(tmp) / "sweep-bench.yaml"
            path.write_text(sweep.SUITE.format(n=40, bs=20, steps=[5]))
            suite = load_suite(path)
            out = {}
            for workers in (1, 2):
                run_dir = run_suite(suite, f"x{workers}", Path(tmp) / f"r{workers}", progress=False, executor="ray",
                                    workers=workers, threads=1)  # fmt: skip
                out[workers] = sweep.session(run_dir)["sweep_s"]
            return out

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["bench_value"] = res[2] / res[1]
    benchmark.extra_info.update(sweep_s_1_worker=res[1], sweep_s_2_workers=res[2], load_average=list(os.getloadavg()))


def test_demo_time(benchmark):
    """`make demo` as the Makefile runs it, into a fresh results root: nothing reused from a job store."""

    def demo() -> dict:
        with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
            t0 = time.perf_counter()
            run_s = _wall(BENCH + ["run", "quick", "--run-id", "demo", "--results", tmp, "--no-progress"])
            report_s = _wall(BENCH + ["report", str(Path(tmp) / "quick" / "demo"), "--out", str(Path(tmp) / "report")])
            return {"run_s": run_s, "report_s": report_s, "total_s": time.perf_counter() - t0}

    res = benchmark.pedantic(demo, rounds=1, iterations=1)
    benchmark.extra_info["bench_value"] = res["total_s"]
    benchmark.extra_info.update(res, target_s=240.0, load_average=list(os.getloadavg()))


def test_warmup_batch(benchmark):
    """latency after a 16-sample warm-up / after a full-batch one (the quick suite's timing.warmup_batch)."""
    import warmup_batch

    res = benchmark.pedantic(lambda: warmup_batch.compare(3, 16, 150, 2), rounds=1, iterations=1)
    benchmark.extra_info["bench_value"] = res["median_ratio"]
    benchmark.extra_info.update(configs=res["configs"], target=1.0, load_average=list(os.getloadavg()))
