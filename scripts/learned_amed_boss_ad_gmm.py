"""exact_mse of AMED-Solver, AMED-Plugin, BOSS and AutoDiffusion against their base solvers on the exact mixture.

Held-out evaluation seeds (suite seed 0, samples 0..n-1; training uses LEARNED_SEED), default knobs,
a fresh artifact store. Prints one line per (prediction, NFE, method): the learned solver's exact_mse,
its base's, the ratio, and the 95% CI of the paired per-sample difference. Run:

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python scripts/learned_amed_boss_ad_gmm.py [--nfe 4] [--n 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

PAIRS = {  # learned solver -> its base as users run it (same schedule, same NFE)
    "amed_solver": ("dpm_solver", {"order": 2, "budget": "nfe", "schedule": "karras"}),
    "amed_plugin": ("ipndm", {"schedule": "karras"}),
    "boss": ("euler", {"schedule": "uniform"}),
    "autodiffusion": ("dpmpp_2m", {"schedule": "uniform"}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nfe", type=int, nargs="+", default=[4])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--predictions", nargs="+", default=["eps", "flow"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("BENCH_HOME", tempfile.mkdtemp(prefix="bench-learned-"))
    import methods.learned_solvers.amed  # noqa: F401
    import methods.learned_solvers.autodiffusion  # noqa: F401
    import methods.learned_solvers.boss  # noqa: F401
    import methods.solvers  # noqa: F401
    from bench.accounting import ForwardCounter
    from bench.models import build_model
    from bench.registry import METHODS
    from bench.seeds import generators, noise

    for pred in args.predictions:
        b = build_model("gmm", dim=2, prediction=pred)
        gens = generators(0, range(args.n))
        z = noise(gens, b.sample_shape, b.dtype)
        mix = b.extra["mixture"]

        def per_sample(prep, b=b, z=z, gens=gens, mix=mix) -> tuple[np.ndarray, int]:
            with ForwardCounter(prep.denoiser.net, keep_first=True) as c:
                c.arm()
                x = prep(z, None, 1.0, gens)
            xs, ts = c.first_inputs[0]
            exact = mix.ode_endpoint(xs, b.denoiser.schedule, float(ts.flatten()[0]))
            return ((x - exact) ** 2).flatten(1).mean(1).numpy(), c.calls

        for nfe in args.nfe:
            for name, (base, bk) in PAIRS.items():
                learned = METHODS.get(name)().prepare(b, nfe, guidance=1.0)
                e_l, n_l = per_sample(learned)
                e_b, n_b = per_sample(METHODS.get(base)(**bk).prepare(b, nfe))
                d = e_l - e_b
                half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
                cost = learned.artifacts[0].record["cost"]
                print(
                    f"gmm-{pred} nfe={nfe} {name}: {e_l.mean():.4g} (nfe {n_l}) vs {base}: {e_b.mean():.4g} (nfe {n_b}) "
                    f"ratio {e_l.mean() / e_b.mean():.3f} paired diff {d.mean():.3g} +- {half:.2g}; "
                    f"build {cost['wall_s']:.1f}s, learned params {learned.info['learned_params']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
