"""LCM (guided consistency distillation): the skip parametrisation's boundary condition, the target
built from the teacher's guided DDIM step at the student's own w, the skipping grid, a student that
learns the exact ODE map of the mixture, and one network row per sample at any w in its range."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_suite

import methods.consistency.lcm as lcm
from bench.denoiser import FlowSchedule, VPSchedule
from bench.models import build_model
from bench.registry import METHODS
from bench.suite import Job, ModelSpec
from bench.worker import run_job

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "eps"})
DIT = ModelSpec("digits-dit")
TINY = {"train_steps": 1, "batch_size": 4, "w_max": 4.0}


@pytest.fixture
def one_thread():
    """Training an MLP on 2-D points: one torch thread is faster, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lcm_job(model: ModelSpec, steps: int, guidance: float, n: int, bs: int, **knobs) -> Job:
    k = tuple(sorted(METHODS.get("lcm").resolve_knobs(knobs).items()))
    return Job(model, "lcm", k, steps, guidance, 0, n, bs)


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """The student with every weight moved (its zero-initialised w input included), so f depends on x, t and w."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False)


def test_boundary_condition_f_is_x_at_the_data_end_and_not_above_it():
    """f(x, t_data) = x bit for bit (c_skip = 1, c_out = 0) for any weights, on a VP mixture (an MLP
    student, no w) and the flow transformer (the teacher's network with a w input); above the data
    end f is the network's estimate, not x."""
    for name, opts in (("gmm", {"dim": 2, "prediction": "eps"}), ("digits-dit", {})):
        b = build_model(name, **opts)
        method = METHODS.get("lcm")()
        net = perturbed(method.new_net(b))
        sch = b.denoiser.schedule
        t_data = b.denoiser.t_data
        x = torch.randn(4, *b.sample_shape, dtype=b.dtype)
        cond = torch.arange(4) if b.num_classes else None
        w = torch.tensor([1.0, 2.0, 3.0, 4.0]) if b.num_classes else None
        pred = method.prediction_of(b)
        f0 = lcm.consistency_f(net, x, t_data, cond, w, pred, sch, t_data, 10.0)
        assert torch.equal(f0, x)
        for t in (t_data + 1.0, 500.0, b.t_start):
            ft = lcm.consistency_f(net, x, t, cond, w, pred, sch, t_data, 10.0)
            assert (ft - x).abs().max() > 1e-3
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([0.0, 1.0, 999.0]), 10.0)
    assert c_skip.tolist()[0] == 1.0 and c_out.tolist()[0] == 0.0
    assert c_skip[1] == pytest.approx(0.25 / 100.25) and c_out[1] == pytest.approx(10 / 100.25**0.5)


def test_skipping_grid_and_the_sampling_times():
    vp = lcm.skipping_grid(VPSchedule.linear(), 999.0, 20)
    assert vp.tolist() == [-1.0 + 20 * j for j in range(51)]
    flow = lcm.skipping_grid(FlowSchedule(), 1000.0, 250)
    assert flow.tolist() == [0.0, 250.0, 500.0, 750.0, 1000.0]
    assert lcm.sampling_times(vp, 1) == [999.0, -1.0]
    assert lcm.sampling_times(vp, 2) == [999.0, 499.0, -1.0]
    assert lcm.sampling_times(flow, 4) == [1000.0, 750.0, 500.0, 250.0, 0.0]
    with pytest.raises(ValueError, match="divide"):
        lcm.skipping_grid(VPSchedule.linear(), 999.0, 300)
    with pytest.raises(ValueError, match="1 to 4 steps"):
        lcm.sampling_times(flow, 5)


def test_the_target_is_the_target_networks_f_after_the_teachers_guided_ddim_step_at_the_students_w():
    """Row by row: the teacher's classifier-free-guided DDIM step t_{n+k} -> t_n at that row's w
    (bench's guided denoiser, one row at a time), then f of the target network at t_n with the same
    w. Leaving out the guidance, or giving the target another w, changes the target."""
    b = build_model("digits-dit")
    den = b.denoiser
    method = METHODS.get("lcm")()
    target = perturbed(method.new_net(b), seed=1)
    sch, t_data = den.schedule, den.t_data

    def f_target(x, t, cond, w):
        return lcm.consistency_f(target, x, t, cond, w, "flow", sch, t_data, 10.0)

    g = torch.Generator().manual_seed(0)
    x_hi = torch.randn(4, *b.sample_shape, generator=g)
    t_hi = torch.tensor([1000.0, 620.0, 240.0, 20.0], dtype=torch.float64)
    t_lo = t_hi - 20.0
    cond = torch.tensor([3, 1, 4, 1])
    w = torch.tensor([1.0, 2.5, 4.0, 3.0], dtype=torch.float64)
    got = lcm.lcm_target(den, f_target, x_hi, t_hi, t_lo, cond, w)
    for i in range(4):
        xi, ci = x_hi[i : i + 1], cond[i : i + 1]
        step = den.jump(xi, float(t_hi[i]), float(t_lo[i]), ci, float(w[i]))  # the teacher's guided DDIM step
        want = f_target(step, float(t_lo[i]), ci, float(w[i]))
        torch.testing.assert_close(got[i : i + 1], want, atol=2e-5, rtol=1e-4)
    unguided = lcm.lcm_target(den, f_target, x_hi, t_hi, t_lo, cond, torch.ones(4, dtype=torch.float64))
    assert (unguided[1:] - got[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3

    def f_wrong_w(x, t, cond, w):
        return f_target(x, t, cond, torch.ones_like(w))

    other = lcm.lcm_target(den, f_wrong_w, x_hi, t_hi, t_lo, cond, w)
    assert (other[1:3] - got[1:3]).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # (row 3 lands on the data end: f = x)


def test_lcm_loss_falls_and_the_one_step_student_approaches_the_exact_ode_map_on_gmm(home, one_thread):
    """exact_mse to the exact PF-ODE endpoint of the same noise falls more than 10x with training
    (the MLP student starts from scratch), and the recorded training loss falls."""
    b = build_model("gmm", dim=2, prediction="eps")
    suite = tiny_suite(["exact_mse"])
    knobs = {"batch_size": 128, "lr": 3e-3, "skip": 50, "target_ema": 0.5}
    early, _ = run_job(lcm_job(GMM, 1, 1.0, 128, 128, train_steps=2, **knobs), b, suite)
    late, _ = run_job(lcm_job(GMM, 1, 1.0, 128, 128, train_steps=300, **knobs), b, suite)
    assert early["exact_mse"] > 10 * late["exact_mse"], (early["exact_mse"], late["exact_mse"])
    rec = json.loads((home / "artifacts" / late["artifact_id"] / "artifact.json").read_text())
    assert rec["cost"]["final_loss"] < rec["cost"]["first_loss"] / 3
    assert rec["cost"]["teacher_rows"] == 300 * 128  # one unguided teacher row per training example
    teacher, _ = run_job(Job(GMM, "ddim", (), 1, 1.0, 0, 128, 128), b, suite)
    assert late["exact_mse"] < teacher["exact_mse"] / 10  # and beats the teacher's one DDIM step


def test_one_network_row_per_sample_at_any_w_in_the_range_one_artifact_for_all(home):
    """NFE = steps at guidance 1 and 3 from the same artifact; at 3 the teacher's Euler spends two rows
    per sample per step, the student one (half the FLOPs per step); a scale outside [w_min, w_max] is refused."""
    b = build_model("digits-dit")
    suite = tiny_suite()
    rows = {}
    for steps in (1, 2):
        for w in (1.0, 3.0):
            rows[steps, w], _ = run_job(lcm_job(DIT, steps, w, 8, 4, **TINY), b, suite)
            assert rows[steps, w]["nfe"] == steps and rows[steps, w]["network_calls"] == 2 * steps
    assert len({r["artifact_id"] for r in rows.values()}) == 1
    assert rows[1, 3.0]["flops"] == rows[1, 1.0]["flops"] and rows[2, 3.0]["flops"] == 2 * rows[1, 3.0]["flops"]
    teacher, _ = run_job(Job(DIT, "euler", (), 1, 3.0, 0, 8, 4), b, suite)
    assert teacher["flops"] > 1.9 * rows[1, 3.0]["flops"]  # (the student's w embedding adds a little)
    prepared = METHODS.get("lcm")(**TINY).prepare(b, 1, guidance=3.0)
    assert prepared.denoiser.guidance_embedded and prepared.denoiser.rows_per_sample(3.0, True) == 1
    z = torch.randn(2, *b.sample_shape)
    with pytest.raises(ValueError, match=r"guidance in \[1, 4\]; it cannot run at 5"):
        prepared(z, torch.tensor([0, 1]), 5.0, [torch.Generator() for _ in range(2)])
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        METHODS.get("lcm")(**TINY).artifacts(b, 1, 5.0)


def test_a_fresh_students_f_is_the_teachers_estimate_away_from_the_boundary(home):
    """Initialised from the teacher with a zero w input: on the flow teacher, at t_start the fresh
    student's f (c_skip ~ 0) is the teacher's conditional x0 estimate, whatever w it is given."""
    b = build_model("digits-dit")
    method = METHODS.get("lcm")()
    net = method.new_net(b).eval()
    x = torch.randn(3, *b.sample_shape)
    cond = torch.tensor([0, 5, 9])
    with torch.no_grad():
        f = lcm.consistency_f(net, x, 1000.0, cond, torch.tensor([1.0, 2.0, 3.0]), "flow", b.denoiser.schedule, 0.0, 10.0)
        x0 = b.denoiser.x0_eps(x, 1000.0, b.denoiser(x, 1000.0, cond))[0]
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([1000.0]), 10.0)
    torch.testing.assert_close(f, float(c_skip) * x + float(c_out) * x0, atol=1e-5, rtol=1e-5)
