"""AutoDiffusion-style search (Li et al. 2023): the evolutionary search finds the known optimum of a
toy objective and never ends worse than its initial population; on the exact mixture the searched
schedule improves the proxy over the base's own schedule, beats the base at 4 NFE on held-out seeds,
and records its search cost."""

from __future__ import annotations

import pytest

import methods.learned_solvers.autodiffusion as AD
import methods.solvers  # noqa: F401  (registers the base solvers)
from bench.accounting import ForwardCounter
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


def test_the_search_finds_a_toy_optimum():
    target = (3, 17, 28, 40)

    def fitness(c):
        return float(sum((a - b) ** 2 for a, b in zip(c, target, strict=True)))

    best, history, scored = AD.evolve(fitness, 50, 4, population=20, iterations=200, topk=5, mutation_prob=0.3, seed=0)
    assert best == target and history[-1] == 0.0
    assert all(b <= a for a, b in zip(history, history[1:], strict=False))  # elitist: never worse
    assert scored < 50**4 / 100  # far fewer than the space


def test_the_search_keeps_its_initial_candidate_when_nothing_beats_it():
    best, history, _ = AD.evolve(lambda c: 0.0 if c == (1, 2) else 1.0, 30, 2, 4, 3, 2, 0.2, 0, initial=[(1, 2)])
    assert best == (1, 2) and history == [0.0] * 4


def test_search_improves_on_the_base_schedule_and_beats_the_base(home):
    b = build_model("gmm", dim=2, prediction="eps")
    m = METHODS.get("autodiffusion")(population=8, iterations=4, calib_samples=32, teacher_steps=30)
    prep = m.prepare(b, 4, guidance=1.0)
    cost = prep.artifacts[0].record["cost"]
    assert cost["final_loss"] < cost["first_loss"]  # the proxy: searched vs the base's uniform schedule
    assert cost["search_evals"] > 8 and cost["teacher_rows"] >= 32 * 30 + cost["search_evals"] * 32 * 4
    assert prep.info["learned_params"] == 3
    gens = generators(0, range(128))  # evaluation seeds: suite seed 0
    z = noise(gens, b.sample_shape, b.dtype)
    errs = []
    for p in (prep, METHODS.get("dpmpp_2m")().prepare(b, 4)):
        with ForwardCounter(p.denoiser.net, keep_first=True) as c:
            c.arm()
            x = p(z, None, 1.0, gens)
        assert c.calls == 4
        xs, ts = c.first_inputs[0]
        exact = b.extra["mixture"].ode_endpoint(xs, b.denoiser.schedule, float(ts.flatten()[0]))
        errs.append(float(((x - exact) ** 2).mean()))
    assert errs[0] < errs[1]
