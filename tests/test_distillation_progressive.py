"""Progressive distillation (Salimans & Ho 2022): the x-target of two teacher DDIM steps computed by
hand, the truncated-SNR weight, which grid times the teacher and student are called at, the stage
chain and its cost, the loss falling, and a job's accounting (NFE = steps, one row per sample)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_suite
from torch import nn

import methods.distillation.progressive as pd  # noqa: F401  (registers the method)
from bench.adapter import MethodNotApplicable
from bench.artifacts import ensure_all
from bench.denoiser import Denoiser, VPSchedule
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.students import load_student, new_student
from bench.suite import Job, ModelSpec
from bench.worker import run_job

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "eps"})


class LinearEps(nn.Module):
    """A toy eps teacher: eps_hat(z) = k z."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x, t, cond=None):
        return self.k * x


# a toy 4-step DDPM schedule: alpha_bar at native t = -1, 0, 1, 2, 3
BETAS = (0.1, 0.2, 0.3, 0.4)
ALPHA_BAR = {-1: 1.0, 0: 0.9, 1: 0.9 * 0.8, 2: 0.9 * 0.8 * 0.7, 3: 0.9 * 0.8 * 0.7 * 0.6}


def test_the_x_target_of_two_teacher_ddim_steps_by_hand():
    """N = 2 on the toy schedule: the student's grid is 3, 1, -1 and the teacher's adds 2 and 0.
    With eps_hat = k z, a DDIM step t -> s multiplies z by f = alpha_s (1 - k sigma_t) / alpha_t + k sigma_s;
    x~ = (z'' - sigma''/sigma z) / (alpha'' - sigma''/sigma alpha) is the x that one step from z lands on z''."""
    k = 0.5
    den = Denoiser(LinearEps(k), "eps", VPSchedule(BETAS))
    grid = pd.teacher_grid(den, 2, 3.0)
    assert grid.tolist() == [3.0, 2.0, 1.0, 0.0, -1.0]

    def a(t):
        return math.sqrt(ALPHA_BAR[t])

    def s(t):
        return math.sqrt(1 - ALPHA_BAR[t])

    def f(t, u):
        return a(u) * (1 - k * s(t)) / a(t) + k * s(u)

    z = torch.tensor([[0.7, -1.3], [0.4, 2.0]], dtype=torch.float64)
    t, t_mid, t_next = (torch.tensor(v, dtype=torch.float64) for v in ([3.0, 1.0], [2.0, 0.0], [1.0, -1.0]))
    got = pd.two_step_x_target(den, lambda zz, tt: den(zz, tt), z, t, t_mid, t_next)
    # row 0: t = 3 -> 2 -> 1
    z2 = f(3, 2) * f(2, 1) * z[0]
    r = s(1) / s(3)
    want0 = (z2 - r * z[0]) / (a(1) - r * a(3))
    # row 1: t = 1 -> 0 -> data (sigma'' = 0, alpha'' = 1): the teacher's two-step endpoint
    want1 = f(1, 0) * f(0, -1) * z[1]
    torch.testing.assert_close(got, torch.stack([want0, want1]), rtol=1e-12, atol=1e-12)
    # one student DDIM step from z_t with x_hat = x~ (eps_hat from z and x~) lands where the teacher's two did
    eps0 = (z[0] - a(3) * want0) / s(3)
    torch.testing.assert_close(a(1) * want0 + s(1) * eps0, z2, rtol=1e-12, atol=1e-12)
    # not the teacher's x_hat after its two steps, nor one teacher step
    x_hat_after = (z2 - s(1) * k * z2) / a(1)
    assert not torch.allclose(got[0], x_hat_after)
    assert not torch.allclose(got[0], (z[0] - s(3) * k * z[0]) / a(3))


def test_truncated_snr_weight_and_the_weighted_loss_by_hand():
    den = Denoiser(LinearEps(0.0), "eps", VPSchedule(BETAS))
    t = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    w = pd.truncated_snr_weight(den, t, torch.zeros(3, 2))
    # SNR = alpha_bar / (1 - alpha_bar): 0.3024 / 0.6976 < 1 -> 1; 0.72 / 0.28; 0.9 / 0.1
    torch.testing.assert_close(w.flatten(), torch.tensor([1.0, 0.72 / 0.28, 9.0]), rtol=1e-6, atol=0)
    x_hat = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    x_tgt = torch.tensor([[0.0, 2.0], [1.0, 1.0], [1.0, 3.0]])
    want = (1.0 * (1 + 0) / 2 + 0.72 / 0.28 * (1 + 1) / 2 + 9.0 * (0 + 4) / 2) / 3
    assert float(pd.weighted_x_loss(x_hat, x_tgt, w)) == pytest.approx(want, rel=1e-6)


class Recorder(nn.Module):
    """An x0 network predicting ``m`` (DDIM with it is exact: x~ = m) that records its call times."""

    def __init__(self, m: float) -> None:
        super().__init__()
        self.m = m
        self.times: list[list[float]] = []
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond=None):
        self.times.append(t.tolist())
        return torch.full_like(x, self.m) + 0 * self.p


def test_a_stage_calls_the_teacher_at_a_grid_point_and_its_midpoint_and_the_student_at_the_grid_point():
    den = Denoiser(Recorder(0.0), "x0", VPSchedule.linear())
    teacher, student = Recorder(0.3), Recorder(0.5)
    data = lambda n, g: (torch.zeros(n, 2, dtype=torch.float64), None)  # noqa: E731
    loss = pd.pd_stage_loss(den, 2, 999.0, data, lambda z, t, c, w: teacher(z, t, c), lambda net, z, t, c, w: net(z, t, c), 64)
    value = loss(student, torch.Generator().manual_seed(0)).detach()
    (ts,) = student.times
    assert set(ts) == {999.0, 499.0}  # the student's 2-step grid, both points drawn
    first, second = teacher.times
    assert first == ts and second == [t - 250.0 for t in ts]  # the teacher's midpoints
    # x~ = 0.3 exactly (the constant x0 makes DDIM exact); the student says 0.5; weights max(SNR, 1)
    a, s = VPSchedule.linear().alpha_sigma(torch.tensor(ts, dtype=torch.float64))
    weight = torch.clamp(a**2 / s**2, min=1.0)
    assert float(value) == pytest.approx(float((weight * 0.2**2).mean()), rel=1e-6)


def test_stages_halve_the_steps_and_the_method_runs_below_its_start():
    assert pd.stage_steps(64, 1) == [32, 16, 8, 4, 2, 1]
    assert pd.stage_steps(64, 8) == [32, 16, 8]
    with pytest.raises(ValueError, match="runs at 1/2/4/8/16/32 steps, not 64"):
        pd.stage_steps(64, 64)
    with pytest.raises(ValueError, match="power of two"):
        pd.stage_steps(48, 3)
    cls = METHODS.get("progressive")
    assert cls.steps_supported == (1, 2, 4, 8, 16, 32)
    b = build_model("gmm", dim=2)
    small = cls(start_steps=8)
    assert small.steps_supported == (1, 2, 4)
    with pytest.raises(MethodNotApplicable):
        small.check(b, 8)


TINY = {"start_steps": 8, "train_steps": 20, "batch_size": 32, "lr": 3e-3, "ema": 0.0}


def test_each_stage_is_an_artifact_built_from_the_previous_one_with_the_chains_cost(home):
    b = build_model("gmm", dim=2, prediction="eps")
    method = METHODS.get("progressive")(**TINY)
    (spec,) = method.artifacts(b, 2, 1.0)
    assert [s.name for s in spec.chain()] == ["student-4", "student-2"]
    assert spec.parents[0].name == "student-4" and not spec.parents[0].parents
    arts = ensure_all(method, b, 2, 1.0)
    first, second = arts[spec.parents[0].key], arts[spec.key]
    assert second.record["parents"] == {"student-4": first.key}
    # every stage: 20 steps of 32 examples, two teacher evaluations each (the analytic model's for the
    # first stage, the previous student's for the second, counted as teacher forwards)
    for a in (first, second):
        assert a.cost["optimizer_steps"] == 20 and a.cost["teacher_rows"] == 20 * 32 * 2
    chain = second.chain_cost
    assert chain["optimizer_steps"] == 40 and chain["teacher_rows"] == 2 * 20 * 32 * 2
    assert chain["wall_s"] == pytest.approx(first.cost["wall_s"] + second.cost["wall_s"])
    # usable at its own step count: the 4-step job finds its artifact, already built, with its own cost
    (spec4,) = method.artifacts(b, 4, 1.0)
    assert spec4.key == first.key
    row, _ = run_job(Job(GMM, "progressive", tuple(sorted(method.config.items())), 2, 1.0, 0, 16, 16), b, tiny_suite())
    row4, _ = run_job(Job(GMM, "progressive", tuple(sorted(method.config.items())), 4, 1.0, 0, 16, 16), b, tiny_suite())
    assert row["train_steps"] == 40 and row4["train_steps"] == 20
    assert row["nfe"] == 2 and row4["nfe"] == 4
    # the second stage started from the first: its initial loss is far below a fresh student's
    assert second.cost["first_loss"] < first.cost["first_loss"] / 3


def test_the_stage_loss_falls_on_a_tiny_budget(home):
    """On gmm (exact teacher) one stage of 80 steps: the loss on a fixed batch falls several-fold."""
    b = build_model("gmm", dim=2, prediction="eps")
    knobs = {"start_steps": 2, "train_steps": 80, "batch_size": 64, "lr": 3e-3, "ema": 0.0}
    method = METHODS.get("progressive")(**knobs)
    (art,) = ensure_all(method, b, 1, 1.0).values()
    trained, _ = load_student(art, b)
    den = b.denoiser
    loss = pd.pd_stage_loss(
        den, 1, b.t_start, pd.training_data(b), lambda z, t, c, w: den(z, t, c), lambda n, z, t, c, w: n(z, t, c), 512
    )
    with torch.no_grad():
        before = float(loss(new_student(b, 0), torch.Generator().manual_seed(7)))
        after = float(loss(trained, torch.Generator().manual_seed(7)))
    assert after < before / 4, (before, after)
    assert art.cost["final_loss"] < art.cost["first_loss"] / 4


def test_a_job_counts_one_student_row_per_sample_per_step(home):
    """A stage distilled at guidance 2 on digits-dit: NFE = 2 steps, one row per sample (half the FLOPs
    of the teacher's guided Euler at 2 steps), and it refuses another guidance scale."""
    b = build_model("digits-dit")
    dit = ModelSpec("digits-dit")
    knobs = {"start_steps": 4, "train_steps": 1, "batch_size": 2}
    k = tuple(sorted(METHODS.get("progressive").resolve_knobs(knobs).items()))
    row, _ = run_job(Job(dit, "progressive", k, 2, 2.0, 0, 2, 2), b, tiny_suite())
    teacher, _ = run_job(Job(dit, "euler", (), 2, 2.0, 0, 2, 2), b, tiny_suite())
    assert row["nfe"] == 2.0 and teacher["nfe"] == 2.0
    assert row["network_calls"] == teacher["network_calls"] == 2  # 2 steps x 1 batch
    assert row["flops"] * 2 == teacher["flops"]
    # the first stage's teacher was guided: 2 teacher evaluations of 2 rows (cond + uncond) per example
    assert row["train_teacher_nfe"] == 1 * 2 * 2 * 2 and row["train_steps"] == 1
    prepared = METHODS.get("progressive")(**knobs).prepare(b, 2, guidance=2.0)
    assert prepared.denoiser.guidance_embedded and prepared.denoiser.rows_per_sample(2.0, True) == 1
    gens = generators(0, range(2))
    with pytest.raises(ValueError, match="distilled at guidance 2; it cannot run at 3"):
        prepared(noise(gens, b.sample_shape), torch.tensor([0, 1]), 3.0, gens)
