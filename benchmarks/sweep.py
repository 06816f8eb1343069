"""Sweep throughput on Ray and the speed of an unchanged re-run (not collected by pytest).

    .venv/bin/python benchmarks/sweep.py [--n-samples 100] [--steps 5 10] [--out FILE.json]

Three runs of one digits suite, in one process, one after the other:

1. ``--executor ray --workers 1 --threads 1`` (fresh job store),
2. ``--executor ray --workers 2 --threads 1`` (another fresh job store),
3. run 2 again, unchanged: every job is found in the job store.

Throughput ratio = sweep seconds of run 1 / sweep seconds of run 2, where a run's sweep time
is from its first dispatched job to its last outcome (Ray start-up and actor start excluded,
the same for both; model loading inside the actors included). Re-run ratio = total seconds of
run 2 (Ray start-up included, as a user waits for it) / total seconds of run 3.

Control: the same ratio for plain processes, no Ray (a fixed torch matmul loop at one thread,
run alone, then two at once), measured before run 1 and after run 2. It is the most two
workers can gain on this machine at this moment: other processes on the cores take from the
2-worker run first. The load average is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from bench.runner import run_suite  # noqa: E402
from bench.suite import load_suite  # noqa: E402

SUITE = """
name: sweep-bench
description: digits teachers, three solvers, two guidance scales; the Ray throughput benchmark
seed: 0
n_samples: {n}
batch_size: {bs}
bootstrap: 20
models: [digits-unet, digits-dit]
methods: [ddim, euler, dpmpp_2m]
steps: {steps}
guidance: [1.0, 2.0]
metrics: [class_acc]
timing: {{warmup: 0}}
"""


BURN = "import time,torch;torch.set_num_threads(1);a=torch.randn(256,256);t=time.perf_counter();[a@a for _ in range(2000)];print(time.perf_counter()-t)"


def parallel_ceiling() -> float:
    """Throughput of two one-thread processes at once relative to one alone (2.0 on idle cores)."""

    def burn(n: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]

    alone = burn(1)[0]
    two = burn(2)
    return 2 * alone / max(two)


def session(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["sessions"][-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-samples", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10])
    p.add_argument("--out", help="write the measurements as JSON here too")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        path = Path(tmp) / "sweep-bench.yaml"
        path.write_text(SUITE.format(n=args.n_samples, bs=args.batch_size, steps=list(args.steps)))
        suite = load_suite(path)
        runs = {}
        load = {"before": os.getloadavg()}
        ceiling = [parallel_ceiling()]
        for name, workers, root in (("ray x1", 1, "r1"), ("ray x2", 2, "r2"), ("re-run of ray x2", 2, "r2")):
            t0 = time.perf_counter()
            out = run_suite(
                suite, name.replace(" ", "-"), Path(tmp) / root, progress=False, executor="ray", workers=workers, threads=1
            )
            wall = time.perf_counter() - t0
            s = session(out)
            df = pd.read_parquet(out / "results.parquet")
            runs[name] = {
                "jobs": len(df),
                "computed": s["computed"],
                "reused": s["reused"],
                "failed": s["failed"],
                "sweep_s": s["sweep_s"],
                "total_s": wall,
                "ray_startup_s": s["executor"].get("startup_s", 0.0),
                "jobs_per_s": s["computed"] / s["sweep_s"] if s["computed"] else None,
            }
            if name == "ray x2":
                ref = pd.read_parquet(Path(tmp) / "r1" / suite.name / "ray-x1" / "results.parquet").set_index("job_id")
                cols = ["nfe", "class_acc"]
                runs[name]["same_as_x1"] = bool(df.set_index("job_id").sort_index()[cols].equals(ref.sort_index()[cols]))
        load["after"] = os.getloadavg()
        ceiling.append(parallel_ceiling())
    x1, x2, rr = runs["ray x1"], runs["ray x2"], runs["re-run of ray x2"]
    result = {
        "runs": runs,
        "throughput_ratio_2_vs_1_workers": x1["sweep_s"] / x2["sweep_s"],
        "control_ratio_2_vs_1_processes": ceiling,
        "rerun_speedup_total": x2["total_s"] / rr["total_s"],
        "rerun_speedup_vs_sweep_only": x2["sweep_s"] / rr["total_s"],
        "cpu_count": os.cpu_count(),
        "load_average": load,
    }
    for name, r in runs.items():
        print(
            f"{name:18s} jobs {r['jobs']:3d} computed {r['computed']:3d} reused {r['reused']:3d}  "
            f"sweep {r['sweep_s']:7.2f} s  total {r['total_s']:7.2f} s  (Ray start-up {r['ray_startup_s']:.1f} s)"
        )
    print(f"throughput, 2 CPU workers vs 1: {result['throughput_ratio_2_vs_1_workers']:.2f}x (target >= 1.7x)")
    print(f"  control, 2 plain processes vs 1 on this machine now: before {ceiling[0]:.2f}x, after {ceiling[1]:.2f}x")
    print(
        f"unchanged re-run vs first run: {result['rerun_speedup_total']:.0f}x faster (total), "
        f"{result['rerun_speedup_vs_sweep_only']:.0f}x against the first run's sweep alone (target >= 50x)"
    )
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']} on {os.cpu_count()} cores")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
