"""Measure each solver's empirical convergence order against the exact gmm ODE endpoint.

Usage: NS=64,128,256 .venv/bin/python scripts/solver_orders.py [eps|flow] [karras0|logsnr|uniform] [solver ...]
Prints RMS error against NFE and the fitted slope of log error vs log NFE.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from bench import schedules as S
from bench.accounting import ForwardCounter
from bench.models import build_model
from bench.seeds import generators, noise
from methods.solvers.core import Grid, ODEModel

torch.set_num_threads(1)

NS = tuple(int(v) for v in os.environ.get("NS", "5,8,12,16,24,32,48,64,96,128").split(","))


def solver_fns():
    from methods.solvers.ddim import sample_ddim
    from methods.solvers.deis import sample_deis
    from methods.solvers.dpm_solver import order_list, sample_dpm_solver
    from methods.solvers.dpmpp_2m import sample_dpmpp_2m
    from methods.solvers.dpmpp_3m import sample_dpmpp_3m
    from methods.solvers.euler import sample_euler
    from methods.solvers.heun import sample_heun
    from methods.solvers.ipndm import sample_ipndm
    from methods.solvers.lms import sample_lms
    from methods.solvers.pndm import sample_pndm
    from methods.solvers.unipc import sample_unipc

    return {
        "ddim": lambda m, x, g: sample_ddim(m, x, g),
        "euler": lambda m, x, g: sample_euler(m, x, g),
        "heun": lambda m, x, g: sample_heun(m, x, g),
        "lms2": lambda m, x, g: sample_lms(m, x, g, 2),
        "lms3": lambda m, x, g: sample_lms(m, x, g, 3),
        "lms4": lambda m, x, g: sample_lms(m, x, g, 4),
        "ipndm2": lambda m, x, g: sample_ipndm(m, x, g, 2),
        "ipndm4": lambda m, x, g: sample_ipndm(m, x, g, 4),
        "pndm_f": lambda m, x, g: sample_pndm(m, x, g, "f"),
        "pndm_s": lambda m, x, g: sample_pndm(m, x, g, "s"),
        "dpm1": lambda m, x, g: sample_dpm_solver(m, x, g, order_list(g.steps, 1)),
        "dpm2": lambda m, x, g: sample_dpm_solver(m, x, g, order_list(g.steps, 2)),
        "dpm3": lambda m, x, g: sample_dpm_solver(m, x, g, order_list(g.steps, 3)),
        "dpmpp_2m": lambda m, x, g: sample_dpmpp_2m(m, x, g),
        "dpmpp_3m": lambda m, x, g: sample_dpmpp_3m(m, x, g, lower_order_final=False),
        "dpmpp_3m_ref": lambda m, x, g: sample_dpmpp_3m(m, x, g, lower_order_final=False, d2_weight=1.0),
        "deis1": lambda m, x, g: sample_deis(m, x, g, 1, False),
        "deis2": lambda m, x, g: sample_deis(m, x, g, 2, False),
        "deis3": lambda m, x, g: sample_deis(m, x, g, 3, False),
        "unipc1": lambda m, x, g: sample_unipc(m, x, g, 1, "bh2", True, False),
        "unipc2": lambda m, x, g: sample_unipc(m, x, g, 2, "bh2", True, False),
        "unipc3": lambda m, x, g: sample_unipc(m, x, g, 3, "bh2", True, False),
        "unipc2_bh1": lambda m, x, g: sample_unipc(m, x, g, 2, "bh1", True, False),
        "unip2": lambda m, x, g: sample_unipc(m, x, g, 2, "bh2", False, False),
        "unip3": lambda m, x, g: sample_unipc(m, x, g, 3, "bh2", False, False),
    }


def grid_for(kind: str, sch, n: int) -> np.ndarray:
    if kind == "karras0":
        return S.karras(sch, n, 7.0, sigma_min=0.0)
    if kind == "logsnr":
        return S.logsnr(sch, n, sigma_min=1e-4)
    if kind == "uniform":
        return S.uniform(sch, n, pure_noise=True)
    raise ValueError(kind)


def main() -> None:
    pred = sys.argv[1] if len(sys.argv) > 1 else "eps"
    gkind = sys.argv[2] if len(sys.argv) > 2 else "karras0"
    names = sys.argv[3:] or list(solver_fns())
    bundle = build_model("gmm", dim=2, prediction=pred)
    sch = bundle.denoiser.schedule
    x = noise(generators(0, range(64)), (2,), torch.float64)
    mix = bundle.extra["mixture"]
    oracle: dict[float, torch.Tensor] = {}
    fns = solver_fns()
    for name in names:
        rows = []
        for n in NS:
            t = grid_for(gkind, sch, n)
            if t[0] not in oracle:
                oracle[t[0]] = mix.ode_endpoint(x, sch, t[0], rtol=1e-12)
            grid = Grid.from_times(sch, t)
            with ForwardCounter(bundle.denoiser.net) as c:
                out = fns[name](ODEModel(bundle.denoiser), x.clone(), grid)
            err = float(((out - oracle[t[0]]) ** 2).mean().sqrt())
            rows.append((c.calls, err))
        nfe, err = np.array(rows).T
        sl = np.diff(np.log(err)) / np.diff(np.log(nfe))
        print(f"{name:14s} " + " ".join(f"{int(a)}:{b:.1e}" for a, b in rows))
        print(f"{'':14s} local slopes " + " ".join(f"{-s:.2f}" for s in sl))


if __name__ == "__main__":
    main()
