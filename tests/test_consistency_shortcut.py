"""Shortcut models: the self-consistency target and the batch computed by hand, a fresh student is its
teacher, the step is the sampler's jump, the loss falls, the one-step map approaches the exact ODE map
of the mixture, and NFE is the step count with one row per sample."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_suite

import methods.consistency.shortcut as sc
from bench.denoiser import Denoiser, FlowSchedule
from bench.flowmap import sample_flow_map
from bench.models import build_model
from bench.registry import METHODS
from bench.suite import Job, ModelSpec
from bench.worker import run_job

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "flow"})
TINY = {"max_steps": 16, "lr": 1e-3, "batch_size": 64, "sc_fraction": 0.25}


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks train faster on one thread, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sc_job(steps: int, model: ModelSpec = GMM, n: int = 256, bs: int = 256, guidance: float = 1.0, **knobs) -> Job:
    k = tuple(sorted(METHODS.get("shortcut").resolve_knobs({**TINY, **knobs}).items()))
    return Job(model, "shortcut", k, steps, guidance, 0, n, bs)


def linear_velocity(x, t, cond, d):
    """s(x, t, d) = x / 2 + t / 1000 + 3 d / 1000, per row."""
    return x / 2 + (t / 1000 + 3 * d / 1000).to(x.dtype)[:, None]


def test_self_consistency_target_by_hand():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.float64)
    t = torch.tensor([800.0, 500.0], dtype=torch.float64)
    d = torch.tensor([250.0, 125.0], dtype=torch.float64)
    got = sc.self_consistency_target(linear_velocity, x, t, d, d, None)
    # row 0: s1 = x/2 + 0.8 + 0.75; x' = x - 0.25 s1; s2 = x'/2 + 0.55 + 0.75
    s1 = x[0] / 2 + 1.55
    s2 = (x[0] - 0.25 * s1) / 2 + 1.30
    torch.testing.assert_close(got[0], (s1 + s2) / 2, rtol=0, atol=1e-12)
    # row 1: s1 = x/2 + 0.5 + 0.375; x' = x - 0.125 s1; s2 = x'/2 + 0.375 + 0.375
    s1 = x[1] / 2 + 0.875
    s2 = (x[1] - 0.125 * s1) / 2 + 0.75
    torch.testing.assert_close(got[1], (s1 + s2) / 2, rtol=0, atol=1e-12)
    # the network is asked at d_in (0 at the flow-matching level), the half-steps are still of size d
    zero = sc.self_consistency_target(linear_velocity, x, t, d, torch.zeros(2, dtype=torch.float64), None)
    s1 = x[0] / 2 + 0.8
    torch.testing.assert_close(zero[0], (s1 + (x[0] - 0.25 * s1) / 2 + 0.55) / 2, rtol=0, atol=1e-12)


def test_batch_times_are_on_the_grids_of_their_step_sizes():
    g = torch.Generator().manual_seed(0)
    t, d_in, half, is_sc = sc.shortcut_times(4000, 1000, 16, g)
    fm = ~is_sc
    assert is_sc.sum() == 1000 and (d_in[fm] == 0).all() and (half[fm] == 0).all()
    assert set((t[fm] / 62.5).round().long().tolist()) == set(range(1, 17))  # t = j / M, j = 1..M
    assert set(d_in[is_sc].tolist()) == {1000.0, 500.0, 250.0, 125.0}  # shortcuts 1 ... 2/M
    assert torch.equal(half[is_sc], d_in[is_sc] / 2)
    q = t[is_sc] / d_in[is_sc]
    assert torch.equal(q, q.round()) and (q >= 1).all() and (t[is_sc] <= 1000).all()  # t - 2d >= 0 on the 2d grid


class _Linear(torch.nn.Module):
    def forward(self, x, t, cond=None, s=None, d=None):
        return linear_velocity(x, t, cond, d)


def test_shortcut_loss_assembles_flow_matching_and_self_consistency_rows_by_hand():
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = _Linear()
    got = sc.shortcut_loss(net, net, x0, None, torch.Generator().manual_seed(5), 0.5, 16)
    g = torch.Generator().manual_seed(5)
    t, d_in, half, is_sc = sc.shortcut_times(16, 8, 16, g)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    tf = (t / 1000)[:, None]
    xt = (1 - tf) * x0 + tf * eps
    want = eps - x0
    for i in torch.nonzero(is_sc).flatten().tolist():
        q = 0.0 if half[i] == 1000 / 16 else float(half[i])  # the finest half-step asks the flow-matching level
        h = float(half[i]) / 1000
        s1 = xt[i] / 2 + float(t[i]) / 1000 + 3 * q / 1000
        s2 = (xt[i] - h * s1) / 2 + (float(t[i]) / 1000 - h) + 3 * q / 1000
        want[i] = (s1 + s2) / 2
    pred = linear_velocity(xt, t, None, d_in)
    torch.testing.assert_close(got, ((pred - want) ** 2).mean(), rtol=1e-12, atol=0)
    assert any(half[is_sc] == 1000 / 16) and any(half[is_sc] > 1000 / 16)  # both kinds of half-step were checked


def test_a_fresh_student_is_its_teacher_and_jumps_by_its_step():
    b = build_model("digits-dit")
    student = sc.new_shortcut_student(b)
    x, t, c = torch.randn(3, 1, 16, 16), torch.tensor([1000.0, 600.0, 250.0]), torch.tensor([1, 2, 3])
    assert torch.equal(student(x, t, c, d=torch.tensor([1000.0, 500.0, 125.0])), b.denoiser.net(x, t, c))
    torch.nn.init.normal_(student.inner.embeds["d"][2].weight)
    d = torch.tensor([500.0, 250.0, 125.0])
    torch.testing.assert_close(student(x, t, c, s=t - d), student(x, t, c, d=d))  # the sampler's s is t - d
    assert not torch.equal(student(x, t, c, d=d), student(x, t, c, d=torch.zeros(3)))
    # the flow-map jump from t to s is the shortcut step x - (t - s)/1000 * s(x, t, t - s)
    den = Denoiser(student, "flow", FlowSchedule(), second_time=True)
    times = [1000.0, 500.0, 0.0]
    got = sample_flow_map(den, x, times, c, 1.0, None)
    with torch.no_grad():
        y = x - 0.5 * student(x, torch.full((3,), 1000.0), c, d=torch.full((3,), 500.0))
        y = y - 0.5 * student(y, torch.full((3,), 500.0), c, d=torch.full((3,), 500.0))
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)


def test_shortcut_loss_falls_and_its_one_step_map_approaches_the_exact_ode_map(home):
    """On the mixture (an MLP from scratch: the paper's setting), 400 steps: the recorded loss falls and
    one shortcut step lands far nearer the exact PF-ODE endpoint than one Euler step of the exact
    velocity (2.09); trained without its self-consistency rows (sc_fraction 0) it lands at 0.85."""
    b = build_model("gmm", dim=2, prediction="flow")
    suite = tiny_suite(["exact_mse"])
    row, _ = run_job(sc_job(1, train_steps=400), b, suite)
    euler, _ = run_job(Job(GMM, "euler", (), 1, 1.0, 0, 256, 256), b, suite)
    assert row["exact_mse"] < euler["exact_mse"] / 5, (row["exact_mse"], euler["exact_mse"])
    rec = json.loads((home / "artifacts" / row["artifact_id"] / "artifact.json").read_text())
    assert rec["cost"]["final_loss"] < 0.85 * rec["cost"]["first_loss"]  # flow matching keeps its variance
    assert rec["cost"]["teacher_rows"] == 0 and rec["cost"]["optimizer_steps"] == 400  # trained from data
    for steps in (2, 4, 8):  # the same artifact at every step count; one forward per step
        r, _ = run_job(sc_job(steps, train_steps=400), b, suite)
        assert r["nfe"] == steps and r["network_calls"] == steps and r["artifact_id"] == row["artifact_id"]


def test_one_row_per_sample_on_the_digits_transformer_and_guidance_one_only(home):
    b = build_model("digits-dit")
    dit = ModelSpec("digits-dit")
    knobs = {"train_steps": 1, "batch_size": 4}
    row, _ = run_job(sc_job(2, dit, n=8, bs=4, **knobs), b, tiny_suite())
    teacher, _ = run_job(Job(dit, "euler", (), 2, 1.0, 0, 8, 4), b, tiny_suite())
    assert row["nfe"] == 2.0 and row["network_calls"] == 4 == teacher["network_calls"]
    assert row["train_teacher_nfe"] == 0 and row["train_steps"] == 1
    with pytest.raises(ValueError, match="guidance 1"):
        METHODS.get("shortcut")(**knobs).artifacts(b, 2, 2.0)
    with pytest.raises(Exception, match="runs at 1/2/4/8 steps"):
        METHODS.get("shortcut")().check(b, 3)
