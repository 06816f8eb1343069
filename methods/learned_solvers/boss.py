"""BOSS: Bellman optimal step sizes (Nguyen et al. 2023, "Bellman Optimal Stepsize Straightening of
Flow-Matching Models", arXiv 2312.16414).

The teacher runs Euler with ``fine_steps`` steps (uniform in native time by default, the paper's
grid) from ``samples`` training draws (own seeds, :mod:`methods.learned_solvers.trajectories`) at
the job's guidance; cost[i, j] is the mean squared distance (per dimension, averaged over the draws),
in the solver's frame, between one Euler step from the teacher's state at fine point i straight to
fine point j and the teacher's state at j. A K-step schedule is a path 0 = i_0 < ... < i_K = M
through the fine points; dynamic programming (the Bellman recursion V_k(i) = min_j cost[i, j] +
V_{k-1}(j), :func:`bellman_steps`) finds the path of least total cost, and the sampler is Euler on
it. The cost matrix does not depend on K: one artifact per model, guidance and teacher serves every
step count, and its recorded cost is the training cost of each job that uses it.

The paper's second stage, fine-tuning the velocity network at the chosen steps ("straightening",
with LoRA), is not implemented: it is a finetune-class stage on top of this one, and the
step-size selection alone is what sits in the O(1)-parameter band (K - 1 learned times).

For VP models (eps, v, x0) the Euler step is EDM's in the variance-exploding frame (DDIM), the
distance measured in that frame, as GITS does; on a flow it is the paper's Euler in s. GITS
(``schedule: gits`` of the free solvers) is the same kind of selection with iPNDM's teacher, the
unsquared norm and a 1.15 weight on earlier steps; BOSS uses the squared error and no weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from methods.learned_solvers.trajectories import train_guidance, training_noise
from methods.solvers.core import Frame, Grid, ODEModel
from methods.solvers.euler import sample_euler

COST_FILE = "boss_cost.npy"
FINE_SCHEDULES = tuple(s for s in S.SCHEDULES if s != "gits")


def euler_costs(traj: torch.Tensor, slopes: torch.Tensor, tau: np.ndarray) -> np.ndarray:
    """cost[i, j] = mean over draws and dimensions of (traj[i] + (tau_j - tau_i) slopes[i] - traj[j])^2
    for j > i (inf elsewhere): ``traj`` (M + 1, B, ...) the teacher's states, ``slopes`` (M, B, ...)
    the model's slope at each of the first M."""
    M = len(tau) - 1
    cost = np.full((M + 1, M + 1), np.inf)
    for i in range(M):
        dt = torch.as_tensor(tau[i + 1 :] - tau[i], dtype=traj.dtype).view(-1, *([1] * (traj.ndim - 1)))
        pred = traj[i][None] + dt * slopes[i][None]
        cost[i, i + 1 :] = (pred - traj[i + 1 :]).pow(2).flatten(2).mean(2).mean(1).double().numpy()
    return cost


def bellman_steps(cost: np.ndarray, n: int) -> list[int]:
    """The n-step path 0 -> M of least total cost (the Bellman recursion; GITS's dynamic program
    with weight 1, :func:`bench.schedules.gits_select`)."""
    return S.gits_select(cost, n, 1.0)


@register_method
class BOSS(MethodAdapter):
    name = "boss"
    family = "learned_solver"
    training = "params"
    paper = "Nguyen et al. 2023, Bellman Optimal Stepsize Straightening of Flow-Matching Models, arXiv 2312.16414"
    description = "Euler on step sizes chosen by dynamic programming over a fine Euler teacher trajectory (squared one-step error); the paper's fine-tuning stage not included; base euler"  # fmt: skip
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    knobs = (
        Knob(
            "fine_steps",
            int,
            200,
            "Euler steps of the teacher trajectory (the points the DP chooses from)",
            low=2,
            high=5000,
            trains=True,
        ),  # fmt: skip
        Knob("fine_schedule", str, "uniform", "schedule of the teacher's fine grid", choices=FINE_SCHEDULES, trains=True),
        Knob("rho", float, 7.0, "Karras rho (fine_schedule=karras)", low=1.0, high=20.0, trains=True),
        Knob("samples", int, 64, "teacher trajectories (training noise draws)", low=1, high=100_000, trains=True),
    )

    def fine_grid(self, bundle: ModelBundle) -> Grid:
        sch = bundle.denoiser.schedule
        c = self.config
        return Grid.from_times(sch, S.timesteps(c["fine_schedule"], sch, c["fine_steps"], pure_noise=True, rho=c["rho"]))

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = train_guidance(bundle, guidance, self.name)
        c = self.config
        rows = c["samples"] * c["fine_steps"] * (2 if w != 1.0 and bundle.num_classes else 1)
        return [artifact_spec(self, bundle, "cost", {"guidance": w}, budget={"teacher_rows": rows})]

    @torch.no_grad()
    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        bundle = ctx.bundle
        fine = self.fine_grid(bundle)
        frame = Frame(bundle.denoiser.schedule)
        tau = frame.tau(fine)
        n = self.config["samples"]
        trajs, slopes = [], []
        for lo in range(0, n, 64):
            z, cond = training_noise(bundle, min(64, n - lo), lo)
            ys, ds = [], []

            def record(info: dict[str, Any], ys: list = ys, ds: list = ds) -> None:
                i = info["i"]
                ys.append(frame.to_y(info["x"], float(fine.alpha[i])))
                ds.append(frame.slope(info["x0"], info["eps"]))

            end = sample_euler(ODEModel(bundle.denoiser, cond, float(spec.params["guidance"])), z, fine, callback=record)
            ys.append(end)  # alpha = 1 at the data end
            trajs.append(torch.stack(ys))
            slopes.append(torch.stack(ds))
            ctx.progress(min(lo + 64, n), n, what="teacher")
        cost = euler_costs(torch.cat(trajs, 1).double(), torch.cat(slopes, 1).double(), tau)
        np.save(ctx.out / COST_FILE, cost)
        ctx.note(samples_drawn=n)

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next((a for a in artifacts.values() if a.record.get("method") == self.name), None)
        if art is None:
            raise ValueError("boss: its cost artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        fine = self.fine_grid(bundle)
        if steps > fine.steps:
            raise ValueError(f"boss selects from {fine.steps} teacher steps; ask for at most that many steps")
        path = bellman_steps(np.load(art.path / COST_FILE), steps)
        grid = Grid.from_times(bundle.denoiser.schedule, fine.t[path])
        self.grid = grid

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_euler(ODEModel(bundle.denoiser, cond, guidance), noise, grid)

        return Prepared(sampler, bundle.denoiser, info={"learned_params": steps - 1})
