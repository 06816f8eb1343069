"""DPM-Solver++(3M), official against Taylor-consistent second-difference weight, on the exact mixture.

For each gmm model (VP eps, rectified flow), schedule (uniform, karras, ays) and NFE (5-25), the
registered ``dpmpp_3m`` is run with ``third_order: official`` (the default) and ``consistent`` from
the solvers suite's noise (seed 0, 128 samples), and scored against the exact PF-ODE endpoint of the
state it started from: exact_mse (mean squared error per dimension, the suites' metric) and RMS
(its square root). Prints the markdown section of reports/solvers.md.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python scripts/dpmpp_3m_variants.py
"""

from __future__ import annotations

import torch

from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise

NFES = (5, 6, 8, 10, 15, 20, 25)
SCHEDULES = ("uniform", "karras", "ays")
VARIANTS = ("official", "consistent")
N = 128


def main() -> None:
    torch.set_num_threads(1)
    import methods.solvers  # noqa: F401  (registers the solvers)

    for prediction in ("eps", "flow"):
        b = build_model("gmm", dim=2, prediction=prediction)
        gens = generators(0, range(N))
        x = noise(gens, (2,), torch.float64)
        exact: dict[float, torch.Tensor] = {}
        print(f"\n### gmm[dim=2,prediction={prediction}]\n")
        print("exact_mse (RMS in brackets); the better of the two in bold\n")
        print("| schedule | variant | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
        print("|---|---|" + "---|" * len(NFES))
        for sched in SCHEDULES:
            rows: dict[str, list[float]] = {}
            for var in VARIANTS:
                errs = []
                for n in NFES:
                    adapter = METHODS.get("dpmpp_3m")(schedule=sched, third_order=var)
                    out = adapter.prepare(b, n)(x.clone(), None, 1.0, gens)
                    t0 = float(adapter.grid.t[0])
                    if t0 not in exact:
                        exact[t0] = b.extra["mixture"].ode_endpoint(x, b.denoiser.schedule, t0)
                    errs.append(float(((out - exact[t0]) ** 2).mean()))
                rows[var] = errs
            for var in VARIANTS:
                other = rows[VARIANTS[1 - VARIANTS.index(var)]]
                cells = []
                for e, o in zip(rows[var], other, strict=True):
                    c = f"{e:.3g} ({e**0.5:.3g})"
                    cells.append(f"**{c}**" if e < o else c)
                print(f"| {sched} | {var} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
