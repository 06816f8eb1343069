"""CTM (consistency trajectory models): the jump G(x, t, s) is x itself at s = t, the sampler's jump
is G, the sampler is the paper's gamma-sampling, the soft consistency target is the target network's
jumps after the teacher's Heun steps (checked by hand on the exact mixture, VP and flow), the student
learns the exact ODE map, and one network row per sample."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_suite

import methods.consistency.ctm as ctm
from bench import schedules as S
from bench.flowmap import sample_flow_map
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise, noise_like
from bench.students import student_denoiser
from bench.suite import Job, ModelSpec
from bench.worker import run_job

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "eps"})
DIT = ModelSpec("digits-dit")
TINY = {"train_steps": 1, "batch_size": 4}


@pytest.fixture
def one_thread():
    """Training an MLP on 2-D points: one torch thread is faster, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ctm_job(model: ModelSpec, steps: int, guidance: float, n: int, bs: int, **knobs) -> Job:
    k = tuple(sorted(METHODS.get("ctm").resolve_knobs(knobs).items()))
    return Job(model, "ctm", k, steps, guidance, 0, n, bs)


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """The student with every weight moved (its zero-initialised s input included), so g depends on s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False)


def test_the_jump_from_t_to_t_is_x_itself_exactly():
    """G(x, t, t) = x bit for bit at every t (data end and pure noise included), on a VP mixture (MLP
    student) and the flow transformer, also row by row inside a batch of other jumps; G(x, t, s < t) is not x."""
    for name, opts in (("gmm", {"dim": 2, "prediction": "eps"}), ("digits-dit", {})):
        b = build_model(name, **opts)
        method = METHODS.get("ctm")()
        net = perturbed(method.new_net(b))
        sch, pred = b.denoiser.schedule, method.prediction_of(b)
        x = torch.randn(4, *b.sample_shape, dtype=b.dtype)
        cond = torch.arange(4) if b.num_classes else None
        for t in (b.denoiser.t_data, 0.0, 37.5, 500.0, b.t_start):
            assert torch.equal(ctm.jump(net, x, t, t, cond, pred, sch), x), (name, t)
        t = torch.tensor([b.t_start, 700.0, 300.0, 10.0], dtype=torch.float64)
        s = torch.tensor([b.t_start, 200.0, 300.0, b.denoiser.t_data], dtype=torch.float64)
        out = ctm.jump(net, x, t, s, cond, pred, sch)
        assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
        assert (out[1] - x[1]).abs().max() > 1e-2 and (out[3] - x[3]).abs().max() > 1e-3


def test_the_samplers_jump_is_G():
    """The student's denoiser (second_time) moves x from t to s by the same map as G: the sampler
    uses the CTM jump (x = (sigma_s/sigma_t) x_t + (alpha_s - alpha_t sigma_s/sigma_t) g)."""
    b = build_model("digits-dit")
    method = METHODS.get("ctm")()
    net = perturbed(method.new_net(b))
    den = student_denoiser(b, net, "flow", 2.0, second_time=True)
    x = torch.randn(3, *b.sample_shape)
    cond = torch.tensor([1, 2, 3])
    for t, s in ((1000.0, 400.0), (400.0, 0.0), (250.0, 249.0)):
        want = ctm.jump(net, x, t, s, cond, "flow", b.denoiser.schedule)
        torch.testing.assert_close(den.jump(x, t, s, cond, 2.0), want, atol=1e-5, rtol=1e-5)


def test_gamma_sampling_is_the_papers_algorithm():
    """Kim et al.'s Algorithm 1 written out in the VE frame (sigma_bar is the paper's t): jump to
    t~ = sqrt(1 - gamma^2) t_{n+1}, add sqrt(t_{n+1}^2 - t~^2) z; bench's sampler gives the same samples
    for gamma 0, 0.5 and 1 from the same per-sample noise."""
    b = build_model("gmm", dim=2, prediction="eps")
    sch = b.denoiser.schedule
    net = perturbed(METHODS.get("ctm")().new_net(b), scale=0.2)
    den = student_denoiser(b, net, "x0", 1.0, second_time=True)
    times = [999.0, 600.0, 150.0, 20.0, -1.0]
    for gamma in (0.0, 0.5, 1.0):
        gens = generators(7, range(16))
        z0 = noise(gens, (2,), torch.float64)
        got = sample_flow_map(den, z0.clone(), times, None, 1.0, gens, gamma=gamma)
        gens = generators(7, range(16))
        x = noise(gens, (2,), torch.float64)
        for t, t_next in zip(times, times[1:], strict=False):
            sb_next = float(S.sigma_bar(sch, t_next))
            sb_tilde = math.sqrt(1 - gamma**2) * sb_next
            t_tilde = float(S.time_of_sigma_bar(sch, sb_tilde)) if t_next != -1.0 else -1.0
            x = ctm.jump(net, x, t, t_tilde, None, "x0", sch)
            if t_next != -1.0 and gamma > 0:
                a_tilde = float(S.alpha_sigma(sch, t_tilde)[0])
                a_next = float(S.alpha_sigma(sch, t_next)[0])
                x_ve = x / a_tilde + math.sqrt(sb_next**2 - sb_tilde**2) * noise_like(x, gens)
                x = a_next * x_ve
        torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)  # (the MLP runs in float32)


def _hand_heun(mix, sch, x, t1, t2, flow):
    """EDM's Heun step on the exact mixture: in sigma_bar with x / alpha on VP, in s with x on flow."""

    def ab(t):
        a, s = sch.alpha_sigma(torch.tensor([t], dtype=torch.float64))
        return float(a), float(s)

    def drift(x, t):
        a, s = ab(t)
        x0, eps, _ = mix.posterior(x, torch.full((len(x),), a), torch.full((len(x),), s))
        return eps - x0 if flow else eps

    (a1, s1), (a2, s2) = ab(t1), ab(t2)
    if flow:
        d1 = drift(x, t1)
        return x + (s2 - s1) * 0.5 * (d1 + drift(x + (s2 - s1) * d1, t2))
    y, dt = x / a1, s2 / a2 - s1 / a1
    d1 = drift(x, t1)
    d2 = drift(a2 * (y + dt * d1), t2)
    return a2 * (y + dt * 0.5 * (d1 + d2))


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_the_soft_consistency_target_by_hand_on_the_exact_mixture(prediction):
    """x_target = G-(G-(Heun_teacher^k(x_t, t -> u), u, s), s, data) computed by hand with the exact
    posterior of the mixture and the target MLP's raw output as g; a different number of teacher
    steps or a target that skips the final map to data gives a different target."""
    b = build_model("gmm", dim=2, prediction=prediction)
    mix, sch, den = b.extra["mixture"], b.denoiser.schedule, b.denoiser
    flow = prediction == "flow"
    target = perturbed(METHODS.get("ctm")().new_net(b), seed=3, scale=0.2)
    pred = "x0" if prediction == "eps" else "flow"
    grid = ctm.ctm_grid(sch, b.t_start, 10)
    assert len(grid) == 11 and float(grid[0]) == b.t_start and float(grid[-1]) == den.t_data
    g = torch.Generator().manual_seed(0)
    x_t = 3 * torch.randn(4, 2, generator=g, dtype=torch.float64)
    n, k = torch.tensor([0, 2, 4, 5]), 3
    m = torch.tensor([3, 7, 10, 9])  # s: at u, between, the data end

    def g_target(x, t, s):
        return ctm.jump(target, x, t, s, None, pred, sch)

    got = ctm.ctm_target(den, g_target, x_t, grid, n, k, m, None, 1.0)

    def hand_G(x, t, s):
        a_t, sg_t = (float(v) for v in sch.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
        a_s, sg_s = (float(v) for v in sch.alpha_sigma(torch.tensor([s], dtype=torch.float64)))
        if s == t:
            return x
        tt = torch.tensor([t], dtype=torch.float64)
        raw = target(x, tt, None, s=torch.tensor([s], dtype=torch.float64))
        x0 = raw if pred == "x0" else x - sg_t * raw  # the flow velocity v = eps - x0: x0 = x - s v
        return (sg_s / sg_t) * x + (a_s - a_t * sg_s / sg_t) * x0

    for i in range(4):
        x = x_t[i : i + 1]
        for j in range(k):
            x = _hand_heun(mix, sch, x, float(grid[n[i] + j]), float(grid[n[i] + j + 1]), flow)
        u, s = float(grid[n[i] + k]), float(grid[m[i]])
        want = hand_G(hand_G(x, u, s), s, float(grid[-1]))
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-5, rtol=1e-5)
    fewer = ctm.ctm_target(den, g_target, x_t, grid, n, k - 1, m, None, 1.0)
    assert (fewer - got).abs().amax(1).min() > 1e-6

    def no_final_map(x, t, s):  # a target that stops at s instead of mapping on to the data end
        return x if float(s[0]) == float(grid[-1]) else g_target(x, t, s)

    short = ctm.ctm_target(den, no_final_map, x_t, grid, n, k, m, None, 1.0)
    assert (short[:2] - got[:2]).abs().amax(1).min() > 1e-6


def test_the_estimate_trains_the_student_through_the_frozen_target():
    """x_est = G-(G_theta(x_t, t, s), s, data): gradients reach the student's weights, not the target's."""
    b = build_model("gmm", dim=2, prediction="eps")
    sch = b.denoiser.schedule
    method = METHODS.get("ctm")()
    student = perturbed(method.new_net(b), seed=1).train().requires_grad_(True)
    target = perturbed(method.new_net(b), seed=2)
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.full((5,), 700.0, dtype=torch.float64)
    s = torch.tensor([500.0, 300.0, 100.0, 10.0, -1.0], dtype=torch.float64)

    def g(net):
        return lambda x, t, s: ctm.jump(net, x, t, s, None, "x0", sch)

    est = ctm.ctm_estimate(g(student), g(target), x, t, s, -1.0)
    torch.testing.assert_close(est, g(target)(g(student)(x, t, s), s, torch.full_like(s, -1.0)))
    est.square().sum().backward()
    assert all(p.grad is None for p in target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_ctm_loss_falls_and_the_one_step_student_approaches_the_exact_ode_map_on_gmm(home, one_thread):
    """exact_mse of the one-step jump to the exact PF-ODE endpoint of the same noise falls more than
    10x with training, below the teacher's one DDIM step; the training loss falls. (The analytic
    teacher has no weights: the student is an MLP from scratch, read as x0, which no eps reading at
    t = 999 can match in a few hundred steps.)"""
    b = build_model("gmm", dim=2, prediction="eps")
    suite = tiny_suite(["exact_mse"])
    knobs = {"batch_size": 128, "lr": 3e-3, "target_ema": 0.5, "prediction": "x0", "scales": 18}
    early, _ = run_job(ctm_job(GMM, 1, 1.0, 128, 128, train_steps=2, **knobs), b, suite)
    late, _ = run_job(ctm_job(GMM, 1, 1.0, 128, 128, train_steps=300, **knobs), b, suite)
    assert early["exact_mse"] > 10 * late["exact_mse"], (early["exact_mse"], late["exact_mse"])
    rec = json.loads((home / "artifacts" / late["artifact_id"] / "artifact.json").read_text())
    assert rec["cost"]["final_loss"] < rec["cost"]["first_loss"]
    teacher, _ = run_job(Job(GMM, "ddim", (), 1, 1.0, 0, 128, 128), b, suite)
    assert late["exact_mse"] < teacher["exact_mse"] / 10


def test_one_network_row_per_sample_and_nfe_is_steps(home):
    """NFE = steps; a student distilled at guidance 3 runs one row per sample per jump (as at 1), and
    refuses another scale."""
    b = build_model("digits-dit")
    suite = tiny_suite()
    rows = {}
    for steps in (1, 2):
        for w in (1.0, 3.0):
            rows[steps, w], _ = run_job(ctm_job(DIT, steps, w, 8, 4, **TINY), b, suite)
            assert rows[steps, w]["nfe"] == steps and rows[steps, w]["network_calls"] == 2 * steps
    assert rows[1, 3.0]["flops"] == rows[1, 1.0]["flops"] and rows[2, 1.0]["flops"] == 2 * rows[1, 1.0]["flops"]
    assert rows[1, 1.0]["artifact_id"] != rows[1, 3.0]["artifact_id"]  # one student per distilled scale
    prepared = METHODS.get("ctm")(**TINY).prepare(b, 2, guidance=3.0)
    assert prepared.denoiser.guidance_embedded and prepared.denoiser.second_time
    gens = generators(0, range(2))
    with pytest.raises(ValueError, match="distilled at guidance 3; it cannot run at 2"):
        prepared(noise(gens, b.sample_shape), torch.tensor([0, 1]), 2.0, gens)
