"""Latent adversarial diffusion distillation: the hinge losses' signs, which networks each loss
moves (by which parameters receive gradient), the frozen teacher features, a short real build whose
discriminator learns, and the jobs' NFE (= steps, one row per sample)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_suite

import methods.distillation.ladd  # noqa: F401  (registers ladd)
from bench.artifacts import ensure_all
from bench.models import build_model
from bench.registry import METHODS
from bench.students import new_student
from bench.suite import Job, ModelSpec
from bench.worker import run_job
from methods.distillation.ladd import (
    LADDLosses,
    TeacherFeatures,
    disc_times,
    feature_taps,
    hinge_d_loss,
    hinge_g_loss,
    new_discriminator,
)

TINY = {"pairs": 16, "teacher_steps": 2, "train_steps": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def unet():
    return build_model("digits-unet")


@pytest.fixture(scope="module")
def dit():
    return build_model("digits-dit")


def test_hinge_losses_have_the_right_signs():
    """D is paid for real logits above +1 and fake logits below -1; G for raising D on its samples."""
    assert float(hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0]))) == 0.0  # confident and right: nothing
    assert float(hinge_d_loss(torch.tensor([-1.0]), torch.tensor([1.0]))) == 4.0  # (1 + 1) + (1 + 1)
    assert float(hinge_d_loss(torch.zeros(3), torch.zeros(3))) == 2.0
    assert float(hinge_g_loss(torch.tensor([3.0, 1.0]))) == -2.0
    real, fake = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    hinge_d_loss(real, fake).backward()
    assert float(real.grad) < 0 < float(fake.grad)  # descending raises D(real), lowers D(fake)
    fake2 = torch.tensor([0.5], requires_grad=True)
    hinge_g_loss(fake2).backward()
    assert float(fake2.grad) < 0  # descending raises D(fake)


def _batch(bundle, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *bundle.sample_shape), generator=g).clamp(-1, 1)
    return x0, torch.arange(n) % 10, g


def _grads(params):
    """Which parameters received a gradient (a hinge loss's gradient in an output bias can cancel to 0)."""
    return [p.grad is not None for p in params]


def _norm(params):
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


@pytest.mark.parametrize("model", ["unet", "dit"])
def test_each_loss_moves_only_its_own_networks(model, request):
    """The discriminator's loss gives gradient to every head and to neither the student nor the teacher;
    the student's loss gives gradient to the student and to neither the heads nor the teacher. A step of
    each moves its logits the right way: D(real) - D(fake) up after the heads' step, D(fake) up after
    the student's step."""
    b = request.getfixturevalue(model)
    teacher_params = list(b.denoiser.net.parameters())
    assert not any(p.requires_grad for p in teacher_params)
    gen = new_student(b)
    disc = new_discriminator(b, 0)
    losses = LADDLosses(b, b.kind, [b.t_start / 2], disc)
    x0, cond, g = _batch(b)
    t = disc_times(b.denoiser.schedule, 4, g, 1.0, 1.0)
    eps_r, eps_f = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    x_hat = losses.fake(gen, x0, cond, torch.Generator().manual_seed(5))
    real_maps = losses.noised_features(x0, t, cond, eps_r)
    fake_maps = losses.noised_features(x_hat, t, cond, eps_f)
    assert len(real_maps) == len(feature_taps(b.denoiser.net)) == len(disc.heads)

    ld = losses.d_loss(real_maps, fake_maps, t, cond)
    ld.backward(retain_graph=True)
    assert all(_grads(disc.parameters())) and not any(_grads(gen.parameters()))
    assert all(p.grad is None for p in teacher_params)
    assert all(_norm(h.parameters()) > 0 for h in disc.heads)
    opt = torch.optim.SGD(disc.parameters(), lr=0.05)
    gap = lambda: float((disc(real_maps, t, cond) - disc(fake_maps, t, cond)).mean().detach())  # noqa: E731
    before = gap()
    opt.step()
    assert gap() > before

    disc.zero_grad(set_to_none=True)
    disc.requires_grad_(False)
    lg = losses.g_loss(fake_maps, t, cond)
    lg.backward()
    assert all(p.grad is None for p in disc.parameters()) and all(p.grad is None for p in teacher_params)
    assert all(_grads(gen.parameters())) and _norm(gen.parameters()) > 0
    # one small student step (D frozen) raises D on the student's samples of the same noise
    torch.optim.SGD(gen.parameters(), lr=1e-3).step()
    x_hat2 = losses.fake(gen, x0, cond, torch.Generator().manual_seed(5))  # the same time and noise
    after = float(losses.g_loss(losses.noised_features(x_hat2, t, cond, eps_f), t, cond))
    assert after < float(lg), (float(lg), after)


def test_teacher_features_are_the_teachers_blocks_frozen_and_leave_no_hooks(unet):
    """The features are the UNet's down-block and mid-block outputs (taken by hooks that are gone after
    the call); gradient reaches the input through them but no teacher weight."""
    net = unet.denoiser.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    feats = TeacherFeatures(net)
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    maps = feats(x, torch.tensor([300.0, 600.0]), torch.tensor([1, 2]))
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 8, 8), (64, 4, 4), (64, 4, 4), (64, 4, 4)]
    with torch.no_grad():  # the mid block's output is what the teacher's own forward computes there
        seen = {}
        h = net.unet.mid_block.register_forward_hook(lambda m, a, o: seen.setdefault("mid", o))
        net(x, torch.tensor([300.0, 600.0]), torch.tensor([1, 2]))
        h.remove()
    torch.testing.assert_close(maps[-1], seen["mid"])
    sum(m.square().sum() for m in maps).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_short_build_trains_the_heads_leaves_the_teacher_and_records_both_losses(home, unet):
    """A real build (digits-unet, 16 synthetic samples, 16 steps of 4; a one-step student, whose blurred
    teacher-initialised samples the heads can tell from the teacher's at low noise): the discriminator's
    hinge loss falls from 2 (a fresh head knows nothing); the teacher's weights are unchanged and frozen;
    the synthetic data is kd's pairs artifact; the teacher's rows are the pairs' plus two feature passes
    per sample (and the heads' sizing probe)."""
    before = {k: v.clone() for k, v in unet.denoiser.net.state_dict().items()}
    knobs = {**TINY, "teacher_steps": 4, "student_steps": 1, "disc_t_mean": -1.0, "train_steps": 16, "batch_size": 4,
             "disc_lr": 2e-3}  # fmt: skip
    ladd = METHODS.get("ladd")(**knobs)
    arts = ensure_all(ladd, unet, 1, 1.0)
    student = next(a for a in arts.values() if a.record["method"] == "ladd")
    pairs = next(a for a in arts.values() if a.record["name"] == "pairs")
    assert pairs.record["method"] == "kd"
    kd_pairs = METHODS.get("kd")(pairs=16, teacher_steps=4).pairs_spec(unet, 1.0)
    assert pairs.key == kd_pairs.key  # shared with kd's own jobs when the knobs agree
    cost = student.cost
    assert cost["disc_first_loss"] == pytest.approx(2.0, abs=0.3)
    assert cost["disc_final_loss"] < cost["disc_first_loss"] - 0.3, cost
    assert cost["optimizer_steps"] == 16 and cost["teacher_rows"] == 1 + 16 * 4 * 2
    assert student.chain_cost["teacher_rows"] == cost["teacher_rows"] + 16 * 4
    for k, v in unet.denoiser.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in unet.denoiser.net.parameters())
    info = json.loads((student.path / "student.json").read_text())
    assert info["grid"] == [999.0] and info["prediction"] == "eps"
    four = METHODS.get("ladd")(**TINY).artifacts(unet, 4, 1.0)[0]
    assert four.params["student_steps"] == 4  # the default grid: ADD's 999, 749, 499, 249 (checked in the jobs' test)


def test_ladd_jobs_run_steps_nfe_one_row_per_sample_on_one_student(home, dit):
    """At guidance 2, 1, 2 and 4 steps: NFE = steps with one network row per sample (the FLOPs of one
    student evaluation are half those of one guided teacher evaluation), all three from the same
    artifact, on ADD's grid; a step count off the trained grid is refused."""
    from bench.accounting import flops_of

    spec = ModelSpec("digits-dit")
    k = tuple(sorted(METHODS.get("ladd").resolve_knobs(TINY).items()))
    rows = {s: run_job(Job(spec, "ladd", k, s, 2.0, 0, 4, 4), dit, tiny_suite())[0] for s in (1, 2, 4)}
    for s, row in rows.items():
        assert row["status"] == "ok", row["error"]
        assert row["nfe"] == s and row["network_calls"] == s and row["flops"] == s * rows[1]["flops"]
    assert len({r["artifact_id"] for r in rows.values()}) == 1
    prepared = METHODS.get("ladd")(**TINY).prepare(dit, 4, guidance=2.0)
    assert prepared.info["times"] == [1000.0, 750.0, 500.0, 250.0, 0.0]  # ADD's grid on the flow teacher
    assert prepared.denoiser.rows_per_sample(2.0, True) == 1
    x, t, c = torch.zeros(1, 1, 16, 16), torch.full((1,), 500.0), torch.tensor([3])
    assert 2 * flops_of(lambda: prepared.denoiser(x, t, c, 2.0)) == flops_of(lambda: dit.denoiser(x, t, c, 2.0))
    assert rows[1]["flops"] == flops_of(lambda: prepared.denoiser(x, t, c, 2.0))
    two = METHODS.get("ladd")(**{**TINY, "student_steps": 2})
    with pytest.raises(ValueError, match="not all on the trained grid"):
        two.prepare(dit, 4, guidance=2.0)
