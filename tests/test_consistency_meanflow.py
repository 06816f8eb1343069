"""MeanFlow: the target is the instantaneous velocity when r = t and the JVP identity's by hand
otherwise, the JVP matches finite differences through the digits transformer, the times are the
paper's, the loss falls and the one-step map approaches the exact ODE map of the mixture, NFE is the
step count with one row per sample, and the two registrations start where they say."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_suite

import methods.consistency.meanflow as mf
from bench.models import build_model
from bench.models.students import ExtraInputs, MLPStudent
from bench.registry import METHODS
from bench.suite import Job, ModelSpec
from bench.worker import run_job

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "flow"})
TINY = {"lr": 1e-3, "batch_size": 64}


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks train faster on one thread, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mf_job(steps: int, method: str = "meanflow", model: ModelSpec = GMM, n: int = 256, bs: int = 256, **knobs) -> Job:
    k = tuple(sorted(METHODS.get(method).resolve_knobs({**TINY, **knobs}).items()))
    return Job(model, method, k, steps, 1.0, 0, n, bs)


def _mlp_u():
    torch.manual_seed(0)
    net = ExtraInputs(MLPStudent(2), ("s",))
    torch.nn.init.normal_(net.embeds["s"][2].weight, std=0.3)  # r matters
    return lambda z, r, t: net(z, t * 1000, None, s=r * 1000)


def test_the_target_is_the_instantaneous_velocity_when_r_equals_t():
    u_fn = _mlp_u()
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    t = torch.rand(8, generator=g)
    u, dudt, tgt = mf.meanflow_target(u_fn, z, t, t, v)
    assert torch.equal(tgt, v) and dudt.abs().sum() > 0  # (t - r) du/dt vanishes, du/dt does not
    _, _, tgt2 = mf.meanflow_target(u_fn, z, 0.5 * t, t, v)
    assert not torch.allclose(tgt2, v)


def test_the_target_by_hand_on_an_analytic_average_velocity():
    """u(z, r, t) = z t^2 + r t: du/dt along (v, 0, 1) is v t^2 + 2 z t + r, so the target is
    v - (t - r)(v t^2 + 2 z t + r)."""
    g = torch.Generator().manual_seed(2)
    z, v = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64)
    r = t * torch.rand(6, generator=g, dtype=torch.float64)
    u, dudt, tgt = mf.meanflow_target(lambda zz, rr, tt: zz * tt[:, None] ** 2 + (rr * tt)[:, None], z, r, t, v)
    T, R = t[:, None], r[:, None]
    torch.testing.assert_close(u, z * T**2 + R * T, rtol=0, atol=1e-14)
    torch.testing.assert_close(dudt, v * T**2 + 2 * z * T + R, rtol=0, atol=1e-14)
    torch.testing.assert_close(tgt, v - (T - R) * (v * T**2 + 2 * z * T + R), rtol=0, atol=1e-14)


def test_the_jvp_matches_finite_differences_through_the_digits_transformer():
    """d/dh u(z + h v, r, t + h) at h = 0 by central differences, through the real network (its attention
    on the math kernel under forward-mode AD), with the r input trained away from zero. The time
    embedding's fastest sinusoid turns once per native time unit (1/1000 of t), so the difference
    step is small, and the error falls as h^2 until float32 rounding."""
    b = build_model("digits-dit")
    net = mf.new_meanflow_net(b)
    torch.nn.init.normal_(net.embeds["s"][2].weight, std=0.02)
    c = torch.tensor([3, 7])
    g = torch.Generator().manual_seed(3)
    z, v = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    t, r = torch.tensor([0.7, 0.4]), torch.tensor([0.2, 0.1])

    def u_fn(zz, rr, tt):
        return net(zz, tt * 1000, c, s=rr * 1000)

    _, dudt, _ = mf.meanflow_target(u_fn, z, r, t, v)

    def fd_error(h: float) -> float:
        with torch.no_grad():
            fd = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
        return float((fd - dudt).norm() / dudt.norm())

    coarse, fine = fd_error(1e-3), fd_error(1e-4)
    assert fine < 5e-3 and fine < coarse / 20, (coarse, fine)
    h = 1e-4
    # and the r input is in the function: differentiating in r instead gives something else
    with torch.no_grad():
        fd_r = (u_fn(z, r + h, t) - u_fn(z, r - h, t)) / (2 * h)
    assert float(fd_r.norm()) > 0


def test_times_are_logit_normal_pairs_with_three_quarters_at_r_equal_t():
    r, t = mf.sample_times(20000, torch.Generator().manual_seed(0), 0.25)
    assert (t >= r).all() and (t > 0).all() and (t < 1).all()
    assert abs(float((r == t).double().mean()) - 0.75) < 0.02
    logit = torch.logit(t[r == t])  # where r = t, t is the larger of two N(-0.4, 1) logits: mean -0.4 + 1/sqrt(pi)
    assert abs(float(logit.mean()) - (-0.4 + 1 / torch.pi**0.5)) < 0.03


def test_meanflow_loss_falls_and_its_one_step_map_approaches_the_exact_ode_map(home):
    """From scratch on the mixture, 300 steps: the loss falls, and one step z0 = z1 - u(z1, 0, 1) lands
    far nearer the exact PF-ODE endpoint of the same noise than one Euler step of the exact velocity."""
    b = build_model("gmm", dim=2, prediction="flow")
    suite = tiny_suite(["exact_mse"])
    row, _ = run_job(mf_job(1, train_steps=300), b, suite)
    euler, _ = run_job(Job(GMM, "euler", (), 1, 1.0, 0, 256, 256), b, suite)
    assert row["exact_mse"] < euler["exact_mse"] / 5, (row["exact_mse"], euler["exact_mse"])
    rec = json.loads((home / "artifacts" / row["artifact_id"] / "artifact.json").read_text())
    # the recorded loss (the r = t rows' error to v) falls towards flow matching's irreducible variance
    assert rec["cost"]["final_loss"] < 0.95 * rec["cost"]["first_loss"]
    assert rec["cost"]["teacher_rows"] == 0
    assert row["training"] == "full" and row["train_teacher_nfe"] == 0
    two, _ = run_job(mf_job(2, train_steps=300), b, suite)
    assert two["nfe"] == 2 and two["network_calls"] == 2 and row["nfe"] == 1


def test_the_finetuned_registration_starts_from_the_teacher_and_the_paper_one_from_scratch():
    b = build_model("digits-dit")
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([900.0, 300.0]), torch.tensor([0, 5])
    r = torch.tensor([100.0, 0.0])
    ft = METHODS.get("meanflow_ft")()._net(b, 0)
    assert torch.equal(ft(x, t, c, s=r), b.denoiser.net(x, t, c))  # u(z, r, t) = v_teacher(z, t)
    scratch = METHODS.get("meanflow")()._net(b, 0)
    assert not torch.allclose(scratch(x, t, c, s=r), b.denoiser.net(x, t, c), atol=1e-2)
    assert METHODS.entry("meanflow").meta["training"] == "full"
    assert METHODS.entry("meanflow_ft").meta["training"] == "finetune"


def test_one_row_per_sample_on_the_digits_transformer(home):
    b = build_model("digits-dit")
    dit = ModelSpec("digits-dit")
    row, _ = run_job(mf_job(2, "meanflow_ft", dit, n=8, bs=4, train_steps=1, batch_size=4), b, tiny_suite())
    assert row["nfe"] == 2.0 and row["network_calls"] == 4 and row["train_steps"] == 1
    with pytest.raises(ValueError, match="guidance 1"):
        METHODS.get("meanflow_ft")().artifacts(b, 1, 3.0)
