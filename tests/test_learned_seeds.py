"""AMED, BOSS and AutoDiffusion train on their own noise: every state their builds feed the network at the start
time is a training draw (seeds LEARNED_SEED), none the noise of any sample of any committed suite
or of suite seeds 0-9; structurally, sample_seed(LEARNED_SEED, k) = sample_seed(s, j) with
j, k < 1_000_003 and no wrap-around only when s = LEARNED_SEED, which no committed suite uses."""

from __future__ import annotations

import pytest
import torch
import yaml

import methods.learned_solvers.amed  # noqa: F401  (registers amed_solver, amed_plugin)
import methods.learned_solvers.autodiffusion  # noqa: F401
import methods.learned_solvers.boss  # noqa: F401
from bench.models import build_model
from bench.paths import REPO
from bench.registry import METHODS
from bench.schema import SuiteDoc
from bench.seeds import _MIX, generators, noise, sample_seed
from methods.learned_solvers.trajectories import LEARNED_SEED, MAX_TRAIN_DRAWS, training_noise


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


def suite_seeds() -> list[tuple[int, int]]:
    out = []
    for path in sorted((REPO / "suites").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        out.append((int(spec.get("seed", 0)), int(spec.get("n_samples", 1))))
    return out


def test_the_seed_arithmetic_keeps_training_and_evaluation_apart():
    suites = suite_seeds()
    assert suites and all(s != LEARNED_SEED for s, _ in suites)
    n_max = SuiteDoc.model_fields["n_samples"].metadata[-1].le  # the schema's largest n_samples
    assert n_max < _MIX and MAX_TRAIN_DRAWS <= _MIX
    assert (LEARNED_SEED + 1) * _MIX < 2**63 - 1  # no wrap-around: divmod(seed, _MIX) recovers (suite seed, k)
    for k in (0, 1, MAX_TRAIN_DRAWS - 1):
        assert divmod(sample_seed(LEARNED_SEED, k), _MIX) == (LEARNED_SEED, k)
    with pytest.raises(ValueError):
        training_noise(build_model("gmm", dim=2), 2, MAX_TRAIN_DRAWS - 1)


def test_builds_draw_only_training_noise(home, monkeypatch):
    """Every draw a build takes comes through ``training_noise`` (seeds LEARNED_SEED), and the first
    state each build feeds the network is one of them; none is an evaluation draw."""
    import methods.learned_solvers.amed as amed
    import methods.learned_solvers.autodiffusion as ad
    import methods.learned_solvers.boss as boss
    import methods.learned_solvers.trajectories as tr

    b = build_model("gmm", dim=2, prediction="eps")
    drawn: list[torch.Tensor] = []

    def spy(*args, **kw):
        z, cond = tr.training_noise(*args, **kw)
        drawn.append(z.clone())
        return z, cond

    monkeypatch.setattr(amed, "training_noise", spy)
    monkeypatch.setattr(boss, "training_noise", spy)
    monkeypatch.setattr(ad, "training_noise", spy)
    first: list[torch.Tensor] = []

    def hook(module, args):
        if len(first) < len(drawn):  # the first call after each draw
            first.append(args[0].detach().clone())

    h = b.denoiser.net.register_forward_pre_hook(hook)
    tiny = {"train_samples": 32, "train_steps": 3, "batch_size": 8}
    try:
        METHODS.get("amed_solver")(**tiny).prepare(b, 4, guidance=1.0)
        METHODS.get("amed_plugin")(**tiny).prepare(b, 4, guidance=1.0)
        METHODS.get("boss")(fine_steps=20, samples=32).prepare(b, 4, guidance=1.0)
        METHODS.get("autodiffusion")(population=4, iterations=1, calib_samples=32).prepare(b, 4, guidance=1.0)
    finally:
        h.remove()
    assert len(drawn) == 4 and len(first) == 4
    train = torch.cat(drawn)
    draws = noise(generators(LEARNED_SEED, range(32)), (2,), torch.float64)
    assert all(torch.equal(z, draws) for z in drawn)
    for x in first:  # up to the x -> x / alpha -> x round trip's last bits
        assert float((x - draws).abs().max()) < 1e-12
    evals = [noise(generators(s, range(min(n, 1000))), (2,), torch.float64) for s, n in {*suite_seeds(), *((s, 1000) for s in range(10))}]  # fmt: skip
    assert float(torch.cdist(train, torch.cat(evals)).min()) > 1e-6
