"""The adapter every grid solver shares: schedule knobs, step budget, GITS calibration artifact.

A solver adapter turns (model, knobs, steps) into a grid of noise levels (``bench.schedules``)
and a sampler that runs its plain solver function over that grid. ``steps`` is the number of
solver steps; solvers that evaluate the network more than once per step (Heun, PNDM, singlestep
DPM-Solver) have a ``budget`` knob: ``budget: nfe`` reads ``steps`` as a network-evaluation budget
and takes the largest step count whose NFE fits it (the harness still records the real NFE).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Sampler
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.seeds import generators as make_generators
from bench.seeds import noise as make_noise
from methods.solvers.core import Frame, Grid, ODEModel, sample_ipndm

ALL_KINDS = Applies(prediction=("eps", "v", "x0", "flow"))
VP_KINDS = Applies(prediction=("eps", "v", "x0"))

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
        trains=True,
    ),
)
BUDGET_KNOB = Knob(
    "budget", str, "steps", "what `steps` counts: solver steps, or network evaluations (nfe)", choices=("steps", "nfe")
)

GITS_TEACHER_STEPS = 100  # fine calibration grid (GITS uses ~100 teacher steps)
GITS_SAMPLES = 64  # calibration trajectories
GITS_COEFF = 1.15  # GITS's DP coefficient
GITS_SEED = 2**31 - 7  # calibration noise seeds, disjoint from any suite's sample seeds
GITS_BUILDER = "ipndm"  # the calibration's teacher solver builds it, shared by every solver and step count
GITS_FILE = "gits_cost.npy"


class GridSolver(MethodAdapter):
    """Base adapter: subclasses set metadata and implement :meth:`sample` (and :meth:`nfe_of`)."""

    family = "solver"
    training = "free"
    applies_to = ALL_KINDS
    knobs: ClassVar[tuple[Knob, ...]] = SCHEDULE_KNOBS
    pure_noise_start: ClassVar[bool] = True  # may start a flow model at s = 1 (alpha = 0)

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

    def timesteps(self, bundle: ModelBundle, n: int, artifacts: Mapping[str, Artifact]) -> np.ndarray:
        sch = bundle.denoiser.schedule
        name = self.config["schedule"]
        if name == "gits":
            return self.gits_timesteps(bundle, n, artifacts)
        return S.timesteps(name, sch, n, pure_noise=self.pure_noise_start, rho=self.config["rho"])

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Sampler:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        grid = Grid.from_times(bundle.denoiser.schedule, self.timesteps(bundle, self.grid_steps(steps), artifacts))
        self.grid = grid

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return self.sample(ODEModel(bundle.denoiser, cond, guidance), noise, grid, generators)

        return sampler

    # --- GITS (Chen et al. 2024): the schedule from a calibration artifact ------------------

    def gits_spec(self, bundle: ModelBundle) -> ArtifactSpec:
        """The GITS cost matrix of ``bundle`` at this calibration guidance and rho: one artifact per
        model shared by every solver and step count (built by the iPNDM adapter, its teacher)."""
        from bench.registry import METHODS

        builder = METHODS.get(GITS_BUILDER)()
        g = self.config["calib_guidance"]
        rows = GITS_TEACHER_STEPS * GITS_SAMPLES * (2 if g != 1.0 and bundle.num_classes else 1)
        params = {"calib_guidance": g, "rho": self.config["rho"], "teacher_steps": GITS_TEACHER_STEPS, "samples": GITS_SAMPLES}
        return artifact_spec(builder, bundle, "gits-cost", params, budget={"teacher_rows": rows})

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        return [self.gits_spec(bundle)] if self.config["schedule"] == "gits" else []

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        if spec.name != "gits-cost":
            raise ValueError(f"{self.name} builds no artifact {spec.name!r}")
        p = spec.params
        cost = self._gits_cost(
            ctx.bundle, float(p["calib_guidance"]), float(p["rho"]), int(p["teacher_steps"]), int(p["samples"])
        )
        np.save(ctx.out / GITS_FILE, cost)
        ctx.note(samples_drawn=int(p["samples"]))

    def gits_timesteps(self, bundle: ModelBundle, n: int, artifacts: Mapping[str, Artifact]) -> np.ndarray:
        """GITS (Chen et al. 2024): DP over a fine teacher trajectory with one-step Euler costs.

        The teacher is iPNDM (order 4) on a fine Karras grid of ``GITS_TEACHER_STEPS`` steps, on
        ``GITS_SAMPLES`` calibration draws (own seeds, classes cycling, guidance ``calib_guidance``).
        cost[i, j] is the mean L2 distance, in the solver frame, between an Euler (DDIM) step from
        the teacher state at fine point i straight to fine point j and the teacher state at j.
        The cost matrix does not depend on the solver or the step count: it is one artifact, whose
        recorded cost is the training cost of every job that uses it.
        """
        sch = bundle.denoiser.schedule
        M = GITS_TEACHER_STEPS
        if n > M:
            raise S.ScheduleError(f"gits selects from {M} calibration steps; ask for at most {M} steps")
        spec = self.gits_spec(bundle)
        if spec.key not in artifacts:
            raise ValueError(f"{self.name}: schedule=gits needs its calibration artifact {spec.label}")
        cost = np.load(artifacts[spec.key].path / GITS_FILE)
        self.gits_cost = cost
        fine = Grid.from_times(sch, S.karras(sch, M, self.config["rho"]))
        return fine.t[S.gits_select(cost, n, GITS_COEFF)]

    @torch.no_grad()
    def _gits_cost(self, bundle: ModelBundle, guidance: float, rho: float, M: int, samples: int) -> np.ndarray:
        """The GITS cost matrix of one calibration run of ``samples`` trajectories on a fine Karras grid of ``M`` steps."""
        sch = bundle.denoiser.schedule
        fine = Grid.from_times(sch, S.karras(sch, M, rho))
        gens = make_generators(GITS_SEED, range(samples))
        x = make_noise(gens, bundle.sample_shape, bundle.dtype)
        cond = torch.arange(samples) % bundle.num_classes if bundle.num_classes else None
        model = ODEModel(bundle.denoiser, cond, guidance)
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
        return cost
