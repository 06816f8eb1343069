"""Build time of GS, GAS and LD3 at their default knobs on the digits teachers (one (model, NFE) each),
in a fresh artifact store: the shared teacher pairs first, then each solver. Prints one line per build
with its wall and CPU seconds (one thread: CPU seconds are the wall time on an idle core; on a shared,
loaded machine the wall time is several times more).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python scripts/gs_ld3_build_times.py digits-unet digits-dit --steps 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", type=int, nargs="+", default=[4])
    ap.add_argument("--methods", nargs="+", default=["gs", "gas", "ld3"])
    ap.add_argument("--guidance", type=float, default=1.0)
    args = ap.parse_args()
    os.environ.setdefault("BENCH_HOME", tempfile.mkdtemp(prefix="bench-budget-"))
    torch.set_num_threads(1)
    import methods.learned_solvers.gs  # noqa: F401
    import methods.learned_solvers.ld3  # noqa: F401
    import methods.solvers  # noqa: F401
    from bench.models import build_model
    from bench.registry import METHODS

    for name in args.models:
        bundle = build_model(name)
        for steps in args.steps:
            for method in args.methods:
                t0, c0 = time.perf_counter(), time.process_time()
                prepared = METHODS.get(method)().prepare(bundle, steps, guidance=args.guidance)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                recs = {a.record["name"]: a for a in prepared.artifacts}
                solver = recs["solver"]
                own = solver.cost
                print(
                    f"{name} {method} steps={steps}: prepare {wall:.1f} s wall, {cpu:.1f} s CPU; solver build {own.get('wall_s', 0):.1f} s "
                    f"({own.get('optimizer_steps')} optimiser steps, {own.get('teacher_rows')} teacher rows), "
                    f"chain {solver.chain_cost.get('wall_s', 0):.1f} s; loss {own.get('first_loss', float('nan')):.4g} -> "
                    f"{own.get('final_loss', float('nan')):.4g}; learned params {prepared.info['learned_params']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
