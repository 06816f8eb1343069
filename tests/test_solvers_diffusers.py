"""The plain solver functions give diffusers' answers where diffusers is exact.

On the VP gmm with the trailing integer grid (diffusers' ``timestep_spacing="trailing"``), each
function is run against the matching diffusers scheduler from the same noise (and, for the
stochastic ones, the same per-sample generators). diffusers keeps sigmas in float32, hence the
1e-4 tolerance; a wrong coefficient moves the result by 1e-2 or more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from bench import schedules as S
from bench.models import build_model
from bench.seeds import generators, noise
from methods.solvers.core import Grid, ODEModel
from methods.solvers.ddim import sample_ddim
from methods.solvers.ddpm import sample_ddpm
from methods.solvers.dpmpp_2m import sample_dpmpp_2m
from methods.solvers.dpmpp_2m_sde import sample_dpmpp_2m_sde
from methods.solvers.dpmpp_3m import sample_dpmpp_3m
from methods.solvers.euler import sample_euler
from methods.solvers.euler_ancestral import sample_euler_ancestral
from methods.solvers.heun import sample_heun
from methods.solvers.lms import sample_lms
from methods.solvers.scheduler_loop import run_scheduler, vp_scheduler_config
from methods.solvers.unipc import sample_unipc

VP = build_model("gmm", dim=2, prediction="eps")
FLOW = build_model("gmm", dim=2, prediction="flow")
ZERO = {"final_sigmas_type": "zero"}
N = 16


def start() -> tuple[torch.Tensor, list[torch.Generator]]:
    gens = generators(3, range(N))
    return noise(gens, (2,), torch.float64), gens


class Recorder:
    """Records every network input (x) of a run."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.xs = net, []

    def __enter__(self) -> Recorder:
        self.h = self.net.register_forward_pre_hook(lambda m, a: self.xs.append(a[0].clone()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.h.remove()


def run_both(cls, kw: dict, fn: Callable, steps: int, bundle=VP):
    d = bundle.denoiser
    x, gens = start()
    sched = cls(**vp_scheduler_config(d), **kw)
    sched.set_timesteps(steps)
    with Recorder(d.net) as rec_ref:
        ref = run_scheduler(sched, d, x, generators=gens)
    x, gens = start()
    grid = Grid.from_times(d.schedule, S.uniform(d.schedule, steps))
    with Recorder(d.net) as rec:
        out = fn(ODEModel(d), x, grid, gens)
    return ref, out, rec_ref.xs, rec.xs


def _unipc_bh2(m, x, g, gen, order):
    return sample_unipc(m, x, g, order, "bh2", True, True)


CASES = [
    ("euler", EulerDiscreteScheduler, ZERO, lambda m, x, g, gen: sample_euler(m, x, g)),
    ("heun", HeunDiscreteScheduler, {}, lambda m, x, g, gen: sample_heun(m, x, g)),
    ("lms", LMSDiscreteScheduler, {}, lambda m, x, g, gen: sample_lms(m, x, g, 4)),
    ("ddim", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}, lambda m, x, g, gen: sample_ddim(m, x, g)),
    ("ddpm", DDPMScheduler, {"clip_sample": False}, lambda m, x, g, gen: sample_ddpm(m, x, g, "small", gen)),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {}, lambda m, x, g, gen: sample_euler_ancestral(m, x, g, 1.0, 1.0, gen)),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {**ZERO, "solver_order": 2}, lambda m, x, g, gen: sample_dpmpp_2m(m, x, g)),
    (
        "dpmpp_3m-official",
        DPMSolverMultistepScheduler,
        {**ZERO, "solver_order": 3},
        lambda m, x, g, gen: sample_dpmpp_3m(m, x, g, True),
    ),
    (
        "dpmpp_2m_sde",
        DPMSolverMultistepScheduler,
        {**ZERO, "solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
        lambda m, x, g, gen: sample_dpmpp_2m_sde(m, x, g, gen),
    ),
    *[
        (
            f"unipc-{o}-bh2",
            UniPCMultistepScheduler,
            {**ZERO, "solver_order": o, "solver_type": "bh2"},
            functools.partial(_unipc_bh2, order=o),
        )
        for o in (1, 2, 3)
    ],
]


@pytest.mark.parametrize("cls,kw,fn", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_matches_diffusers_on_trailing_grid(cls, kw, fn):
    for steps in (10, 7):
        if cls is DDIMScheduler and steps == 7:
            continue  # diffusers' DDIM steps to t - T // n, not the next trailing timestep
        ref, out, *_ = run_both(cls, kw, fn, steps)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_model_inputs_match_diffusers(order, variant):
    """Every state UniPC evaluates the model at (predictor + corrector) matches diffusers'. The final
    output is not compared for bh1: diffusers computes B(h) = -inf times 0 = nan on the step into
    sigma = 0 there."""
    kw = {**ZERO, "solver_order": order, "solver_type": variant}
    _, out, xs_ref, xs = run_both(UniPCMultistepScheduler, kw, lambda m, x, g, gen: sample_unipc(m, x, g, order, variant), 10)
    assert torch.isfinite(out).all() and len(xs) == len(xs_ref) == 10
    for a, b in zip(xs, xs_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_unipc_variants_differ():
    """bh1 and bh2 are different methods (the fixed 1/2 weights meet different B(h))."""
    x, _ = start()
    grid = Grid.from_times(VP.denoiser.schedule, S.uniform(VP.denoiser.schedule, 10))
    a = sample_unipc(ODEModel(VP.denoiser), x, grid, 2, "bh1")
    b = sample_unipc(ODEModel(VP.denoiser), x, grid, 2, "bh2")
    assert float((a - b).abs().max()) > 1e-3


def test_ddpm_large_variance_matches_diffusers_before_the_last_step():
    """diffusers adds beta-variance noise even on the strided step into the data; DDPM (Algorithm 2,
    z = 0 at the last step) does not, so only the states before it are compared."""
    _, _, xs_ref, xs = run_both(
        DDPMScheduler,
        {"clip_sample": False, "variance_type": "fixed_large"},
        lambda m, x, g, gen: sample_ddpm(m, x, g, "large", gen),
        10,
    )
    for a, b in zip(xs, xs_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_dpmpp_3m_consistent_weight_differs_from_official():
    x, _ = start()
    grid = Grid.from_times(VP.denoiser.schedule, S.uniform(VP.denoiser.schedule, 10))
    a = sample_dpmpp_3m(ODEModel(VP.denoiser), x, grid, d2_weight=2.0)
    b = sample_dpmpp_3m(ODEModel(VP.denoiser), x, grid)
    assert float((a - b).abs().max()) > 1e-3


@pytest.mark.parametrize("steps", [10, 7])
def test_registered_dpmpp_3m_default_is_diffusers(steps):
    """The method users run (``dpmpp_3m`` with default knobs, uniform = trailing grid) gives
    DPMSolverMultistepScheduler(solver_order=3)'s answer on the exact mixture."""
    from bench.registry import METHODS

    d = VP.denoiser
    x, gens = start()
    sched = DPMSolverMultistepScheduler(**vp_scheduler_config(d), **ZERO, solver_order=3)
    sched.set_timesteps(steps)
    ref = run_scheduler(sched, d, x, generators=gens)
    out = METHODS.get("dpmpp_3m")().prepare(VP, steps)(x.clone(), None, 1.0, gens)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize(
    "cls,fn", [(FlowMatchEulerDiscreteScheduler, sample_euler), (FlowMatchHeunDiscreteScheduler, sample_heun)]
)
def test_flow_euler_heun_match_diffusers(cls, fn):
    """diffusers' flow grid (s = 1 ... 1/T, then 0) stepped by our frame solvers."""
    d = FLOW.denoiser
    x, _ = start()
    sched = cls(num_train_timesteps=1000)
    sched.set_timesteps(12)
    ref = run_scheduler(sched, d, x)
    t = np.concatenate([np.linspace(1000.0, 1.0, 12), [0.0]])
    out = fn(ODEModel(d), x, Grid.from_times(d.schedule, t))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_flow_dpmpp_2m_is_diffusers_with_exact_times():
    """diffusers' DPMSolverMultistepScheduler with flow sigmas casts the model's timesteps 1000 s to
    int64, so the model is asked about another noise level than the step uses (a ~1e-3 error floor
    on gmm). Given the exact times it computes what sample_dpmpp_2m computes on the same grid."""
    d = FLOW.denoiser
    kw = {**ZERO, "solver_order": 2, "use_flow_sigmas": True, "flow_shift": 1.0, "prediction_type": "flow_prediction"}
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, **kw)
    sched.set_timesteps(20)
    assert sched.timesteps.dtype == torch.int64
    assert float((sched.sigmas[:-1].double() * 1000 - sched.timesteps.double()).abs().max()) > 0.1

    def exact_time_denoiser(x, t, cond=None, guidance=1.0):
        i = sched.step_index if sched.step_index is not None else 0
        return d(x, sched.sigmas[i].double() * 1000, cond, guidance)

    x, _ = start()
    ref = run_scheduler(sched, exact_time_denoiser, x)
    grid = Grid.from_times(d.schedule, S.uniform(d.schedule, 20, pure_noise=False))
    out = sample_dpmpp_2m(ODEModel(d), x, grid)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
