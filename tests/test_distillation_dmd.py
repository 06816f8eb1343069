"""DMD (Yin et al. 2024): the distribution-matching gradient is the paper's weighted score difference
(checked against exact scores of two analytic mixtures), the real score is the guided teacher and
the fake one unguided, the fake score trains on the generator's detached samples inside the loss,
the regression pairs are KD's, and the trainer learns the mixture on a tiny budget."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_suite
from torch import nn

import methods.distillation.dmd  # noqa: F401  (registers dmd)
from bench.artifacts import ensure
from bench.denoiser import Denoiser, VPSchedule
from bench.models import build_model
from bench.models.gmm import GaussianMixture, GMMNet, gmm_schedule
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.students import load_pairs, new_student
from bench.suite import Job, ModelSpec
from bench.worker import run_job
from methods.distillation.dmd import DMDTrainer, distribution_matching_loss

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "eps"})
TINY = {"pairs": 256, "teacher_steps": 8, "train_steps": 2, "batch_size": 64, "lr": 1e-3, "fake_lr": 1e-3}


@pytest.fixture(autouse=True)
def _one_thread():
    """These networks are small: one torch thread runs them no slower, and far faster on busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dmd_job(model: ModelSpec = GMM, guidance: float = 1.0, n: int = 256, bs: int = 256, **knobs) -> Job:
    k = tuple(sorted(METHODS.get("dmd").resolve_knobs({**TINY, **knobs}).items()))
    return Job(model, "dmd", k, 1, guidance, 0, n, bs)


# --- the distribution-matching gradient ------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_the_generator_gradient_is_the_weighted_score_difference_of_exact_scores(prediction):
    """Real and fake scores exact (two analytic mixtures): d loss / dx = w_t (s_fake - s_real) / numel
    with w_t = sigma_t^2 / alpha_t * D / ||x0_real - x||_1 (DMD's weighting), at every t of the batch."""
    sch = gmm_schedule(prediction)
    mix_real = GaussianMixture.preset(2)
    mix_fake = GaussianMixture(mix_real.w, mix_real.mu * 0.7 + 0.3, mix_real.var.sqrt() * 1.5)
    real = Denoiser(GMMNet(mix_real, sch), prediction, sch)
    fake = Denoiser(GMMNet(mix_fake, sch), prediction, sch)
    g = torch.Generator().manual_seed(0)
    x = mix_fake.sample(6, g).requires_grad_(True)
    t = torch.tensor([30.0, 150.0, 300.0, 500.0, 700.0, 950.0], dtype=torch.float64)
    eps = torch.randn(6, 2, generator=g, dtype=torch.float64)
    loss = distribution_matching_loss(x, None, real, fake, 1.0, g, t=t, eps=eps)
    (grad,) = torch.autograd.grad(loss, x)

    a, s = (v[:, None] for v in sch.alpha_sigma(t))
    x_t = a * x.detach() + s * eps
    x0_real, _, score_real = mix_real.posterior(x_t, a[:, 0], s[:, 0])
    _, _, score_fake = mix_fake.posterior(x_t, a[:, 0], s[:, 0])
    w_t = s**2 / a * 2 / (x0_real - x.detach()).abs().sum(1, keepdim=True)
    want = w_t * (score_fake - score_real) / x.numel()
    torch.testing.assert_close(grad, want, rtol=1e-7, atol=1e-12)
    assert (grad.abs() > 1e-6).all()  # the two mixtures differ everywhere: no vacuous zeros


class ToyGuidedNet(nn.Module):
    """eps = k[c] * x: a class-conditional eps network with a null class (2) for guidance."""

    def __init__(self, k: list[float]) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.k[cond][:, None] * x


def test_the_real_score_is_the_guided_teacher_and_the_fake_score_is_unguided():
    """At w = 3 the real x0 is read from u + 3 (c - u) of the teacher's eps; the fake one from the fake
    network's conditional output alone (a guided fake score would use its null-class row)."""
    sch = VPSchedule.linear()
    real = Denoiser(ToyGuidedNet([0.5, 0.8, 0.2]), "eps", sch, null_class=2)
    fake = Denoiser(ToyGuidedNet([0.9, 0.1, 5.0]), "eps", sch, null_class=2)
    x = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=torch.float64, requires_grad=True)
    cond = torch.tensor([0, 1])
    t = torch.tensor([400.0, 600.0], dtype=torch.float64)
    eps = torch.tensor([[0.3, -0.1], [1.0, 2.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(distribution_matching_loss(x, cond, real, fake, 3.0, None, t=t, eps=eps), x)

    a, s = (v[:, None] for v in sch.alpha_sigma(t))
    x_t = a * x.detach() + s * eps
    k_real = torch.tensor([0.2 + 3 * (0.5 - 0.2), 0.2 + 3 * (0.8 - 0.2)], dtype=torch.float64)[:, None]
    x0_real = (x_t - s * k_real * x_t) / a
    x0_fake = (x_t - s * torch.tensor([0.9, 0.1], dtype=torch.float64)[:, None] * x_t) / a
    want = (x0_fake - x0_real) / (x.detach() - x0_real).abs().mean(1, keepdim=True) / x.numel()
    torch.testing.assert_close(grad, want, rtol=1e-7, atol=1e-12)


# --- the trainer ------------------------------------------------------------------------------------


def test_the_fake_score_steps_on_detached_generator_samples_inside_the_loss(home):
    """One call of the loss: the fake score's weights move (its own optimiser step), the generator gets
    no gradient from that step, and the returned loss's gradient reaches the generator only."""
    b = build_model("gmm", dim=2, prediction="eps")
    dmd = METHODS.get("dmd")(**TINY)
    trainer = DMDTrainer(b, dmd.config, 1.0, load_pairs(ensure(dmd.pairs_spec(b, 1.0), b)))
    gen = new_student(b, 0)
    before = [p.detach().clone() for p in trainer.fake.net.parameters()]
    loss = trainer.loss(gen, torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in gen.parameters())  # the fake step's backward never reached G
    assert any(not torch.equal(p, q) for p, q in zip(trainer.fake.net.parameters(), before, strict=True))
    assert int(trainer.fake.done) == 1 and torch.isfinite(trainer.fake.losses[0])
    trainer.fake.opt.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None for p in gen.parameters())
    assert all(p.grad is None for p in trainer.fake.net.parameters())  # sg: no gradient into the fake score
    dm, reg = trainer.history[0]
    assert float(loss.detach()) == pytest.approx(float(dm) + 0.25 * float(reg))


def test_the_regression_pairs_are_kds_and_are_shared_with_it(home):
    b = build_model("digits-dit")
    knobs = {"teacher_solver": "dpmpp_2m", "teacher_steps": 7, "pairs": 33}
    (spec,) = METHODS.get("dmd")(**knobs).artifacts(b, 1, 2.0)
    (kd_spec,) = METHODS.get("kd")(**knobs, train_steps=5).artifacts(b, 1, 2.0)
    (pairs,) = spec.parents
    assert pairs.method == "kd" and pairs.name == "pairs" and pairs.key == kd_spec.parents[0].key
    assert spec.params["guidance"] == 2.0 and spec.budget["teacher_rows"] == 300 * 32 * 2  # the guided real score's rows
    (other,) = METHODS.get("dmd")(**knobs, reg_weight=0.5).artifacts(b, 1, 2.0)
    assert other.key != spec.key and other.parents[0].key == pairs.key  # a generator knob: the same pairs


def test_dmd_learns_the_mixture_and_its_regression_ties_noise_to_the_teachers_endpoint(home):
    """On gmm (tiny budget): every recorded loss falls; the generator's samples approach the mixture
    (sliced Wasserstein); with the regression the one-step map approaches the exact ODE endpoint of the
    same noise, which distribution matching alone does not do."""
    b = build_model("gmm", dim=2, prediction="eps")
    suite = tiny_suite(["swd", "exact_mse"])
    early, _ = run_job(dmd_job(train_steps=1), b, suite)
    late, _ = run_job(dmd_job(train_steps=300), b, suite)
    no_reg, _ = run_job(dmd_job(train_steps=300, reg_weight=0.0), b, suite)
    assert late["swd"] < early["swd"] / 2, (early["swd"], late["swd"])
    assert no_reg["swd"] < early["swd"] / 1.5, (early["swd"], no_reg["swd"])
    assert late["exact_mse"] < early["exact_mse"] / 3 and late["exact_mse"] < no_reg["exact_mse"] / 2
    rec = json.loads((home / "artifacts" / late["artifact_id"].split(",")[0] / "artifact.json").read_text())
    cost = rec["cost"]
    assert cost["final_loss"] < cost["first_loss"] and cost["optimizer_steps"] == 300
    for part in ("dm", "reg", "fake"):
        assert cost[f"{part}_final_loss"] < cost[f"{part}_first_loss"], part
    assert late["train_teacher_nfe"] == 256 * 8 + 300 * 64  # the pairs' solver steps + the real score's rows


def test_a_dmd_generator_runs_one_step_with_guidance_embedded(home):
    """Distilled at w = 3: NFE 1, one network row per sample (the teacher's guided step spends two)."""
    b = build_model("digits-dit")
    dit = ModelSpec("digits-dit")
    knobs = {"pairs": 8, "teacher_steps": 2, "train_steps": 1, "batch_size": 4}
    row, _ = run_job(dmd_job(dit, 3.0, n=8, bs=4, **knobs), b, tiny_suite())
    teacher, _ = run_job(Job(dit, "euler", (), 1, 3.0, 0, 8, 4), b, tiny_suite())
    assert row["status"] == "ok", row.get("error")
    assert row["nfe"] == 1.0 and row["network_calls"] == 2 and row["flops"] * 2 == teacher["flops"]
    assert row["train_teacher_nfe"] == 8 * 2 * 2 + 1 * 4 * 2  # guided pairs + one guided real-score batch
    prepared = METHODS.get("dmd")(**{**TINY, **knobs}).prepare(b, 1, guidance=3.0)
    assert prepared.denoiser.guidance_embedded and prepared.denoiser.rows_per_sample(3.0, True) == 1
    gens = generators(0, range(2))
    with pytest.raises(ValueError, match="distilled at guidance 3"):
        prepared(noise(gens, b.sample_shape), torch.tensor([0, 1]), 2.0, gens)


def test_the_generator_learning_rate_is_in_x0_units():
    """An eps generator's rate is scaled by alpha / sigma at its start time (x0 moves sigma / alpha per
    unit of eps: 157x at t = 999 of the linear schedule); x0 and flow outputs keep the knob's rate."""
    from methods.distillation.dmd import generator_lr

    unet, dit = build_model("digits-unet"), build_model("digits-dit")
    a, s = VPSchedule.linear().alpha_sigma(torch.tensor([999.0], dtype=torch.float64))
    assert generator_lr(unet, "eps", 999.0, 2e-4) == pytest.approx(2e-4 * float(a / s)) and float(s / a) > 150
    assert generator_lr(unet, "x0", 999.0, 2e-4) == 2e-4 and generator_lr(dit, "flow", 1000.0, 2e-4) == 2e-4
