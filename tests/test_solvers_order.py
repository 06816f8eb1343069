"""Each solver is the algorithm it claims: convergence order against the exact gmm ODE endpoint.

For every deterministic solver, the RMS error to the exact PF-ODE endpoint (the gmm oracle) is
measured over a family of grids that refines down to sigma = 0, the NFE is counted by the
harness's ForwardCounter, and the slope of log error against log NFE over the solver's asymptotic
range must be within 0.5 of the order stated below. Stochastic solvers are checked in
distribution: the sliced Wasserstein distance to exact samples falls with NFE.

Grids: ``karras0`` is EDM's rho = 7 ramp from the model's noisiest level to sigma_bar = 0 itself;
``logsnr`` is uniform in lambda down to sigma_bar = 1e-4 (then the step to 0); ``uniform`` is
uniform in time (flow: s from 1, or from 1 - 1/T for solvers that cannot start at pure noise).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
import torch

from bench import schedules as S
from bench.accounting import ForwardCounter
from bench.metrics.oracle import sliced_wasserstein
from bench.models import ModelBundle, build_model
from bench.seeds import generators, noise
from methods.solvers.core import Grid, ODEModel
from methods.solvers.ddim import sample_ddim
from methods.solvers.ddpm import sample_ddpm
from methods.solvers.deis import sample_deis
from methods.solvers.dpm_solver import order_list, sample_dpm_solver
from methods.solvers.dpmpp_2m import sample_dpmpp_2m
from methods.solvers.dpmpp_2m_sde import sample_dpmpp_2m_sde
from methods.solvers.dpmpp_3m import sample_dpmpp_3m
from methods.solvers.euler import sample_euler
from methods.solvers.euler_ancestral import sample_euler_ancestral
from methods.solvers.heun import sample_heun
from methods.solvers.ipndm import sample_ipndm
from methods.solvers.lms import sample_lms
from methods.solvers.pndm import sample_pndm
from methods.solvers.unipc import sample_unipc

N_SAMPLES = 64
Solve = Callable[[ODEModel, torch.Tensor, Grid], torch.Tensor]


@cache
def bundle(prediction: str) -> ModelBundle:
    return build_model("gmm", dim=2, prediction=prediction)


@cache
def start_noise() -> torch.Tensor:
    return noise(generators(0, range(N_SAMPLES)), (2,), torch.float64)


@cache
def exact(prediction: str, t_start: float) -> torch.Tensor:
    """The oracle endpoint, once per (model, start time) for this module."""
    b = bundle(prediction)
    return b.extra["mixture"].ode_endpoint(start_noise(), b.denoiser.schedule, t_start, rtol=1e-10)


def grid_times(kind: str, prediction: str, n: int) -> np.ndarray:
    sch = bundle(prediction).denoiser.schedule
    if kind == "karras0":
        return S.karras(sch, n, 7.0, sigma_min=0.0)
    if kind == "logsnr":
        return S.logsnr(sch, n, sigma_min=1e-4)
    if kind == "uniform":
        return S.uniform(sch, n, pure_noise=True)
    if kind == "uniform_finite":
        return S.uniform(sch, n, pure_noise=False)
    raise ValueError(kind)


def error_and_nfe(solve: Solve, prediction: str, kind: str, n: int) -> tuple[float, int]:
    b = bundle(prediction)
    t = grid_times(kind, prediction, n)
    grid = Grid.from_times(b.denoiser.schedule, t)
    with ForwardCounter(b.denoiser.net) as counter:
        out = solve(ODEModel(b.denoiser), start_noise().clone(), grid)
    err = float(((out - exact(prediction, float(t[0]))) ** 2).mean().sqrt())
    return err, counter.calls


def fitted_order(solve: Solve, prediction: str, kind: str, steps: tuple[int, ...]) -> tuple[float, list]:
    rows = [error_and_nfe(solve, prediction, kind, n) for n in steps]
    err, nfe = np.array(rows).T
    slope = np.polyfit(np.log(nfe), np.log(err), 1)[0]
    return -float(slope), rows


# (case id, solver, model, grid family, step counts of the asymptotic range, expected order, why)
ORDER_CASES: list[tuple[str, Solve, str, str, tuple[int, ...], float, str]] = [
    ("ddim", lambda m, x, g: sample_ddim(m, x, g), "eps", "logsnr", (32, 64, 128), 1, "first order (Euler on the eps-ODE)"),
    ("euler-vp", lambda m, x, g: sample_euler(m, x, g), "eps", "logsnr", (32, 64, 128), 1, "Euler"),
    ("euler-flow", lambda m, x, g: sample_euler(m, x, g), "flow", "uniform", (32, 64, 128), 1, "Euler"),
    ("heun-vp", lambda m, x, g: sample_heun(m, x, g), "eps", "karras0", (64, 96, 128), 2, "Heun (trapezoidal)"),
    ("heun-flow", lambda m, x, g: sample_heun(m, x, g), "flow", "uniform", (32, 64, 128), 2, "Heun (trapezoidal)"),
    ("lms-2", lambda m, x, g: sample_lms(m, x, g, 2), "eps", "logsnr", (64, 128, 256), 2, "variable-step AB2"),
    ("lms-4", lambda m, x, g: sample_lms(m, x, g, 4), "eps", "karras0", (192, 256, 384, 512), 4, "variable-step AB4"),
    (
        "ipndm-4",
        lambda m, x, g: sample_ipndm(m, x, g, 4),
        "eps",
        "logsnr",
        (64, 128, 256),
        2,
        "equal-step AB4 weights on a grid not uniform in sigma_bar are second-order consistent",
    ),
    (
        "pndm-f",
        lambda m, x, g: sample_pndm(m, x, g, "f"),
        "flow",
        "uniform",
        (96, 128, 192),
        4,
        "pseudo RK4 start + PLMS-4 on a grid uniform in its frame time",
    ),
    ("pndm-s", lambda m, x, g: sample_pndm(m, x, g, "s"), "flow", "uniform", (32, 64, 128), 2, "improved-Euler start + PLMS-2"),
    (
        "ipndm-4-flow",
        lambda m, x, g: sample_ipndm(m, x, g, 4),
        "flow",
        "uniform",
        (64, 128, 256),
        2,
        "AB4 on a uniform grid, but the Euler first step from pure noise (curved there) caps it at 2",
    ),
    (
        "dpm_solver-2",
        lambda m, x, g: sample_dpm_solver(m, x, g, order_list(g.steps, 2)),
        "eps",
        "logsnr",
        (32, 64, 128),
        2,
        "DPM-Solver-2",
    ),
    (
        "dpm_solver-3",
        lambda m, x, g: sample_dpm_solver(m, x, g, order_list(g.steps, 3)),
        "eps",
        "logsnr",
        (48, 64, 96, 128),
        3,
        "DPM-Solver-3",
    ),
    ("dpmpp_2m", lambda m, x, g: sample_dpmpp_2m(m, x, g), "eps", "logsnr", (64, 128, 256), 2, "DPM-Solver++(2M)"),
    ("dpmpp_2m-flow", lambda m, x, g: sample_dpmpp_2m(m, x, g), "flow", "karras0", (64, 128, 256), 2, "DPM-Solver++(2M)"),
    (
        "dpmpp_3m-consistent",
        lambda m, x, g: sample_dpmpp_3m(m, x, g, lower_order_final=False, d2_weight=2.0),
        "eps",
        "logsnr",
        (96, 128, 192, 256),
        3,
        "DPM-Solver++(3M) with the Taylor-consistent D'' weight (third_order: consistent)",
    ),
    (
        "dpmpp_3m-official",
        lambda m, x, g: sample_dpmpp_3m(m, x, g, lower_order_final=False),
        "eps",
        "logsnr",
        (96, 128, 192, 256),
        2,
        "the official (default) update's halved D'' weight leaves an O(h^3) local error",
    ),
    ("deis-2", lambda m, x, g: sample_deis(m, x, g, 2, False), "eps", "logsnr", (64, 128, 256), 2, "tAB-DEIS-2"),
    ("deis-3", lambda m, x, g: sample_deis(m, x, g, 3, False), "eps", "karras0", (192, 256, 384, 512), 3, "tAB-DEIS-3"),
    ("unipc-1", lambda m, x, g: sample_unipc(m, x, g, 1, "bh2", True, False), "eps", "logsnr", (32, 64, 128), 2, "UniP-1 + UniC"),
    (
        "unipc-2-bh2",
        lambda m, x, g: sample_unipc(m, x, g, 2, "bh2", True, False),
        "eps",
        "logsnr",
        (64, 128, 256),
        3,
        "UniP-2 + UniC",
    ),
    (
        "unipc-2-bh1",
        lambda m, x, g: sample_unipc(m, x, g, 2, "bh1", True, False),
        "eps",
        "logsnr",
        (64, 128, 256),
        3,
        "UniP-2 + UniC",
    ),
    (
        "unipc-2-flow",
        lambda m, x, g: sample_unipc(m, x, g, 2, "bh2", True, False),
        "flow",
        "karras0",
        (64, 128, 256),
        3,
        "UniP-2 + UniC",
    ),
    (
        "unipc-3",
        lambda m, x, g: sample_unipc(m, x, g, 3, "bh2", True, False),
        "eps",
        "karras0",
        (128, 192, 256, 384),
        4,
        "UniP-3 + UniC",
    ),
    ("unip-2", lambda m, x, g: sample_unipc(m, x, g, 2, "bh2", False, False), "eps", "logsnr", (64, 128, 256), 2, "UniP-2 alone"),
    (
        "unip-3",
        lambda m, x, g: sample_unipc(m, x, g, 3, "bh2", False, False),
        "eps",
        "logsnr",
        (96, 128, 192, 256),
        3,
        "UniP-3 alone",
    ),
]


@pytest.mark.parametrize("solve,prediction,kind,steps,expected", [pytest.param(*c[1:6], id=c[0]) for c in ORDER_CASES])
def test_convergence_order(solve, prediction, kind, steps, expected):
    order, rows = fitted_order(solve, prediction, kind, steps)
    table = ", ".join(f"NFE {n}: {e:.2e}" for e, n in rows)
    assert abs(order - expected) <= 0.5, f"fitted order {order:.2f}, expected {expected} ({table})"
    assert rows[-1][0] < rows[0][0]


@pytest.mark.parametrize("third_order,weight", [("official", 1.0), ("consistent", 2.0)])
def test_dpmpp_3m_knob_selects_the_update(third_order, weight):
    """The registered ``dpmpp_3m`` runs the official update by default and the consistent one with
    ``third_order: consistent``, each exactly as the plain function with that D'' weight."""
    from bench.registry import METHODS

    b = bundle("eps")
    knobs = {} if third_order == "official" else {"third_order": third_order}
    adapter = METHODS.get("dpmpp_3m")(**knobs)
    assert adapter.config["third_order"] == third_order
    prepared = adapter.prepare(b, 10)
    out = prepared(start_noise().clone(), None, 1.0, generators(0, range(N_SAMPLES)))
    ref = sample_dpmpp_3m(ODEModel(b.denoiser), start_noise().clone(), adapter.grid, True, d2_weight=weight)
    assert torch.equal(out, ref)


def test_corrector_raises_unipc_order_without_extra_nfe():
    """UniC reuses the next step's evaluation: same NFE, one order more (the paper's claim)."""
    with_c = [error_and_nfe(lambda m, x, g: sample_unipc(m, x, g, 2, "bh2", True, False), "eps", "logsnr", n) for n in (64, 128)]
    without = [
        error_and_nfe(lambda m, x, g: sample_unipc(m, x, g, 2, "bh2", False, False), "eps", "logsnr", n) for n in (64, 128)
    ]
    assert [r[1] for r in with_c] == [r[1] for r in without] == [64, 128]
    assert with_c[-1][0] < 0.2 * without[-1][0]


def test_euler_is_ddim_on_vp_and_flow():
    """First-order steps coincide on any path (Euler in the VE frame is DDIM; flow Euler is too)."""
    for prediction, kind in (("eps", "karras0"), ("flow", "uniform_finite")):
        b = bundle(prediction)
        grid = Grid.from_times(b.denoiser.schedule, grid_times(kind, prediction, 12))
        a = sample_euler(ODEModel(b.denoiser), start_noise(), grid)
        c = sample_ddim(ODEModel(b.denoiser), start_noise(), grid)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_flow_dpmpp_2m_has_no_plateau():
    """The registered adapter on the flow gmm at its default grid (diffusers' flow sigmas) keeps
    converging where diffusers' DPMSolverMultistepScheduler stalls at ~1e-3 (it casts the model's
    timesteps 1000 s to int64; see tests/test_solvers_diffusers.py)."""
    from bench.registry import METHODS

    b = bundle("flow")
    errs = []
    for steps in (60, 240):
        sampler = METHODS.get("dpmpp_2m")().prepare(b, steps)
        out = sampler(start_noise().clone(), None, 1.0, generators(0, range(N_SAMPLES)))
        errs.append(float(((out - exact("flow", 999.0)) ** 2).mean().sqrt()))
    assert errs[1] < 2e-4 and errs[1] < 0.15 * errs[0], errs


# ---------------------------------------------------------------------------------------------
# stochastic solvers: in distribution

N_DIST = 1000


@cache
def true_samples(n: int) -> torch.Tensor:
    return bundle("eps").extra["mixture"].sample(n, torch.Generator().manual_seed(99))


def swd_at(sample: Callable, prediction: str, n: int) -> float:
    b = bundle(prediction)
    gens = generators(1, range(N_DIST))
    x = noise(gens, (2,), torch.float64)
    t = S.uniform(b.denoiser.schedule, n, pure_noise=True)
    out = sample(ODEModel(b.denoiser), x, Grid.from_times(b.denoiser.schedule, t), gens)
    proj = torch.randn(2, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return sliced_wasserstein(out, true_samples(N_DIST), proj / proj.norm(dim=0))


STOCHASTIC_CASES = [
    ("ddpm", lambda m, x, g, gen: sample_ddpm(m, x, g, "small", gen), "eps"),
    ("ddpm-large", lambda m, x, g, gen: sample_ddpm(m, x, g, "large", gen), "eps"),
    ("ddim-eta1", lambda m, x, g, gen: sample_ddim(m, x, g, 1.0, gen), "eps"),
    ("euler_ancestral", lambda m, x, g, gen: sample_euler_ancestral(m, x, g, 1.0, 1.0, gen), "eps"),
    ("euler_ancestral-flow", lambda m, x, g, gen: sample_euler_ancestral(m, x, g, 1.0, 1.0, gen), "flow"),
    ("dpmpp_2m_sde", lambda m, x, g, gen: sample_dpmpp_2m_sde(m, x, g, gen), "eps"),
    ("heun-churn", lambda m, x, g, gen: sample_heun(m, x, g, 30.0, 0.05, 50.0, 1.0, gen), "eps"),
]


@cache
def converged_swd(prediction: str) -> float:
    """The SWD of an ODE solution converged to ~1e-4 on the same noise: the sampling floor."""
    return swd_at(lambda m, x, g, gen: sample_heun(m, x, g), prediction, 60)


@pytest.mark.parametrize("sample,prediction", [pytest.param(*c[1:], id=c[0]) for c in STOCHASTIC_CASES])
def test_stochastic_solver_converges_in_distribution(sample, prediction):
    d = [swd_at(sample, prediction, n) for n in (4, 16, 64)]
    floor = converged_swd(prediction)
    assert d[0] > max(d[1], d[2]), d
    assert d[2] < 1.5 * floor + 0.02, (d, floor)
