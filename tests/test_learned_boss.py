"""BOSS (Nguyen et al. 2023): the Bellman dynamic program recovers the known optimal steps of a toy
trajectory and equals brute force; the cost is the squared one-step Euler error; a tiny build on the
exact mixture beats its base (uniform Euler) at 4 NFE on held-out seeds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import methods.learned_solvers.boss as B
import methods.solvers  # noqa: F401  (registers the base solvers)
from bench.accounting import ForwardCounter
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


def piecewise_linear(kinks: list[int], M: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A trajectory over tau = M..0 (fine points 0..M) that is straight between ``kinks``; the slope at
    each point is that of the segment starting there, so one Euler step is exact exactly when no kink
    lies strictly between its ends."""
    g = torch.Generator().manual_seed(seed)
    tau = np.linspace(1.0, 0.0, M + 1)
    knots = [0, *kinks, M]
    pts = torch.randn(len(knots), 3, 2, generator=g, dtype=torch.float64)
    traj = torch.zeros(M + 1, 3, 2, dtype=torch.float64)
    slopes = torch.zeros(M, 3, 2, dtype=torch.float64)
    for a, b, pa, pb in zip(knots[:-1], knots[1:], pts[:-1], pts[1:], strict=True):
        v = (pb - pa) / (tau[b] - tau[a])
        for i in range(a, b + 1):
            traj[i] = pa + (tau[i] - tau[a]) * v
        for i in range(a, b):
            slopes[i] = v
    return traj, slopes, tau


def test_the_dp_finds_the_kinks_of_a_piecewise_linear_trajectory():
    traj, slopes, tau = piecewise_linear([13, 31, 44], 60)
    cost = B.euler_costs(traj, slopes, tau)
    assert cost[0, 13] < 1e-24 and cost[13, 31] < 1e-24 and cost[0, 31] > 1e-3
    assert B.bellman_steps(cost, 4) == [0, 13, 31, 44, 60]
    total = sum(cost[i, j] for i, j in itertools.pairwise(B.bellman_steps(cost, 4)))
    assert total < 1e-24


def test_the_dp_equals_brute_force_and_the_cost_is_the_squared_euler_error():
    traj, slopes, tau = piecewise_linear([3, 9], 14, seed=1)
    traj = traj + 0.05 * torch.randn(traj.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cost = B.euler_costs(traj, slopes, tau)
    i, j = 2, 7
    want = ((traj[i] + (tau[j] - tau[i]) * slopes[i] - traj[j]) ** 2).mean()
    assert cost[i, j] == pytest.approx(float(want), rel=1e-12)
    for n in (1, 2, 3, 5):
        best = min(
            (sum(cost[a, b] for a, b in itertools.pairwise((0, *mid, 14))), (0, *mid, 14))
            for mid in itertools.combinations(range(1, 14), n - 1)
        )
        path = B.bellman_steps(cost, n)
        assert sum(cost[a, b] for a, b in itertools.pairwise(path)) == pytest.approx(best[0], rel=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_boss_beats_uniform_euler_on_the_exact_mixture(home, prediction):
    b = build_model("gmm", dim=2, prediction=prediction)
    prep = METHODS.get("boss")(fine_steps=60, samples=32).prepare(b, 4, guidance=1.0)
    base = METHODS.get("euler")().prepare(b, 4)
    gens = generators(0, range(128))  # evaluation seeds: suite seed 0
    z = noise(gens, b.sample_shape, b.dtype)
    errs = []
    for p in (prep, base):
        with ForwardCounter(p.denoiser.net, keep_first=True) as c:
            c.arm()
            x = p(z, None, 1.0, gens)
        assert c.calls == 4
        xs, ts = c.first_inputs[0]
        exact = b.extra["mixture"].ode_endpoint(xs, b.denoiser.schedule, float(ts.flatten()[0]))
        errs.append(float(((x - exact) ** 2).mean()))
    assert errs[0] < errs[1]
    assert prep.info["learned_params"] == 3 and prep.artifacts[0].record["cost"]["teacher_rows"] == 32 * 60
