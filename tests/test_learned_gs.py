"""Generalized solver (GS) and GAS (Oganov et al. 2025): at its initial parameters the learned solver
is DPM-Solver++(2M) bit for bit (every model kind, float64 and float32, guided), the learned history
term is the one the paper defines, gradients are the true derivatives, the relativistic losses by
hand, the trainers' losses fall and beat the base solver on held-out seeds, and the training noise
is disjoint from every evaluation seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import random_bundle
from safetensors.torch import save_file
from torch import nn

import methods.learned_solvers.gs as gs
import methods.learned_solvers.ld3  # noqa: F401  (registers ld3, whose seeds are checked here too)
import methods.solvers  # noqa: F401  (registers the base and teacher solvers)
from bench.artifacts import Artifact
from bench.denoiser import Denoiser
from bench.models import ModelBundle, build_model
from bench.paths import REPO
from bench.registry import METHODS
from bench.seeds import _MIX, generators, noise, sample_seed
from bench.students import PAIR_SEED
from methods.solvers.core import Grid, ODEModel
from methods.solvers.dpmpp_2m import sample_dpmpp_2m

TINY = {"pairs": 64, "teacher_steps": 10, "train_steps": 30, "batch_size": 16, "lr": 2e-2}


class Reparam(nn.Module):
    """The gmm's exact network read out as a v or x0 prediction (to run every model kind)."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x, t, cond=None):
        a, s = self.inner.schedule.alpha_sigma(t)
        a, s = a.view(-1, 1), s.view(-1, 1)
        x0, eps, _ = self.inner.gmm.posterior(x, a.flatten(), s.flatten())
        return x0 if self.kind == "x0" else a * eps - s * x0


def gmm_kind(kind: str) -> ModelBundle:
    b = build_model("gmm", dim=2, prediction="flow" if kind == "flow" else "eps")
    if kind in ("eps", "flow"):
        return b
    den = Denoiser(Reparam(b.denoiser.net, kind), kind, b.denoiser.schedule)
    return ModelBundle(f"gmm-{kind}", den, b.sample_shape, b.data, None, weights_hash=f"gmm-{kind}")


@pytest.mark.parametrize("kind", ["eps", "v", "x0", "flow"])
@pytest.mark.parametrize("schedule", ["uniform", "karras", "logsnr", "ays"])
def test_initial_parameters_are_dpmpp_2m_bit_for_bit_on_gmm(kind, schedule):
    b = gmm_kind(kind)
    x = noise(generators(5, range(32)), (2,), torch.float64)
    for n in (1, 2, 3, 4, 6, 8):
        t = gs.base_grid(b, n, schedule, 7.0)
        with torch.no_grad():
            out = gs.sample_generalized(b.denoiser, x, gs.GeneralizedSolver(t))
        ref = sample_dpmpp_2m(ODEModel(b.denoiser), x, Grid.from_times(b.denoiser.schedule, t))
        assert torch.equal(out, ref), (kind, schedule, n, float((out - ref).abs().max()))


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_initial_parameters_are_dpmpp_2m_bit_for_bit_on_digits_networks_guided(kind):
    """float32 networks (the digits UNet and DiT, random weights), class labels, guidance 2.5."""
    b = random_bundle(kind)
    x = noise(generators(5, range(3)), b.sample_shape, torch.float32)
    cond = torch.tensor([1, 4, 7])
    for n, w in ((3, 1.0), (4, 2.5)):
        t = gs.base_grid(b, n, "uniform", 7.0)
        with torch.no_grad():
            out = gs.sample_generalized(b.denoiser, x, gs.GeneralizedSolver(t), cond, w)
        ref = sample_dpmpp_2m(ODEModel(b.denoiser, cond, w), x, Grid.from_times(b.denoiser.schedule, t))
        assert torch.equal(out, ref)


def _artifact_of(tmp_path: Path, solver: gs.GeneralizedSolver, method: str, guidance: float = 1.0) -> Artifact:
    save_file({k: v.contiguous() for k, v in solver.state_dict().items()}, str(tmp_path / gs.PARAMS_FILE))
    record = {"method": method, "name": "solver", "params": {"guidance": guidance}}
    return Artifact("k", tmp_path, record)


def test_the_registered_sampler_at_initial_parameters_is_the_registered_dpmpp_2m(tmp_path):
    """``gs``'s job sampler loaded from an artifact holding the initial parameters gives exactly what
    the ``dpmpp_2m`` users run gives, with the same NFE."""
    from bench.accounting import ForwardCounter

    b = build_model("gmm", dim=2, prediction="eps")
    for steps in (3, 5):
        for schedule in ("uniform", "karras"):
            adapter = METHODS.get("gs")(schedule=schedule)
            art = _artifact_of(tmp_path, gs.GeneralizedSolver(gs.base_grid(b, steps, schedule, 7.0)), "gs")
            prepared = adapter.make(b, steps, {"k": art})
            gens = generators(0, range(16))
            x = noise(gens, (2,), torch.float64)
            with ForwardCounter(b.denoiser.net) as cnt:
                out = prepared(x.clone(), None, 1.0, gens)
            ref = METHODS.get("dpmpp_2m")(schedule=schedule).prepare(b, steps)(x.clone(), None, 1.0, gens)
            assert torch.equal(out, ref) and cnt.calls == steps
            assert prepared.info["learned_params"] == 2 * steps * (steps + 1) // 2 + steps + steps - 1


def test_history_coefficients_add_what_the_paper_defines():
    """x_N = base + sum_j a_Nj x_j + c_Nj x0_j: set c on the first data prediction and a on the first
    point of the last step; the output moves by exactly those terms."""
    b = build_model("gmm", dim=2, prediction="eps")
    t = gs.base_grid(b, 4, "uniform", 7.0)
    solver = gs.GeneralizedSolver(t)
    x = noise(generators(1, range(8)), (2,), torch.float64)
    with torch.no_grad():
        base = gs.sample_generalized(b.denoiser, x, solver)
        a_last, c_last = solver.history(3)
        c_last[0] = 0.5
        a_last[0] = -0.25
        out = gs.sample_generalized(b.denoiser, x, solver)
    x0_first, _ = ODEModel(b.denoiser)(x, t[0])
    torch.testing.assert_close(out, base + 0.5 * x0_first - 0.25 * x, rtol=0, atol=1e-12)


def test_stick_breaking_times_move_and_stay_ordered():
    b = build_model("gmm", dim=2, prediction="eps")
    t = gs.base_grid(b, 5, "karras", 7.0)
    solver = gs.GeneralizedSolver(t)
    assert torch.equal(solver.times(), torch.as_tensor(t))
    with torch.no_grad():
        solver.theta.add_(torch.tensor([3.0, -3.0, 1.0, -2.0], dtype=torch.float64))
    moved = solver.times().detach().numpy()
    assert moved[0] == t[0] and moved[-1] == t[-1] and np.all(np.diff(moved) < 0)
    assert np.abs(moved - t).max() > 10


def test_gradients_are_the_derivatives_of_the_sampler():
    """Autograd through the straight-through coefficients equals central finite differences of the
    exact forward pass for each parameter group (flow gmm: a smooth schedule)."""
    b = build_model("gmm", dim=2, prediction="flow")
    solver = gs.GeneralizedSolver(gs.base_grid(b, 4, "uniform", 7.0))
    with torch.no_grad():
        solver.theta.add_(0.1)
        solver.dt.add_(0.05)
        solver.a.add_(0.01)
        solver.c.sub_(0.01)
    x = noise(generators(2, range(16)), (2,), torch.float64)
    target = noise(generators(3, range(16)), (2,), torch.float64)

    def f() -> torch.Tensor:
        return (gs.sample_generalized(b.denoiser, x, solver) - target).square().mean()

    f().backward()
    for p in (solver.theta, solver.dt, solver.a, solver.c):
        for k in (0, len(p) - 1):
            with torch.no_grad():
                p[k] += 1e-6
                up = float(f())
                p[k] -= 2e-6
                down = float(f())
                p[k] += 1e-6
            fd = (up - down) / 2e-6
            assert float(p.grad[k]) == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_relativistic_losses_by_hand():
    """GAS's losses (R3GAN): generator softplus(-(D(f) - D(r))); discriminator softplus(-(D(r) - D(f)))
    plus gamma/2 (R1 + R2), with R = |grad_x D|^2: for D(x) = w.x both penalties are |w|^2."""
    d_f, d_r = torch.tensor([0.3, -1.0]), torch.tensor([1.0, 0.5])
    torch.testing.assert_close(gs.relativistic_generator_loss(d_f, d_r), torch.log1p(torch.exp(-(d_f - d_r))))
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
    disc = nn.Sequential(lin, nn.Flatten(0))
    fake, real = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    loss = gs.relativistic_discriminator_loss(disc, fake, real, gamma=0.2)
    expect = float(torch.nn.functional.softplus(torch.tensor(-(2.0 - (-1.0))))) + 0.1 * (5.0 + 5.0)
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("method", ["gs", "gas"])
def test_trainer_loss_falls_and_beats_the_base_solver_on_held_out_seeds(home, method):
    b = build_model("gmm", dim=2, prediction="eps")
    adapter = METHODS.get(method)(**TINY)
    prepared = adapter.prepare(b, 4)
    rec = prepared.artifacts[-1].record
    cost = rec["cost"]
    assert cost["final_loss"] < 0.5 * cost["first_loss"], cost
    assert cost["learned_params"] == prepared.info["learned_params"] == 27
    if method == "gas":
        assert np.isfinite(cost["disc_final_loss"])
    gens = generators(0, range(256))  # an evaluation suite's seeds
    x = noise(gens, (2,), torch.float64)
    exact = b.extra["mixture"].ode_endpoint(x, b.denoiser.schedule, 999.0)
    learned = float((prepared(x.clone(), None, 1.0, gens) - exact).square().mean())
    base = float((METHODS.get("dpmpp_2m")().prepare(b, 4)(x.clone(), None, 1.0, gens) - exact).square().mean())
    assert learned < 0.5 * base, (learned, base)


def _suite_seeds() -> list[tuple[int, int]]:
    """(seed, n_samples) of every committed suite (the seed defaults to 0)."""
    out = []
    for path in sorted((REPO / "suites").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        out.append((int(spec.get("seed", 0)), int(spec.get("n_samples", 1))))
    return out


def test_training_seeds_are_disjoint_from_evaluation_seeds(home):
    """Every state a learned solver's build feeds the network at the start time (the teacher's pairs,
    the trainers' batches, GAS's discriminator fakes, LD3's slack points) is training noise: none is
    the noise of any sample of any committed suite, nor of seeds 0-9. Structurally: training draws
    are seeded sample_seed(PAIR_SEED, k), evaluation draws sample_seed(s, j) = s * _MIX + j; with
    j, k < _MIX (n_samples <= 1e6) and no wrap-around these are equal only if s = PAIR_SEED, which
    no committed suite uses."""
    suites = _suite_seeds()
    assert suites and all(s != PAIR_SEED for s, _ in suites)
    assert all(n < _MIX for _, n in suites) and PAIR_SEED * _MIX + _MIX < 2**63 - 1
    b = build_model("gmm", dim=2, prediction="eps")
    seen: list[torch.Tensor] = []

    def hook(module, args):
        x, t = args[0], args[1]
        if float(t.detach().flatten()[0]) == 999.0:
            seen.append(x.detach().clone())

    h = b.denoiser.net.register_forward_pre_hook(hook)
    try:
        for method in ("gs", "gas", "ld3"):
            METHODS.get(method)(**{**TINY, "train_steps": 5}).prepare(b, 3)
    finally:
        h.remove()
    train = torch.cat(seen)
    assert len(train) >= 64
    train_keys = {r.numpy().tobytes() for r in train}
    eval_keys: set[bytes] = set()
    for seed, n in {*suites, *((s, 1000) for s in range(10))}:
        ev = noise(generators(seed, range(min(n, 1000))), (2,), torch.float64)
        eval_keys |= {r.numpy().tobytes() for r in ev}
    assert not train_keys & eval_keys
    # and the training draws are the PAIR_SEED ones
    first = noise(generators(PAIR_SEED, range(4)), (2,), torch.float64)
    assert {r.numpy().tobytes() for r in first} <= train_keys
    assert sample_seed(PAIR_SEED, 0) not in {sample_seed(s, j) for s, n in suites for j in range(min(n, 1000))}


def test_solver_artifact_records_its_parameters_and_times(home):
    b = build_model("gmm", dim=2, prediction="flow")
    prepared = METHODS.get("gs")(**{**TINY, "train_steps": 5}).prepare(b, 3)
    art = prepared.artifacts[-1]
    info = json.loads((art.path / "solver.json").read_text())
    assert info["learned_params"] == 2 * 6 + 3 + 2
    assert len(info["times"]) == 4 and info["times"][0] == info["base_times"][0]
    assert [a.record["name"] for a in prepared.artifacts] == ["solver"]
    assert art.record["parents"]  # the shared teacher pairs


def test_a_job_row_carries_nfe_cost_and_learned_parameters(home):
    from helpers import tiny_suite

    from bench.suite import Job, ModelSpec
    from bench.worker import run_job

    b = build_model("gmm", dim=2, prediction="eps")
    for method, n_params in (("gs", 27), ("ld3", 4)):
        adapter = METHODS.get(method)(**{**TINY, "train_steps": 5})
        job = Job(
            ModelSpec("gmm", {"dim": 2, "prediction": "eps"}), method, tuple(sorted(adapter.config.items())), 4, 1.0, 0, 16, 16
        )
        row, _ = run_job(job, b, tiny_suite(metrics=("exact_mse",)))
        assert row["nfe"] == 4 and row["learned_params"] == n_params
        assert row["family"] == "learned_solver" and row["training"] == "params"
        assert row["train_cost_s"] > 0 and row["train_teacher_nfe"] >= TINY["pairs"] * TINY["teacher_steps"]
        assert len(row["artifact_id"].split(",")) == 1
