"""AutoDiffusion-style timestep search (Li et al. 2023, "AutoDiffusion: Training-Free Optimization of
Time Steps and Architectures for Automated Diffusion Model Acceleration", arXiv 2309.10438).

A K-step schedule of a base solver (DPM-Solver++(2M) or Euler) is searched by the paper's
evolutionary algorithm: a population of candidate schedules (sorted sets of K - 1 interior times
chosen from the model's discrete timesteps, the first fixed at the base's start and the last at the
data end), scored by a quality proxy; each generation keeps the ``topk`` best, and breeds the
next population from them by crossover (each interior time drawn from one of two parents) and
mutation (each interior time replaced by a random one with probability ``mutation_prob``);
the best schedule seen wins. The architecture half of the paper's search space (skipping network
blocks) is not included: the network is frozen, only the schedule is searched.

Quality proxy (deviation, stated): the paper scores a candidate by FID of a small sample set
against real images; here the proxy is the mean squared distance of the candidate's samples from the
teacher's endpoints of the same noise (the base solver at ``teacher_steps``), on ``calib_samples``
training draws (own seeds, :mod:`methods.learned_solvers.trajectories`): it needs no data set and
applies to the exact mixture and to every model kind alike.

Training class ``params``: the search outputs K - 1 learned solver parameters (the interior times),
the same kind of O(1) solver parameters as BOSS's and LD3's schedules, chosen by optimising a quality
objective rather than read from calibration statistics (the ``calibration`` class here measures a
model and sets thresholds from it, optimising nothing). Its cost is on record like any build's:
every teacher and candidate evaluation counted by the harness, the candidates scored noted as
``search_evals``, the proxy of the initial and the final best as ``first_loss`` / ``final_loss``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np
import torch

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import VPSchedule
from bench.io import write_json
from methods.learned_solvers.trajectories import train_guidance, training_noise
from methods.solvers.core import Grid, ODEModel
from methods.solvers.dpmpp_2m import sample_dpmpp_2m
from methods.solvers.euler import sample_euler

SCHEDULE_FILE = "schedule.json"
BASES: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {  # sampler, may start a flow at s = 1
    "dpmpp_2m": (sample_dpmpp_2m, False),
    "euler": (sample_euler, True),
}


def _repair(times: list[int], n_free: int, n_cand: int, rng: np.random.Generator) -> tuple[int, ...]:
    """Sorted distinct candidate indices, topped up at random to ``n_free``."""
    out = set(times)
    while len(out) < n_free:
        out.add(int(rng.integers(n_cand)))
    return tuple(sorted(out))


def evolve(
    fitness: Callable[[tuple[int, ...]], float],
    n_cand: int,
    n_free: int,
    population: int,
    iterations: int,
    topk: int,
    mutation_prob: float,
    seed: int,
    initial: list[tuple[int, ...]] = (),  # type: ignore[assignment]
) -> tuple[tuple[int, ...], list[float], int]:
    """The paper's evolutionary search over sorted ``n_free``-subsets of ``range(n_cand)`` minimising
    ``fitness``: returns the best subset, the best fitness after each generation (the first entry:
    the initial population's) and the number of distinct candidates scored."""
    rng = np.random.default_rng(seed)
    scores: dict[tuple[int, ...], float] = {}

    def score(c: tuple[int, ...]) -> float:
        if c not in scores:
            scores[c] = float(fitness(c))
        return scores[c]

    pop = [tuple(c) for c in initial]
    while len(pop) < population:
        pop.append(_repair([], n_free, n_cand, rng))
    history = [min(score(c) for c in pop)]
    for _ in range(iterations):
        parents = sorted(set(pop), key=score)[:topk]
        children: list[tuple[int, ...]] = []
        while len(children) < population:
            if rng.random() < 0.5 and len(parents) > 1:  # crossover
                a, b = rng.choice(len(parents), 2, replace=False)
                pick = rng.random(n_free) < 0.5
                child = [parents[a][i] if pick[i] else parents[b][i] for i in range(n_free)]
            else:  # mutation
                child = list(parents[int(rng.integers(len(parents)))])
                for i in range(n_free):
                    if rng.random() < mutation_prob:
                        child[i] = int(rng.integers(n_cand))
            children.append(_repair(child, n_free, n_cand, rng))
        pop = parents + children
        history.append(min(score(c) for c in pop))
    best = min(scores, key=scores.__getitem__)
    return best, history, len(scores)


@register_method
class AutoDiffusion(MethodAdapter):
    name = "autodiffusion"
    family = "learned_solver"
    training = "params"
    paper = "Li et al. 2023, AutoDiffusion: Training-Free Optimization of Time Steps and Architectures for Automated Diffusion Model Acceleration, arXiv 2309.10438"  # fmt: skip
    description = "evolutionary search of the base solver's timesteps against a teacher-distance proxy on training draws (time steps only; no architecture search)"  # fmt: skip
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    knobs = (
        Knob("base", str, "dpmpp_2m", "the solver whose schedule is searched", choices=tuple(BASES), trains=True),
        Knob(
            "init_schedule",
            str,
            "uniform",
            "the base's schedule, one of the initial population",
            choices=tuple(s for s in S.SCHEDULES if s != "gits"),
            trains=True,
        ),  # fmt: skip
        Knob("population", int, 12, "candidates per generation", low=2, high=10_000, trains=True),
        Knob("iterations", int, 6, "generations", low=0, high=10_000, trains=True),
        Knob("topk", int, 4, "parents kept per generation", low=1, high=10_000, trains=True),
        Knob("mutation_prob", float, 0.25, "probability of replacing each time in a mutation", low=0.0, high=1.0, trains=True),
        Knob("calib_samples", int, 32, "training draws each candidate is scored on", low=1, high=100_000, trains=True),
        Knob(
            "teacher_steps", int, 50, "steps of the base solver that gives the teacher's endpoints", low=1, high=5000, trains=True
        ),
        Knob("seed", int, 0, "seed of the search", low=0, trains=True),
    )

    def candidates(self, bundle: ModelBundle) -> np.ndarray:
        """The interior times a schedule chooses from (descending): the VP model's integer timesteps
        below its start, or s = i / T on a flow."""
        sch = bundle.denoiser.schedule
        T = sch.num_train_timesteps
        if isinstance(sch, VPSchedule):
            return np.arange(T - 2, -1, -1, dtype=np.float64)
        return np.arange(T - 1, 0, -1, dtype=np.float64)

    def start(self, bundle: ModelBundle) -> float:
        return S.t_max(bundle.denoiser.schedule, BASES[self.config["base"]][1])

    def grid_of(self, bundle: ModelBundle, cand: np.ndarray, pick: tuple[int, ...]) -> Grid:
        sch = bundle.denoiser.schedule
        return Grid.from_times(sch, np.array([self.start(bundle), *cand[list(pick)], S.t_data(sch)]))

    def initial(self, bundle: ModelBundle, steps: int, cand: np.ndarray) -> tuple[int, ...]:
        """The base's own schedule as candidate indices (its interior times rounded to candidates;
        fewer than ``steps - 1`` when rounding merges two)."""
        c = self.config
        t = S.timesteps(c["init_schedule"], bundle.denoiser.schedule, steps, pure_noise=BASES[c["base"]][1])
        return tuple(sorted({int(np.argmin(np.abs(cand - v))) for v in t[1:-1]}))

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        if steps < 2:
            raise ValueError("autodiffusion searches the interior times of a schedule of at least 2 steps")
        w = train_guidance(bundle, guidance, self.name)
        c = self.config
        evals = c["population"] * (c["iterations"] + 1)
        rows = c["calib_samples"] * (c["teacher_steps"] + evals * steps) * (2 if w != 1.0 and bundle.num_classes else 1)
        return [artifact_spec(self, bundle, "schedule", {"guidance": w, "steps": steps}, budget={"teacher_rows": rows})]

    @torch.no_grad()
    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        steps, w = int(spec.params["steps"]), float(spec.params["guidance"])
        sample, pure = BASES[c["base"]]
        z, cond = training_noise(bundle, c["calib_samples"])
        model = ODEModel(bundle.denoiser, cond, w)
        sch = bundle.denoiser.schedule
        teacher_grid = Grid.from_times(sch, S.timesteps("uniform", sch, c["teacher_steps"], pure_noise=pure))
        teacher = sample(model, z, teacher_grid)
        cand = self.candidates(bundle)
        init = self.initial(bundle, steps, cand)
        evals = [0]

        def fitness(pick: tuple[int, ...]) -> float:
            evals[0] += 1
            ctx.progress(evals[0], c["population"] * (c["iterations"] + 1), what="search")
            x = sample(model, z, self.grid_of(bundle, cand, pick))
            return float((x - teacher).double().pow(2).mean())

        initial = [init] if len(init) == steps - 1 else []
        best, history, n_scored = evolve(
            fitness, len(cand), steps - 1, c["population"], c["iterations"], c["topk"], c["mutation_prob"], c["seed"], initial
        )
        times = [self.start(bundle), *cand[list(best)].tolist(), S.t_data(sch)]
        init_fit = fitness(initial[0]) if initial else float("nan")
        write_json(ctx.out / SCHEDULE_FILE, {"times": times, "history": history, "initial_fitness": init_fit})
        ctx.note(
            samples_drawn=c["calib_samples"],
            search_evals=n_scored,
            first_loss=init_fit if initial else history[0],
            final_loss=history[-1],
            loss_curve=history,
            learned_params=steps - 1,
        )

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next((a for a in artifacts.values() if a.record.get("method") == self.name), None)
        if art is None:
            raise ValueError("autodiffusion: its schedule artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        times = json.loads((art.path / SCHEDULE_FILE).read_text())["times"]
        grid = Grid.from_times(bundle.denoiser.schedule, np.asarray(times))
        self.grid = grid
        sample = BASES[self.config["base"]][0]

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample(ODEModel(bundle.denoiser, cond, guidance), noise, grid)

        return Prepared(sampler, bundle.denoiser, info={"learned_params": steps - 1})
