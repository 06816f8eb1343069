"""A whole suite on both executors: the same quality metrics, NFE and samples? (not collected by pytest)

    .venv/bin/python benchmarks/ray_vs_local.py [--suite quick] [--workers 2] [--out DIR]

Runs SUITE with ``--executor local --threads 1`` and with ``--executor ray --workers N
--threads 1`` (a local Ray started and stopped by bench), each into a fresh results directory
(no job store hits), then compares every job: the metric values and their CI columns, NFE,
network calls and FLOPs exactly (``==``), and each job's samples bitwise. Both at one torch/BLAS
thread per worker: CPU kernels split work by thread count, which moves float sums by ~1e-7.
Prints one line per job and a verdict; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.runner import run_suite  # noqa: E402
from bench.suite import load_suite  # noqa: E402

EXACT = ["nfe", "network_calls", "flops", "n_samples", "seed", "status"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default: a temporary one)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="ray-vs-local-"))
    suite = load_suite(args.suite)
    runs, walls = {}, {}
    for name, kw in (("local", {"executor": "local"}), ("ray", {"executor": "ray", "workers": args.workers})):
        t0 = time.perf_counter()
        runs[name] = run_suite(suite, name, out / name, progress=True, threads=1, **kw)
        walls[name] = time.perf_counter() - t0
    a = pd.read_parquet(runs["local"] / "results.parquet").set_index("job_id").sort_index()
    b = pd.read_parquet(runs["ray"] / "results.parquet").set_index("job_id").sort_index()
    metrics = [m for m in suite.metrics if m in a.columns]
    cols = EXACT + metrics + [f"{m}_ci_{s}" for m in metrics for s in ("low", "high") if f"{m}_ci_{s}" in a.columns]
    bad = []
    if not a.index.equals(b.index):
        bad.append(f"different jobs: {sorted(set(a.index) ^ set(b.index))}")
    for j in a.index.intersection(b.index):
        diff = [c for c in cols if not (a.at[j, c] == b.at[j, c] or (pd.isna(a.at[j, c]) and pd.isna(b.at[j, c])))]
        same_x = np.array_equal(
            np.load(runs["local"] / "jobs" / j / "samples.npy"), np.load(runs["ray"] / "jobs" / j / "samples.npy")
        )
        r = a.loc[j]
        label = f"{r['model']:<12} {r['method']:<10} {int(r['steps']):>3} steps w={r['guidance']:g}"
        vals = " ".join(f"{m}={r[m]:.4g}" for m in metrics)
        print(f"{j}  {label}  nfe={r['nfe']:g} {vals}  columns {'equal' if not diff else 'DIFFER: ' + ','.join(diff)}"
              f"  samples {'bitwise equal' if same_x else 'DIFFER'}")  # fmt: skip
        if diff or not same_x:
            bad.append(j)
    print(f"\n{len(a)} jobs; compared columns: {', '.join(cols)}")
    print(f"wall: local {walls['local']:.0f} s, ray x{args.workers} {walls['ray']:.0f} s; results under {out}")
    print("VERDICT: " + ("identical" if not bad else f"{len(bad)} jobs differ: {bad}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
