"""Why diffusers' DPMSolverMultistepScheduler plateaus on a flow model, measured on the flow gmm.

Usage: .venv/bin/python scripts/diffusers_flow_plateau.py
Prints the RMS error to the exact ODE endpoint (64 draws) of: sample_dpmpp_2m on diffusers' flow
grid; diffusers' scheduler as shipped (model timesteps cast to int64); and diffusers' scheduler
asked about the exact times 1000 * sigma.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler

from bench import schedules as S
from bench.models import build_model
from bench.seeds import generators, noise
from methods.solvers.core import Grid, ODEModel
from methods.solvers.dpmpp_2m import sample_dpmpp_2m
from methods.solvers.scheduler_loop import run_scheduler

CONFIG = {
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "final_sigmas_type": "zero",
    "use_flow_sigmas": True,
    "flow_shift": 1.0,
    "prediction_type": "flow_prediction",
}


def main() -> None:
    b = build_model("gmm", dim=2, prediction="flow")
    d, sch = b.denoiser, b.denoiser.schedule
    x = noise(generators(0, range(64)), (2,), torch.float64)
    exact = b.extra["mixture"].ode_endpoint(x, sch, 999.0)

    def err(y: torch.Tensor) -> float:
        return float(((y - exact) ** 2).mean().sqrt())

    print("steps  sample_dpmpp_2m  diffusers(int64 t)  diffusers(exact t)")
    for n in (30, 60, 120, 240, 480):
        ours = sample_dpmpp_2m(ODEModel(d), x, Grid.from_times(sch, S.uniform(sch, n, pure_noise=False)))
        shipped = DPMSolverMultistepScheduler(**CONFIG)
        shipped.set_timesteps(n)
        fixed = DPMSolverMultistepScheduler(**CONFIG)
        fixed.set_timesteps(n)

        def exact_time(xx, t, cond=None, guidance=1.0, s=fixed):
            i = s.step_index if s.step_index is not None else 0
            return d(xx, s.sigmas[i].double() * 1000, cond, guidance)

        print(
            f"{n:5d}  {err(ours):15.2e}  {err(run_scheduler(shipped, d, x)):18.2e}  {err(run_scheduler(fixed, exact_time, x)):18.2e}"
        )


if __name__ == "__main__":
    main()
