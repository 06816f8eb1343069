"""DMD2 (Yin et al. 2024b): the GAN losses have the right signs and each updates only its own networks
(the generator's loss reaches the generator, the classifier's the fake score's encoder and the
head), the classifier reads the fake score's bottleneck, the generator's training inputs at step k
are exactly what its sampler feeds it, the trainer learns the mixture on a tiny budget, and a job
runs at its native steps with one network row per sample."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import random_bundle, tiny_suite
from safetensors.torch import load_file

import methods.distillation.dmd2  # noqa: F401  (registers dmd2)
from bench.artifacts import ArtifactStore, BuildError, ensure
from bench.models import build_model
from bench.registry import METHODS
from bench.students import new_student
from bench.suite import Job, ModelSpec, expand, load_suite
from bench.worker import run_job
from methods.distillation.dmd2 import (
    DMD2Trainer,
    backward_simulation,
    bottleneck_features,
    discriminator_loss,
    generator_gan_loss,
    realism_logits,
    sample_generators,
)

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "eps"})
TINY = {"train_steps": 2, "batch_size": 64, "lr": 1e-3, "fake_lr": 1e-3}


@pytest.fixture(autouse=True)
def _one_thread():
    """These networks are small: one torch thread runs them no slower, and far faster on busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dmd2_job(steps: int, model: ModelSpec = GMM, guidance: float = 1.0, n: int = 256, bs: int = 256, **knobs) -> Job:
    k = tuple(sorted(METHODS.get("dmd2").resolve_knobs({**TINY, **knobs}).items()))
    return Job(model, "dmd2", k, steps, guidance, 0, n, bs)


# --- the GAN ---------------------------------------------------------------------------------------


def test_the_gan_losses_are_the_non_saturating_pair_with_the_right_signs():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  (softplus)
    want_d = (sp(-2.0) + sp(0.5) + sp(1.0) + sp(-3.0)) / 2  # -log D(real) - log(1 - D(fake))
    assert float(discriminator_loss(real, fake)) == pytest.approx(want_d)
    assert float(generator_gan_loss(fake)) == pytest.approx((sp(-0.5) + sp(3.0)) / 2)  # -log D(fake)
    # the classifier gains by calling real real and fake fake; the generator by being called real
    r, f = real.clone().requires_grad_(True), fake.clone().requires_grad_(True)
    discriminator_loss(r, f).backward()
    assert (r.grad < 0).all() and (f.grad > 0).all()
    f2 = fake.clone().requires_grad_(True)
    generator_gan_loss(f2).backward()
    assert (f2.grad < 0).all()


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_the_classifier_reads_the_fake_scores_bottleneck(kind):
    """UNet: the mid block's output (64 channels at 4x4); the DiT: its 64 image tokens after the last
    block (the class token left out), before the output norm."""
    b = random_bundle(kind)
    x, t, c = torch.randn(3, 1, 16, 16), torch.full((3,), 500.0), torch.tensor([0, 1, 2])
    h = bottleneck_features(b.denoiser.net, x, t, c)
    if kind == "eps":
        want, _ = _capture(b.denoiser.net.unet.mid_block, False, b.denoiser.net, x, t, c)
        assert h.shape == (3, 64, 4, 4)
    else:
        want, _ = _capture(b.denoiser.net.transformer.norm_out, True, b.denoiser.net, x, t, c)
        assert h.shape == (3, 64, 64)
    assert torch.equal(h, want)


def _capture(module, is_input, net, x, t, c):
    got = {}

    def hook(m, args, out=None):
        got["h"] = args[0] if is_input else out

    handle = module.register_forward_pre_hook(hook) if is_input else module.register_forward_hook(hook)
    with torch.no_grad():
        out = net(x, t, c)
    handle.remove()
    return got["h"], out


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_each_loss_updates_only_its_own_networks(kind):
    """The generator's loss (distribution matching + GAN) gives gradient to the generator and to no
    parameter of the fake score, its head or the teacher; the fake score's update (denoising +
    classifier loss) moves the fake score and the head, never the generator; the classifier's gradient
    reaches the fake score's encoder (down blocks) and not its decoder (up blocks), which the features skip."""
    b = random_bundle(kind)
    knobs = METHODS.get("dmd2").resolve_knobs({"batch_size": 2, "fake_updates": 1})
    trainer = DMD2Trainer(b, knobs, 2.0, 2)
    gen = new_student(b, 0)
    g = torch.Generator().manual_seed(0)

    l_dm, l_gan = trainer.generator_loss(gen, g)
    l_gan.backward(retain_graph=True)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert all(p.grad is None for p in trainer.fake.modules.parameters())
    assert all(p.grad is None for p in b.denoiser.net.parameters())
    gen.zero_grad(set_to_none=True)
    l_dm.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert all(p.grad is None for p in trainer.fake.modules.parameters())

    gen.zero_grad(set_to_none=True)
    g_before = [p.detach().clone() for p in gen.parameters()]
    f_before = [p.detach().clone() for p in trainer.fake.net.parameters()]
    h_before = [p.detach().clone() for p in trainer.head.parameters()]
    trainer.fake_update(gen, g)
    assert all(torch.equal(p, q) for p, q in zip(gen.parameters(), g_before, strict=True))
    assert all(p.grad is None for p in gen.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.fake.net.parameters(), f_before, strict=True))
    assert all(not torch.equal(p, q) for p, q in zip(trainer.head.parameters(), h_before, strict=True))

    # the classifier's own gradient: into the head and the fake score's encoder, not its decoder
    trainer.fake.opt.zero_grad(set_to_none=True)
    x, c = trainer.real.sample(2, g)
    t = torch.full((2,), 300.0, dtype=torch.float64)
    discriminator_loss(
        realism_logits(trainer.fake, trainer.head, x, c, t, torch.randn_like(x)),
        realism_logits(trainer.fake, trainer.head, x.flip(0), c, t, torch.randn_like(x)),
    ).backward()
    inner = trainer.fake.net.unet if kind == "eps" else trainer.fake.net.transformer
    enc = inner.down_blocks if kind == "eps" else inner.transformer_blocks
    dec = inner.up_blocks if kind == "eps" else inner.proj_out
    assert all(p.grad is not None for p in trainer.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert all(p.grad is None for p in dec.parameters())


# --- backward simulation ------------------------------------------------------------------------------


def network_inputs(net, fn) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x, t) of every forward of ``net`` while ``fn()`` runs."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = net.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach().clone(), a[1].clone())))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_the_generators_training_inputs_at_step_k_are_what_its_sampler_feeds_it(home):
    """A 4-step generator on gmm: for each step k drawn, the inputs the trainer gives the generator (the
    backward simulation from pure noise, then the step with gradient) equal, bit for bit, the network
    inputs of the job's own sampler at steps 0..k from the same noise and per-sample generators."""
    b = build_model("gmm", dim=2, prediction="eps")
    dmd2 = METHODS.get("dmd2")(**TINY)
    prepared = dmd2.prepare(b, 4, guidance=1.0)
    net = prepared.denoiser.net
    trainer = DMD2Trainer(b, dmd2.config, 1.0, 4)
    assert trainer.times == prepared.info["times"] == [999.0, 749.0, 499.0, 249.0, -1.0]
    seen_k: set[int] = set()
    for seed in range(40):
        if seen_k == {0, 1, 2, 3}:
            break
        calls = network_inputs(net, lambda s=seed: trainer.generate(net, 5, torch.Generator().manual_seed(s)))
        g = torch.Generator().manual_seed(seed)  # the trainer's draws, in its order: noise, step, re-noising
        z = torch.randn((5, 2), generator=g, dtype=torch.float64)
        k = int(torch.randint(0, 4, (1,), generator=g))
        gens = sample_generators(5, g)
        want = network_inputs(net, lambda z=z, gens=gens: prepared(z, None, 1.0, gens))
        assert len(calls) == k + 1 and len(want) == 4
        for (x, t), (xw, tw) in zip(calls, want[: k + 1], strict=True):
            assert torch.equal(x, xw) and torch.equal(t.double(), tw.double())
        seen_k.add(k)
    assert seen_k == {0, 1, 2, 3}


def test_backward_simulation_at_step_0_is_pure_noise_and_later_a_renoised_x0():
    b = build_model("gmm", dim=2, prediction="eps")
    den = b.denoiser
    z = torch.randn(4, 2, dtype=torch.float64)
    times = [999.0, 499.0, -1.0]
    assert backward_simulation(den, z, times, 0, None, 1.0, sample_generators(4, torch.Generator())) is z
    g1, g2 = sample_generators(4, torch.Generator().manual_seed(1)), sample_generators(4, torch.Generator().manual_seed(1))
    x1 = backward_simulation(den, z, times, 1, None, 1.0, g1)
    x0 = den.x0_eps(z, 999.0, den(z, 999.0))[0]
    a, s = den.alpha_sigma(499.0, x0)
    fresh = torch.stack([torch.randn(2, generator=gg, dtype=torch.float64) for gg in g2])
    torch.testing.assert_close(x1, a * x0 + s * fresh)  # the teacher here: predict x0, re-noise to t_1


# --- training and the job -------------------------------------------------------------------------------


def test_dmd2_learns_the_mixture_on_a_tiny_budget(home):
    """On gmm, a 2-step generator (backward simulation on): the recorded distribution-matching loss
    falls and the generator's samples approach the mixture (sliced Wasserstein)."""
    b = build_model("gmm", dim=2, prediction="eps")
    suite = tiny_suite(["swd"])
    knobs = {"lr": 1e-2, "fake_lr": 1e-2, "fake_updates": 2}
    early, _ = run_job(dmd2_job(2, train_steps=1, **knobs), b, suite)
    late, _ = run_job(dmd2_job(2, train_steps=150, **knobs), b, suite)
    assert late["swd"] < 0.85 * early["swd"], (early["swd"], late["swd"])
    rec = json.loads((home / "artifacts" / late["artifact_id"] / "artifact.json").read_text())
    cost = rec["cost"]
    assert cost["optimizer_steps"] == 150 and cost["samples_drawn"] == 150 * 64 * 3
    assert cost["dm_final_loss"] < cost["dm_first_loss"] / 10 and cost["final_loss"] < cost["first_loss"] / 10
    assert late["train_teacher_nfe"] == 150 * 64  # the real score's rows: one unguided batch per generator step


def test_dmd2_runs_at_its_native_steps_with_one_row_per_sample(home, tmp_path):
    """Distilled at w = 2, 2 steps: NFE 2 with one network row per sample (the teacher's guided
    2-step Euler spends twice the FLOPs), on a 2-step generator only; a suite expands it at 1, 2, 4."""
    b = build_model("digits-dit")
    dit = ModelSpec("digits-dit")
    knobs = {"train_steps": 1, "batch_size": 4, "fake_updates": 1}
    row, _ = run_job(dmd2_job(2, dit, 2.0, n=8, bs=4, **knobs), b, tiny_suite())
    teacher, _ = run_job(Job(dit, "euler", (), 2, 2.0, 0, 8, 4), b, tiny_suite())
    assert row["status"] == "ok", row.get("error")
    assert row["nfe"] == 2.0 and row["network_calls"] == 4 and row["flops"] * 2 == teacher["flops"]
    assert row["train_teacher_nfe"] == 4 * 2  # one guided real-score batch
    (tmp_path / "s.yaml").write_text(
        "models: [{name: gmm, options: {dim: 2}}]\nmethods: [dmd2]\nsteps: [1, 2, 3, 4]\nguidance: [1.0]\nmetrics: [swd]\n"
    )
    jobs, skipped = expand(load_suite(tmp_path / "s.yaml"))
    assert sorted(j.steps for j in jobs) == [1, 2, 4] and any("dmd2" in s and "[3]" in s for s in skipped)


def test_an_interrupted_build_resumes_to_the_same_generator(home, tmp_path, monkeypatch):
    """The fake score, its head and optimiser, and the loss records travel with the checkpoints: a build
    that dies after 6 of 10 generator steps resumes from step 6 (checkpoints every step at this budget)
    and ends with the weights of an uninterrupted build, bit for bit."""
    b = build_model("gmm", dim=2, prediction="eps")
    knobs = {**TINY, "train_steps": 10, "batch_size": 16, "fake_updates": 2}
    (spec,) = METHODS.get("dmd2")(**knobs).artifacts(b, 2, 1.0)
    whole = ensure(spec, b, ArtifactStore(tmp_path / "whole"))

    calls = {"n": 0}
    real_loss = DMD2Trainer.loss

    def dying(self, net, g):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("killed")
        return real_loss(self, net, g)

    monkeypatch.setattr(DMD2Trainer, "loss", dying)
    store = ArtifactStore(tmp_path / "resumed")
    with pytest.raises(BuildError, match="killed"):
        ensure(spec, b, store)
    monkeypatch.setattr(DMD2Trainer, "loss", real_loss)
    resumed = ensure(spec, b, store)
    assert [s["resumed_from_step"] for s in resumed.cost["sessions"]] == [0, 6]
    w1, w2 = load_file(str(whole.path / "student.safetensors")), load_file(str(resumed.path / "student.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    for k in ("dm_final_loss", "fake_final_loss", "gan_d_final_loss"):
        assert resumed.cost[k] == whole.cost[k], k


@pytest.mark.parametrize("output", ["teacher", "x0"])
def test_a_fresh_generator_is_the_teacher_in_its_own_parametrisation(output):
    """generator_output=teacher: an untrained generator's one step is the teacher's DDIM step from the
    same noise (DMD2 starts from the teacher); x0: the eps head read as x0, which is not."""
    b = random_bundle("eps")
    knobs = METHODS.get("dmd2").resolve_knobs({"generator_output": output})
    trainer = DMD2Trainer(b, knobs, 1.0, 1)
    x0, cond = trainer.generate(new_student(b, 0), 3, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    z = torch.randn((3, 1, 16, 16), generator=g)
    c = torch.randint(0, 10, (3,), generator=g)
    teacher = b.denoiser.x0_eps(z, 999.0, b.denoiser(z, 999.0, c))[0]
    assert torch.equal(cond, c)
    assert torch.allclose(x0, teacher, atol=1e-4) == (output == "teacher")
