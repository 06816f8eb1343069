"""bench.allocator side by side: thread CPU time of plain Euler sampling on a teacher with glibc's
malloc defaults and with bench's settings, in alternating fresh processes (not collected by pytest).

    .venv/bin/python benchmarks/allocator.py [--model moving-digits-dit] [--batch 16] [--steps 12] [--rounds 4]

Each process samples one batch twice (the first run warms up) with one intra-op thread and prints
the second run's thread CPU time (``time.thread_time``) and the spread of its per-call times. The
ratio default / bench > 1 is what the settings save.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time, torch
import methods
from bench.allocator import keep_freed_memory
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise
torch.set_num_threads(1)
applied = keep_freed_memory()
model, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
b = build_model(model)
seeds = range(batch)
x = noise(generators(0, seeds), b.sample_shape, b.dtype)
cond = torch.arange(batch) % b.num_classes if b.num_classes else None
calls = []
b.denoiser.net.register_forward_pre_hook(lambda m, a: calls.append(time.thread_time()))
b.denoiser.net.register_forward_hook(lambda m, a, o: calls.append(time.thread_time() - calls.pop()))
s = METHODS.get("euler")().prepare(b, steps)
for _ in range(2):
    calls.clear()
    t = time.thread_time()
    with torch.no_grad():
        s(x.clone(), cond, 2.0, generators(0, seeds))
    t = time.thread_time() - t
print(json.dumps({"applied": applied, "cpu_s": t, "calls_ms": [c * 1e3 for c in calls]}))
"""


def one(model: str, batch: int, steps: int, default: bool) -> dict:
    env = dict(os.environ, BENCH_MALLOC="default" if default else "bench")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(batch), str(steps)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="moving-digits-dit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args(argv)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for i in range(a.rounds):
        for default in (True, False) if i % 2 == 0 else (False, True):
            runs[default].append(one(a.model, a.batch, a.steps, default))
    print(f"{a.model}, batch {a.batch}, Euler {a.steps} steps, guidance 2, one thread, {a.rounds} processes each")
    print("malloc | settings applied | run thread CPU s (median) | per call ms: median [min, max]")
    for default in (True, False):
        calls = [c for r in runs[default] for c in r["calls_ms"]]
        print(
            f"{'glibc defaults' if default else 'bench.allocator'} | {runs[default][0]['applied']} | "
            f"{statistics.median(r['cpu_s'] for r in runs[default]):.2f} | "
            f"{statistics.median(calls):.0f} [{min(calls):.0f}, {max(calls):.0f}]"
        )
    ratio = statistics.median(r["cpu_s"] for r in runs[True]) / statistics.median(r["cpu_s"] for r in runs[False])
    print(f"defaults / bench: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
