"""The adapter every grid solver shares: schedule knobs, step budget, GITS calibration.

A solver adapter turns (model, knobs, steps) into a grid of noise levels (``bench.schedules``)
and a sampler that runs its plain solver function over that grid. ``steps`` is the number of
solver steps; solvers that evaluate the network more than once per step (Heun, PNDM, singlestep
DPM-Solver) have a ``budget`` knob: ``budget: nfe`` reads ``steps`` as a network-evaluation budget
and takes the largest step count whose NFE fits it (the harness still records the real NFE).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Sampler
from bench.models import ModelBundle
from bench.seeds import generators as make_generators
from bench.seeds import noise as make_noise
from methods.solvers.core import Frame, Grid, ODEModel, sample_ipndm

ALL_KINDS = ("eps", "v", "x0", "flow")
VP_KINDS = ("eps", "v", "x0")

SCHEDULE_KNOBS: tuple[Knob, ...] = (
    Knob("schedule", str, "uniform", "timestep schedule (bench/schedules.py)", choices=S.SCHEDULES),
    Knob("rho", float, 7.0, "Karras rho (schedule=karras only)", low=1.0, high=20.0),
    Knob(
        "calib_guidance",
        float,
        1.0,
        "guidance of the GITS calibration run (schedule=gits only; set it to the job's)",
        low=0.0,
        high=20.0,
    ),
)
BUDGET_KNOB = Knob(
    "budget", str, "steps", "what `steps` counts: solver steps, or network evaluations (nfe)", choices=("steps", "nfe")
)

GITS_TEACHER_STEPS = 100  # fine calibration grid (GITS uses ~100 teacher steps)
GITS_SAMPLES = 64  # calibration trajectories
GITS_COEFF = 1.15  # GITS's DP coefficient
GITS_SEED = 2**31 - 7  # calibration noise seeds, disjoint from any suite's sample seeds
# one calibration per (model, guidance, fine grid), shared by every solver and step count in a
# process, like a trained artifact; its cost is reported with every job that uses it
_GITS_CACHE: dict[tuple, tuple[np.ndarray, dict[str, float]]] = {}


class GridSolver(MethodAdapter):
    """Base adapter: subclasses set metadata and implement :meth:`sample` (and :meth:`nfe_of`)."""

    family = "solver"
    training = "free"
    applies_to = ALL_KINDS
    knobs: ClassVar[tuple[Knob, ...]] = SCHEDULE_KNOBS
    pure_noise_start: ClassVar[bool] = True  # may start a flow model at s = 1 (alpha = 0)

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self._train_cost = {"wall_s": 0.0, "optimizer_steps": 0, "teacher_evals": 0}

    # --- what a subclass provides ---------------------------------------------------------

    def sample(self, model: ODEModel, x: torch.Tensor, grid: Grid, generators: list[torch.Generator] | None) -> torch.Tensor:
        raise NotImplementedError

    def nfe_of(self, n: int) -> int:
        """Network evaluations of an n-step run (one per step unless overridden)."""
        return n

    # --- the shared machinery -------------------------------------------------------------

    def grid_steps(self, steps: int) -> int:
        """Solver steps for the ``steps`` argument (read as an NFE budget when budget = nfe)."""
        if self.config.get("budget", "steps") == "steps":
            return steps
        fits = [n for n in range(1, steps + 1) if self.nfe_of(n) <= steps]
        if not fits:
            raise ValueError(f"{self.name}: no step count fits an NFE budget of {steps} (one step costs {self.nfe_of(1)})")
        return max(fits)

    def timesteps(self, bundle: ModelBundle, n: int) -> np.ndarray:
        sch = bundle.denoiser.schedule
        name = self.config["schedule"]
        if name == "gits":
            return self.gits_timesteps(bundle, n)
        return S.timesteps(name, sch, n, pure_noise=self.pure_noise_start, rho=self.config["rho"])

    def prepare(self, bundle: ModelBundle, steps: int) -> Sampler:
        self.check(bundle)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        grid = Grid.from_times(bundle.denoiser.schedule, self.timesteps(bundle, self.grid_steps(steps)))
        self.grid = grid

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return self.sample(ODEModel(bundle.denoiser, cond, guidance), noise, grid, generators)

        return sampler

    def train_cost(self) -> dict[str, float]:
        return dict(self._train_cost)

    @torch.no_grad()
    def gits_timesteps(self, bundle: ModelBundle, n: int) -> np.ndarray:
        """GITS (Chen et al. 2024): DP over a fine teacher trajectory with one-step Euler costs.

        The teacher is iPNDM (order 4) on a fine Karras grid of ``GITS_TEACHER_STEPS`` steps, on
        ``GITS_SAMPLES`` calibration draws (own seeds, classes cycling, guidance ``calib_guidance``).
        cost[i, j] is the mean L2 distance, in the solver frame, between an Euler (DDIM) step from
        the teacher state at fine point i straight to fine point j and the teacher state at j.
        The calibration's wall time and network evaluations are reported as training cost; the
        cost matrix does not depend on the solver or the step count, so it is computed once.
        """
        sch = bundle.denoiser.schedule
        M = GITS_TEACHER_STEPS
        if n > M:
            raise S.ScheduleError(f"gits selects from {M} calibration steps; ask for at most {M} steps")
        fine = Grid.from_times(sch, S.karras(sch, M, self.config["rho"]))
        key = (bundle.name, bundle.weights_hash, bundle.kind, self.config["calib_guidance"], self.config["rho"], M, GITS_SAMPLES)
        if key not in _GITS_CACHE:
            _GITS_CACHE[key] = self._gits_cost(bundle, fine)
        cost, self._train_cost = _GITS_CACHE[key]
        self.gits_cost = cost
        return fine.t[S.gits_select(cost, n, GITS_COEFF)]

    def _gits_cost(self, bundle: ModelBundle, fine: Grid) -> tuple[np.ndarray, dict[str, float]]:
        """The GITS cost matrix of one calibration run, and what the run cost."""
        start = time.perf_counter()
        sch = bundle.denoiser.schedule
        M = fine.steps
        gens = make_generators(GITS_SEED, range(GITS_SAMPLES))
        x = make_noise(gens, bundle.sample_shape, bundle.dtype)
        cond = torch.arange(GITS_SAMPLES) % bundle.num_classes if bundle.num_classes else None
        model = ODEModel(bundle.denoiser, cond, self.config["calib_guidance"])
        frame = Frame(sch)
        tau = frame.tau(fine)
        ys, slopes = [], []

        def record(info: dict[str, Any]) -> None:
            i = info["i"]
            ys.append(frame.to_y(info["x"], float(fine.alpha[i])).double())
            slopes.append(frame.slope(info["x0"], info["eps"]).double())

        x_end = sample_ipndm(model, x, fine, order=4, callback=record)
        ys.append(x_end.double())  # the data end: y = x at alpha = 1
        traj = torch.stack(ys)  # (M + 1, B, ...)
        cost = np.full((M + 1, M + 1), np.inf)
        for i in range(M):
            dt = torch.as_tensor(tau[i + 1 :] - tau[i], dtype=torch.float64).view(-1, *([1] * (traj.ndim - 1)))
            pred = traj[i][None] + dt * slopes[i][None]
            err = (pred - traj[i + 1 :]).flatten(2).norm(dim=2).mean(1)
            cost[i, i + 1 :] = err.numpy()
        return cost, {"wall_s": time.perf_counter() - start, "optimizer_steps": 0, "teacher_evals": M * GITS_SAMPLES}
