"""Consistency distillation, consistency training, iCT and ECT (methods/consistency/cd, ct, ict, ect):
the skip parametrisation's boundary condition, each algorithm's pair and target by hand on the exact
mixture, the curricula and distances by hand, the losses falling, and a CD student approaching the
exact ODE map."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import random_bundle, tiny_suite

import methods.consistency.cd  # noqa: F401  (registers cd)
import methods.consistency.ct  # noqa: F401  (registers ct)
import methods.consistency.ect  # noqa: F401  (registers ect)
import methods.consistency.ict  # noqa: F401  (registers ict)
from bench import schedules as S
from bench.artifacts import ensure_all
from bench.models import build_model
from bench.registry import METHODS
from bench.suite import Job, ModelSpec
from bench.worker import run_job
from methods.consistency.cd import cd_loss, cd_pair
from methods.consistency.cm_common import (
    SIGMA_DATA,
    ConsistencyNet,
    karras_levels,
    lognormal_weights,
    noise_range,
    pseudo_huber,
    sampling_times,
    squared_l2,
    time_of,
    training_data,
)
from methods.consistency.ct import ct_levels, ct_loss, ct_mu, shared_noise_pair
from methods.consistency.ect import ect_loss, ect_r, ect_stage
from methods.consistency.ict import huber_c, ict_levels, ict_loss

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "eps"})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny MLP steps: one torch thread (two threads spin on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gmm(prediction: str = "eps"):
    return build_model("gmm", dim=2, prediction=prediction)


def mlp_student(bundle, seed: int = 0) -> ConsistencyNet:
    return METHODS.get("ct")(seed=seed).student(bundle)


# --- the skip parametrisation ----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gmm-raw", "unet-eps", "unet-x0", "unet-raw", "dit-flow", "dit-raw"])
def test_the_boundary_condition_holds_exactly_at_the_smallest_level(case):
    """f(x, t_min) is x itself (in the data frame x / alpha, bit for bit) whatever the network says,
    for a fresh network read raw and for a teacher copy read in its parametrisation; c_skip = 1 and
    c_out = 0 there. Away from eps a teacher copy is the teacher's denoiser (its output read right)."""
    model, read = case.split("-")
    bundle = gmm() if model == "gmm" else random_bundle("eps" if model == "unet" else "flow", seed=1)
    method = METHODS.get("cd" if read != "raw" else "ct")(**({"read": "x0"} if read == "x0" else {}))
    net = method.student(bundle)
    assert net.read == read
    sch = bundle.denoiser.schedule
    x = 3 * torch.randn(4, *bundle.sample_shape, dtype=bundle.dtype, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(4) if bundle.num_classes else None
    t = torch.full((4,), S.t_min(sch), dtype=torch.float64)
    _, sb, c_skip, c_out, _, _ = net.coefficients(t)
    assert torch.all(c_skip == 1.0) and torch.all(c_out == 0.0) and torch.all(sb == noise_range(sch)[0])
    with torch.no_grad():
        f = net(x, t, cond)
        a = sch.alpha_sigma(t)[0].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        assert torch.equal(f, x / a)
        if read in ("eps", "flow"):  # t = 500: c_skip ~ 0, the EDM ratio ~ 1 - eps/sigma_bar: the teacher's x0
            t5 = torch.full((4,), 500.0, dtype=torch.float64)
            d = bundle.denoiser.x0_eps(x, t5, bundle.denoiser(x, t5, cond))[0]
            assert (net(x, t5, cond) - d).abs().max() < 0.02 * d.abs().max()


def test_the_skip_coefficients_are_the_papers():
    """c_skip = sd^2 / ((s - eps)^2 + sd^2), c_out = sd (s - eps) / sqrt(s^2 + sd^2) at a level s."""
    net = mlp_student(gmm())
    t = torch.tensor([123.0], dtype=torch.float64)
    _, sb, c_skip, c_out, c_skip_edm, ratio = net.coefficients(t)
    s, e, sd = float(sb), net.eps, SIGMA_DATA
    assert float(c_skip) == pytest.approx(sd**2 / ((s - e) ** 2 + sd**2), rel=1e-12)
    assert float(c_out) == pytest.approx(sd * (s - e) / math.sqrt(s**2 + sd**2), rel=1e-12)
    assert float(c_skip_edm) == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
    assert float(ratio) == pytest.approx((s - e) / s, rel=1e-12)


def test_levels_and_sampling_times():
    """The Karras discretisation runs from eps to sigma_max (rho 7); the multistep sampler starts at
    sigma_max's time and re-noises to the Karras levels between (never to eps itself)."""
    sch = gmm().denoiser.schedule
    eps, smax = noise_range(sch)
    lv = karras_levels(eps, smax, 5)
    assert lv[0] == eps and lv[-1] == smax and torch.all(lv[1:] > lv[:-1])
    mid = (eps ** (1 / 7) + 0.5 * (smax ** (1 / 7) - eps ** (1 / 7))) ** 7
    assert float(lv[2]) == pytest.approx(mid, rel=1e-12)
    assert time_of(sch, lv)[0] == S.t_min(sch) and time_of(sch, lv)[-1] == S.t_max(sch, pure_noise=False)
    assert float(S.sigma_bar(sch, float(time_of(sch, lv)[2]))) == pytest.approx(mid, rel=1e-9)
    ts = sampling_times(sch, 2, "karras")
    assert ts[0] == 999.0 and ts[-1] == -1.0 and len(ts) == 3
    assert float(S.sigma_bar(sch, ts[1])) == pytest.approx(float(karras_levels(eps, smax, 3)[1]), rel=1e-9)
    assert sampling_times(sch, 4, "uniform") == [999.0, 749.0, 499.0, 249.0, -1.0]


# --- consistency distillation -----------------------------------------------------------------------


def hand_heun(mix, sch, x, t_hi, t_lo, flow: bool):
    """EDM's Heun step by hand from the exact posterior (VE frame on VP; s frame on flow)."""
    a1, s1 = sch.alpha_sigma(t_hi)
    a0, s0 = sch.alpha_sigma(t_lo)
    col = lambda v: v.reshape(-1, 1)  # noqa: E731
    x0a, ea, _ = mix.posterior(x, a1, s1)
    if flow:
        h = col(s0 - s1)
        xp = x + h * (ea - x0a)
        x0b, eb, _ = mix.posterior(xp, a0, s0)
        return x + h * 0.5 * ((ea - x0a) + (eb - x0b)), xp
    y = x / col(a1)
    h = col(s0 / a0 - s1 / a1)
    yp = y + h * ea
    x0b, eb, _ = mix.posterior(col(a0) * yp, a0, s0)
    return col(a0) * (y + h * 0.5 * (ea + eb)), col(a0) * yp


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_cd_pair_is_the_teachers_ode_step_from_the_perturbed_data(prediction):
    """x_{t_{n+1}} = alpha (x + sigma_{n+1} z); x_hat_{t_n} is the teacher's Heun step (and its
    Euler = DDIM step) from it, computed by hand from the mixture's exact posterior."""
    b = gmm(prediction)
    sch, mix = b.denoiser.schedule, b.extra["mixture"]
    g = torch.Generator().manual_seed(3)
    x0, z = mix.sample(16, g), torch.randn(16, 2, generator=g, dtype=torch.float64)
    lv = karras_levels(*noise_range(sch), 18)
    n = torch.randint(0, 17, (16,), generator=g)
    times = time_of(sch, lv)
    t_hi, t_lo = times[n + 1], times[n]
    x_hi, x_lo = cd_pair(b.denoiser, x0, None, z, t_hi, t_lo, 1.0, "heun")
    a, s = sch.alpha_sigma(t_hi)
    assert torch.allclose(x_hi, a[:, None] * (x0 + (s / a)[:, None] * z), rtol=1e-12, atol=1e-12)
    want, euler = hand_heun(mix, sch, x_hi, t_hi, t_lo, prediction == "flow")
    assert torch.allclose(x_lo, want, rtol=1e-10, atol=1e-10)
    _, x_lo_euler = cd_pair(b.denoiser, x0, None, z, t_hi, t_lo, 1.0, "euler")
    assert torch.allclose(x_lo_euler, euler, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(x_lo, x_lo_euler, atol=1e-6)  # the correction is there


def test_cd_target_is_the_ema_network_at_the_teachers_ode_step():
    """The loss is || f_theta(x_{t_{n+1}}) - f_theta-(Heun step) ||^2 with theta- the target network:
    equal to theta at the first step, then mu theta- + (1 - mu) theta after each optimiser step."""
    b = gmm()
    sch, mix = b.denoiser.schedule, b.extra["mixture"]
    net = mlp_student(b)
    mu, batch = 0.9, 8
    loss, extra = cd_loss(b.denoiser, net, training_data(b), 1.0, 18, mu, "heun", batch)
    target = extra["target"]

    def replay(seed: int, tgt) -> torch.Tensor:  # the same draws as the loss: data, n, z
        g = torch.Generator().manual_seed(seed)
        x0 = mix.sample(batch, g)
        n = torch.randint(0, 17, (batch,), generator=g)
        z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        times = time_of(sch, karras_levels(*noise_range(sch), 18))
        a, s = sch.alpha_sigma(times[n + 1])
        x_hi = a[:, None] * x0 + s[:, None] * z
        x_lo, _ = hand_heun(mix, sch, x_hi, times[n + 1], times[n], False)
        with torch.no_grad():
            return squared_l2(net(x_hi, times[n + 1]), tgt(x_lo, times[n])).mean()

    got = loss(net, torch.Generator().manual_seed(5)).detach()
    assert float(got) == pytest.approx(float(replay(5, net)), rel=1e-9)  # theta- = theta at the start
    before = copy.deepcopy(target)
    with torch.no_grad():  # an optimiser step
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    got = loss(net, torch.Generator().manual_seed(6)).detach()
    for pt, pb, p in zip(target.parameters(), before.parameters(), net.parameters(), strict=True):
        assert torch.allclose(pt, mu * pb + (1 - mu) * p, atol=1e-7)
    assert not all(torch.equal(pt, p) for pt, p in zip(target.parameters(), net.parameters(), strict=False))
    assert float(got) == pytest.approx(float(replay(6, target)), rel=1e-6)
    assert int(extra["count"]) == 2


def cd_job(train_steps: int, steps: int = 1, n: int = 128, **knobs) -> Job:
    base = {"train_steps": train_steps, "batch_size": 64, "lr": 2e-3, "levels": 12, "mu": 0.9, **knobs}
    k = tuple(sorted(METHODS.get("cd").resolve_knobs(base).items()))
    return Job(GMM, "cd", k, steps, 1.0, 0, n, n)


def test_cd_student_on_gmm_approaches_the_exact_ode_map(home):
    """exact_mse of the one-step student to the exact PF-ODE endpoint of the same noise falls more
    than 10x with training (2.1 after 2 optimiser steps, about 0.03 after 600); its training loss
    falls; NFE is the step count, one network row per sample, also at 2 steps."""
    b = gmm()
    suite = tiny_suite(["exact_mse"])
    early, _ = run_job(cd_job(2), b, suite)
    late, _ = run_job(cd_job(600), b, suite)
    assert early["exact_mse"] > 10 * late["exact_mse"], (early["exact_mse"], late["exact_mse"])
    rec = json.loads((home / "artifacts" / late["artifact_id"] / "artifact.json").read_text())
    assert rec["cost"]["final_loss"] < rec["cost"]["first_loss"] / 3
    assert rec["cost"]["teacher_rows"] == 600 * 64 * 2  # Heun: two teacher evaluations per example
    assert late["nfe"] == 1.0 and late["network_calls"] == 1 and late["train_steps"] == 600
    two, _ = run_job(cd_job(600, steps=2), b, suite)
    assert two["nfe"] == 2.0 and two["network_calls"] == 2 and two["artifact_id"] == late["artifact_id"]


# --- consistency training ---------------------------------------------------------------------------


def test_ct_pair_shares_its_noise_and_its_curriculum_is_the_papers():
    b = gmm("flow")
    sch = b.denoiser.schedule
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    t_hi, t_lo = torch.full((6,), 700.0, dtype=torch.float64), torch.full((6,), 300.0, dtype=torch.float64)
    x_hi, x_lo = shared_noise_pair(sch, x0, z, t_hi, t_lo)
    assert torch.allclose(x_hi, 0.3 * x0 + 0.7 * z, atol=1e-14) and torch.allclose(x_lo, 0.7 * x0 + 0.3 * z, atol=1e-14)
    # the paper's CIFAR-10 settings: s0 = 2, s1 = 150, mu0 = 0.9 over K = 800k
    K = 800_000
    assert ct_levels(0, K, 2, 150) == 2 and ct_levels(K, K, 2, 150) == 151
    assert ct_levels(K // 2, K, 2, 150) == math.ceil(math.sqrt(0.5 * (151**2 - 4) + 4) - 1) + 1 == 107
    assert ct_mu(2, 2, 0.9) == pytest.approx(0.9) and ct_mu(151, 2, 0.9) == pytest.approx(math.exp(2 * math.log(0.9) / 151))


def test_ct_loss_uses_the_shared_noise_pair_and_an_ema_target_at_mu_k():
    b = gmm()
    sch, mix = b.denoiser.schedule, b.extra["mixture"]
    net = mlp_student(b)
    K, batch = 10, 8
    loss, extra = ct_loss(b.denoiser, net, training_data(b), K, 2, 20, 0.9, batch)
    target = extra["target"]
    for k in range(3):
        before = copy.deepcopy(target)
        got = loss(net, torch.Generator().manual_seed(k)).detach()
        if k > 0:  # the target moved towards theta at the rate mu(k - 1)
            mu = ct_mu(ct_levels(k - 1, K, 2, 20), 2, 0.9)
            for pt, pb, p in zip(target.parameters(), before.parameters(), net.parameters(), strict=True):
                assert torch.allclose(pt, mu * pb + (1 - mu) * p, atol=1e-7)
        g = torch.Generator().manual_seed(k)
        N = ct_levels(k, K, 2, 20)
        x0 = mix.sample(batch, g)
        n = torch.randint(0, N - 1, (batch,), generator=g)
        z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        times = time_of(sch, karras_levels(*noise_range(sch), N))
        x_hi, x_lo = shared_noise_pair(sch, x0, z, times[n + 1], times[n])
        with torch.no_grad():
            want = squared_l2(net(x_hi, times[n + 1]), target(x_lo, times[n])).mean()
        assert float(got) == pytest.approx(float(want), rel=1e-9)
        with torch.no_grad():  # an optimiser step
            for p in net.parameters():
                p.add_(0.01)


# --- iCT ---------------------------------------------------------------------------------------------


def test_ict_pseudo_huber_curriculum_and_lognormal_levels_by_hand():
    a, b0 = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert float(pseudo_huber(a, b0, 0.5)) == pytest.approx(math.sqrt(25 + 0.25) - 0.5)
    assert float(pseudo_huber(a, b0, 0.0)) == pytest.approx(5.0)
    assert huber_c(0.00054, 3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))  # the paper's c on CIFAR-10: 0.03
    # Eq. 9 at the paper's settings (s0 = 10, s1 = 1280, K = 400k): K' = 50k, N doubles from 11 to 1281
    K = 400_000
    assert [ict_levels(k, K, 10, 1280) for k in (0, 49_999, 50_000, 100_000, 349_999, 350_000, 399_999)] == [
        11, 11, 21, 41, 641, 1281, 1281,
    ]  # fmt: skip
    lv = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    Phi = lambda s: math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0))  # noqa: E731
    raw = [Phi(0.5) - Phi(0.01), Phi(2.0) - Phi(0.5), Phi(80.0) - Phi(2.0)]
    want = torch.tensor(raw, dtype=torch.float64) / sum(raw)
    assert torch.allclose(lognormal_weights(lv, -1.1, 2.0), want, rtol=1e-12)


def test_ict_loss_is_the_weighted_pseudo_huber_to_the_stopgrad_student():
    """No EMA target: the target is the student itself; weight 1 / (sigma_{n+1} - sigma_n); n drawn
    from the lognormal weights over the N(k) levels."""
    b = gmm()
    sch, mix = b.denoiser.schedule, b.extra["mixture"]
    net = mlp_student(b)
    K, batch, c = 40, 16, 0.01
    loss, _ = ict_loss(b.denoiser, net, training_data(b), K, 4, 16, -1.1, 2.0, c, batch)
    for k in range(2):
        got = loss(net, torch.Generator().manual_seed(k)).detach()
        g = torch.Generator().manual_seed(k)
        N = ict_levels(k, K, 4, 16)
        lv = karras_levels(*noise_range(sch), N)
        times = time_of(sch, lv)
        x0 = mix.sample(batch, g)
        n = torch.multinomial(lognormal_weights(lv, -1.1, 2.0), batch, replacement=True, generator=g)
        z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        x_hi, x_lo = shared_noise_pair(sch, x0, z, times[n + 1], times[n])
        with torch.no_grad():
            d = pseudo_huber(net(x_hi, times[n + 1]), net(x_lo, times[n]), c)
            want = (d / (lv[n + 1] - lv[n])).mean()
        assert float(got) == pytest.approx(float(want), rel=1e-9)


# --- ECT ---------------------------------------------------------------------------------------------


def test_ect_mapping_stages_weighting_and_boundary_by_hand():
    t = torch.tensor([0.05, 1.0, 10.0], dtype=torch.float64)
    sig = lambda v: 1 / (1 + math.exp(v))  # noqa: E731  (sigmoid(-v))
    for stage in (0, 2):
        want = [max(0.0, float(v) * (1 - (1 + 8 * sig(float(v))) / 2 ** (stage + 1))) for v in t]
        assert torch.allclose(ect_r(t, stage, 2.0, 8.0, 1.0), torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    assert ect_r(t, 0, 2.0, 8.0, 1.0)[0] == 0.0  # stage 0 at small t: r clamps to 0 (denoising)
    assert [ect_stage(k, 100, 4) for k in (0, 24, 25, 50, 99)] == [0, 0, 1, 2, 3]

    b = gmm()
    sch, mix = b.denoiser.schedule, b.extra["mixture"]
    eps, smax = noise_range(sch)
    net = mlp_student(b)
    batch = 64
    loss, _ = ect_loss(b.denoiser, net, training_data(b), 100, 4, 2.0, 8.0, 1.0, -1.1, 2.0, 0.0, batch)
    got = loss(net, torch.Generator().manual_seed(0)).detach()
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(batch, g)
    tt = torch.exp(-1.1 + 2.0 * torch.randn(batch, generator=g, dtype=torch.float64)).clamp(eps, smax)
    r = ect_r(tt, 0, 2.0, 8.0, 1.0)
    z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    below = r < eps
    assert below.any() and (~below).any()  # both kinds of rows in this batch
    r = torch.where(below, 0.0, r)
    x_t, x_r = shared_noise_pair(sch, x0, z, time_of(sch, tt), time_of(sch, r.clamp(min=eps)))
    with torch.no_grad():
        y = torch.where(below[:, None], x0, net(x_r, time_of(sch, r.clamp(min=eps))))
        want = (pseudo_huber(net(x_t, time_of(sch, tt)), y, 0.0) / (tt - r)).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-9)


# --- every trainer's loss falls; guidance ------------------------------------------------------------

SHORT = {
    "ct": {"train_steps": 300, "batch_size": 64, "lr": 2e-3, "s1": 12},
    "ict": {"train_steps": 300, "batch_size": 64, "lr": 2e-3, "s0": 8, "s1": 8},
    "ect": {"train_steps": 300, "batch_size": 64, "lr": 2e-3, "stages": 1},
}
FALLS_TO = {"ct": 0.5, "ict": 0.9, "ect": 0.9}


@pytest.mark.parametrize("method", ["ct", "ict", "ect"])  # CD's: test_cd_student_on_gmm_approaches_the_exact_ode_map
def test_each_trainers_loss_falls_on_a_short_run(home, method):
    """First vs final loss (means over the first 5% and the last 100 steps) of a 300-step build on the
    mixture, at a fixed discretisation for iCT and ECT (their curricula change what the loss measures).
    The shared-noise losses have a floor (a single-noise pair is not on one ODE trajectory; iCT's and
    ECT's norms divided by the gap stay of order one at the optimum): they fall less than CD's."""
    m = METHODS.get(method)(**SHORT[method])
    (art,) = ensure_all(m, gmm(), 1, 1.0).values()
    cost = art.cost
    assert cost["optimizer_steps"] == 300 and cost["final_loss"] < FALLS_TO[method] * cost["first_loss"], cost
    assert cost["teacher_rows"] == 0  # trained from data: the teacher is never run


def test_a_conditional_cd_student_runs_one_row_per_sample_at_its_distilled_guidance(home):
    """On a class-conditional teacher at guidance 2 (two rows per teacher evaluation), the student
    distilled at 2 runs once per step: NFE = steps, one network call per batch and step, half the
    FLOPs of the teacher's guided step per evaluation; the teacher's CFG rows are its training cost."""
    from bench.suite import ModelSpec as Spec

    b = build_model("digits-dit")
    knobs = {"train_steps": 1, "batch_size": 2, "levels": 4}
    k = tuple(sorted(METHODS.get("cd").resolve_knobs(knobs).items()))
    row, _ = run_job(Job(Spec("digits-dit"), "cd", k, 2, 2.0, 0, 4, 4), b, tiny_suite())
    teacher, _ = run_job(Job(Spec("digits-dit"), "euler", (), 2, 2.0, 0, 4, 4), b, tiny_suite())
    assert row["nfe"] == 2.0 and row["network_calls"] == 2 and teacher["network_calls"] == 2
    assert row["flops"] * 2 == pytest.approx(teacher["flops"], rel=0.01)
    assert row["train_teacher_nfe"] == 1 * 2 * 2 * 2  # one step of 2 examples, Heun's 2 evaluations, cond + uncond


def test_students_from_scratch_share_no_weights_with_the_teacher():
    """CT and iCT train the teacher's architecture from fresh weights (every parameter re-drawn);
    CD and ECT start from the teacher's weights."""
    b = build_model("digits-dit")
    teacher = dict(b.denoiser.net.named_parameters())
    fresh = dict(METHODS.get("ict")().student(b).inner.named_parameters())
    assert fresh.keys() == teacher.keys()
    assert not any(torch.equal(p, teacher[k]) for k, p in fresh.items())
    tuned = dict(METHODS.get("ect")().student(b).inner.named_parameters())
    assert all(torch.equal(p, teacher[k]) for k, p in tuned.items())


def test_students_trained_from_data_run_at_guidance_1_only_and_cd_at_its_own():
    b = random_bundle("flow")
    with pytest.raises(ValueError, match="guidance 1 only"):
        METHODS.get("ct")().artifacts(b, 1, 2.0)
    (spec,) = METHODS.get("cd")().artifacts(b, 1, 2.0)
    assert spec.params["guidance"] == 2.0 and spec.budget["teacher_rows"] == 600 * 32 * 2 * 2
    assert METHODS.get("ect")().training == "finetune" and METHODS.get("ict")().training == "full"
