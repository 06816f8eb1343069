"""DPM-Solver-v3 (Zheng et al. 2023): with the degenerate statistics (l, s, b) = (1, 0, 0) the solver is
DPM-Solver++ (first order: bench's DDIM / flow Euler; second order: the phi_2 multistep by hand) and
with (0, -1, 0) multistep DPM-Solver; the derivative estimates and the EMS integrals on hand cases;
the statistics of a Gaussian match their closed forms; with them the first-order solver is exact on
an isotropic Gaussian; a build records its parameters and cost, draws only training noise, and beats
DPM-Solver++(2M) at 4 NFE on the exact mixture on held-out seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

import methods.learned_solvers.dpm_solver_v3 as V3
import methods.solvers  # noqa: F401  (registers the base solvers)
from bench import schedules as S
from bench.accounting import ForwardCounter
from bench.bundle import ModelBundle
from bench.denoiser import Denoiser, VPSchedule
from bench.models import build_model
from bench.models.gmm import GaussianMixture, GMMNet
from bench.paths import REPO
from bench.registry import METHODS
from bench.seeds import generators, noise
from methods.learned_solvers.trajectories import LEARNED_SEED, training_noise
from methods.solvers.core import Grid, ODEModel, phi
from methods.solvers.euler import sample_euler

FREE = {"order": 2, "corrector": "off", "predictor_pseudo": "off", "final": "denoise", "lower_order_final": False}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


def draws(bundle: ModelBundle, n: int = 64) -> tuple[torch.Tensor, list[torch.Generator]]:
    gens = generators(0, range(n))  # evaluation seeds: suite seed 0
    return noise(gens, bundle.sample_shape, bundle.dtype), gens


def gaussian_bundle(mu: list[float], std: list[float]) -> ModelBundle:
    f64 = torch.float64
    mix = GaussianMixture(torch.ones(1, dtype=f64), torch.tensor([mu], dtype=f64), torch.tensor([std], dtype=f64))
    sch = VPSchedule.linear()
    return ModelBundle("gauss", Denoiser(GMMNet(mix, sch), "eps", sch), (len(mu),), "vector", dtype=f64,
                       weights_hash=f"gauss-{mu}-{std}", arch="analytic")  # fmt: skip


# --- the degenerate statistics are the known solvers -------------------------------------------


@pytest.mark.parametrize("prediction,base", [("eps", "ddim"), ("flow", "euler")])
@pytest.mark.parametrize("schedule", ["logsnr", "uniform", "karras"])
def test_first_order_with_dpmpp_statistics_is_ddim(prediction, base, schedule):
    b = build_model("gmm", dim=2, prediction=prediction)
    z, gens = draws(b)
    v3 = METHODS.get("dpm_solver_v3")(**{**FREE, "order": 1}, ems="dpmpp", schedule=schedule).prepare(b, 5)
    assert v3.artifacts == () and v3.info["learned_params"] == 0
    if prediction == "flow":  # flow Euler is DDIM on the flow path; from s = 1 - 1/T, where v3 (as dpmpp_2m) starts
        t = S.timesteps(schedule, b.denoiser.schedule, 5, pure_noise=False)
        out_ref = sample_euler(ODEModel(b.denoiser), z.clone(), Grid.from_times(b.denoiser.schedule, t))
    else:
        out_ref = METHODS.get(base)(schedule=schedule).prepare(b, 5)(z.clone(), None, 1.0, gens)
    torch.testing.assert_close(v3(z.clone(), None, 1.0, gens), out_ref, rtol=1e-10, atol=1e-10)


def hand_multistep(b: ModelBundle, z: torch.Tensor, t: np.ndarray, kind: str) -> torch.Tensor:
    """Second-order multistep exponential integrators by hand (the Taylor/phi_2 forms), last step x0:
    ``dpmpp``: x_t = (sigma_t/sigma_s) x_s + alpha_t phi_1 x0_s + alpha_t phi_2 (x0_s - x0_p) / (l_s - l_p);
    ``dpm``: x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_s - sigma_t (e^h - 1 - h) (eps_s - eps_p) / (l_s - l_p)."""
    grid = Grid.from_times(b.denoiser.schedule, np.concatenate([t, [S.t_data(b.denoiser.schedule)]]))
    model, lam = ODEModel(b.denoiser), grid.lam
    x, prev = z.clone(), None
    for i in range(len(t)):
        x0, eps = model(x, float(t[i]))
        if i == len(t) - 1:
            return x0
        a_s, s_s, a_t, s_t = (float(v) for v in (grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]))
        h = float(lam[i + 1] - lam[i])
        if kind == "dpmpp":
            x = (s_t / s_s) * x + a_t * phi(1, h) * x0
            if prev is not None:
                x = x + a_t * phi(2, h) * (x0 - prev[1]) / (lam[i] - prev[0])
        else:
            x = (a_t / a_s) * x - s_t * math.expm1(h) * eps
            if prev is not None:
                x = x - s_t * (math.expm1(h) - h) * (eps - prev[2]) / (lam[i] - prev[0])
        prev = (float(lam[i]), x0, eps)
    return x


@pytest.mark.parametrize("prediction", ["eps", "flow"])
@pytest.mark.parametrize("kind", ["dpmpp", "dpm"])
def test_second_order_with_degenerate_statistics_is_multistep_dpm_solver(prediction, kind):
    b = build_model("gmm", dim=2, prediction=prediction)
    z, gens = draws(b)
    m = METHODS.get("dpm_solver_v3")(**FREE, ems=kind)
    v3 = m.prepare(b, 6)
    want = hand_multistep(b, z, m.grid_times, kind)
    torch.testing.assert_close(v3(z.clone(), None, 1.0, gens), want, rtol=1e-10, atol=1e-10)
    if kind == "dpmpp":  # bench's dpmpp_2m (midpoint form) differs at O(h^2) overall: ~1/4 at twice the steps
        gap = []
        for n in (20, 40):
            base = METHODS.get("dpmpp_2m")(schedule="logsnr").prepare(b, n)(z.clone(), None, 1.0, gens)
            gap.append(float((METHODS.get("dpm_solver_v3")(**FREE, ems=kind, schedule="logsnr").prepare(b, n)(z.clone(), None, 1.0, gens) - base).abs().max()))  # fmt: skip
        assert 3.0 < gap[0] / gap[1] < 6.0, gap  # O(h^2): not 2 (first order), not 8 (third)


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_the_corrector_redoes_the_step_with_the_new_evaluation(prediction):
    """DPM-Solver++ statistics, first-order predictor, pseudo corrector (order 2): after the model is
    evaluated at the predicted x_i, x_i is recomputed from x_{i-1} with the phi_2 term of the two data
    predictions, the evaluation kept (no extra NFE); the next step starts from the corrected point."""
    b = build_model("gmm", dim=2, prediction=prediction)
    z, gens = draws(b)
    m = METHODS.get("dpm_solver_v3")(**{**FREE, "order": 1, "corrector": "on", "corrector_pseudo": True}, ems="dpmpp")
    with ForwardCounter(b.denoiser.net) as c:
        c.arm()
        got = m.prepare(b, 5)(z.clone(), None, 1.0, gens)
    assert c.calls == 5
    t = m.grid_times
    grid = Grid.from_times(b.denoiser.schedule, np.concatenate([t, [S.t_data(b.denoiser.schedule)]]))
    model, lam = ODEModel(b.denoiser), grid.lam
    x, prev = z.clone(), None
    for i in range(len(t)):
        x0 = model(x, float(t[i]))[0]
        if prev is not None:  # the corrector
            xp, x0p = prev
            h = float(lam[i] - lam[i - 1])
            s_s, a_t, s_t = float(grid.sigma[i - 1]), float(grid.alpha[i]), float(grid.sigma[i])
            x = (s_t / s_s) * xp + a_t * phi(1, h) * x0p + a_t * phi(2, h) / h * (x0 - x0p)
        if i == len(t) - 1:
            want = x0
            break
        prev = (x, x0)
        x = (float(grid.sigma[i + 1]) / float(grid.sigma[i])) * x + float(grid.alpha[i + 1]) * phi(
            1, float(lam[i + 1] - lam[i])
        ) * x0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- the pieces on hand cases ------------------------------------------------------------------


def test_derivative_estimates():
    """The Taylor system recovers a cubic's derivatives from 4 points; pseudo-order is i! times the
    Newton divided differences (for 2 points both are the slope)."""
    lams = [0.3, -0.1, -0.6, -1.4]
    p = lambda x: 1.0 - 2.0 * x + 0.5 * x**2 + 0.25 * x**3  # noqa: E731
    g = np.array([p(x) for x in lams])
    d = V3.derivative_matrix(lams, False) @ g
    x0 = lams[0]
    np.testing.assert_allclose(d, [-2.0 + x0 + 0.75 * x0**2, 1.0 + 1.5 * x0, 1.5], rtol=1e-10)
    dd = V3.derivative_matrix(lams[:3], True) @ g[:3]
    first = (g[0] - g[1]) / (lams[0] - lams[1])
    second = (first - (g[1] - g[2]) / (lams[1] - lams[2])) / (lams[0] - lams[2])
    np.testing.assert_allclose(dd, [first, 2 * second], rtol=1e-12)
    np.testing.assert_allclose(V3.derivative_matrix(lams[:2], True), V3.derivative_matrix(lams[:2], False), rtol=1e-12)


def test_step_integrals_with_constant_statistics():
    """l = 1, s = 0: the step is DPM-Solver++'s (lin = sigma_t / sigma_s in alpha^2 + sigma^2 = 1 terms,
    x0 weights alpha_t phi_1, alpha_t phi_2 / h); a constant b adds -alpha_t phi_2(h) b at first order
    and nothing at second (the derivative estimate absorbs it); (l, s) = (0, -1) gives DPM-Solver's
    -sigma_t (e^h - 1) on sigma eps / alpha = e^{-lambda} eps."""
    lam = np.linspace(-5.0, 5.0, 101)
    ls, lt, lp = -1.03, 0.41, -1.9
    h = lt - ls
    a_s, a_t = 1 / math.sqrt(1 + math.exp(-2 * ls)), 1 / math.sqrt(1 + math.exp(-2 * lt))
    ems = V3.EMS(lam, np.ones(101), np.zeros(101), torch.full((101, 3), 0.7, dtype=torch.float64))
    lin, w, bw = V3.step_coefficients(ems, [ls], lt, a_s, a_t, False)
    assert lin == pytest.approx(a_t / a_s * math.exp(-h), rel=1e-13)
    assert w[0] == pytest.approx(-a_t * phi(1, h), rel=1e-12)  # f = -x0: +alpha_t phi_1 x0
    assert bw.sum() == pytest.approx(-a_t * phi(2, h), rel=1e-10)
    lin, w, bw = V3.step_coefficients(ems, [ls, lp], lt, a_s, a_t, False)
    assert w[1] == pytest.approx(-a_t * phi(2, h) / (lp - ls), rel=1e-10)
    assert abs(bw.sum()) < 1e-12
    dpm = V3.EMS.constant(lam, 0.0, -1.0)
    lin, w, bw = V3.step_coefficients(dpm, [ls], lt, a_s, a_t, False)
    assert bw is None and lin == pytest.approx(a_t / a_s, rel=1e-13)
    s_t = math.sqrt(1 - a_t**2)
    # f = sigma eps / alpha = e^{-ls} eps at the reference: weight times e^{-ls} is -sigma_t (e^h - 1)
    assert w[0] * math.exp(-ls) == pytest.approx(-s_t * math.expm1(h), rel=1e-12)


def test_the_plan_is_the_authors_loop():
    p = V3.plan(5, 3, True, True, False, True)
    assert [a["predictor"] for a in p] == [[0], [1, 0], [2, 1, 0], [3, 2], [4], None]
    assert [a["corrector"] for a in p] == [None, None, [1, 2], [2, 3, 1], [3, 4], None]
    assert [a["corrector"] for a in V3.plan(4, 2, False, True, True, False)] == [None, [0, 1], [1, 2, 0], [2, 3, 1], [3, 4, 2]]


# --- the statistics ------------------------------------------------------------------------


def analytic_gaussian_f(mu, c, lam, z0, lam0):
    """f and df/dlambda along the exact ODE trajectories of N(mu, diag(c^2)) on a VP path, with the exact l."""
    mu, c = np.asarray(mu), np.asarray(c)

    def parts(x):
        a2 = 1 / (1 + np.exp(-2 * x))
        a, s2 = np.sqrt(a2), 1 - a2
        v = np.sqrt(a2 * c**2 + s2)
        li = s2 / v**2
        return a, v, li, li.mean()

    a0, v0, _, _ = parts(lam0)
    zz = (z0 - a0 * mu) / v0  # standardised start, constant along the trajectory

    def f(x):
        a, v, li, lm = parts(x)
        return -lm * mu + (li - lm) * v / a * zz, lm

    e = 1e-6
    F = np.stack([f(x)[0] for x in lam])
    dF = np.stack([(f(x + e)[0] - f(x - e)[0]) / (2 * e) for x in lam])
    return F, dF, np.array([f(x)[1] for x in lam])


def test_statistics_of_a_gaussian_match_their_closed_form(home):
    """N(mu, diag(c^2)): grad(sigma eps) = diag(sigma^2 / (alpha^2 c^2 + sigma^2)) so l is its mean exactly;
    f is linear in the standardised start z, f = -l mu + (l_i - l) v_i z_i / alpha, and (s, b) are the
    least squares fit of its lambda-derivative on the same draws."""
    mu, c = [0.8, -0.3], [0.5, 1.3]
    b = gaussian_bundle(mu, c)
    z, _ = training_noise(b, 128)
    errs = []
    for K in (60, 120):
        m = METHODS.get("dpm_solver_v3")(stat_steps=K, stat_samples=128)
        prep = m.prepare(b, 4)
        assert prep.info["learned_params"] == (K + 1) * (2 + 2)
        ems = m.statistics(b, {a.key: a for a in prep.artifacts})
        F, dF, ell = analytic_gaussian_f(mu, c, ems.lam, z.numpy(), ems.lam[0])
        np.testing.assert_allclose(ems.l, ell, rtol=1e-9, atol=1e-12)
        s, bb = V3.fit_sb(torch.as_tensor(F), torch.as_tensor(dF))
        errs.append((np.abs(ems.s - s).max() / np.abs(s).max(), float((ems.b - bb).abs().max() / bb.abs().max())))
    assert errs[1][0] < 5e-4 and errs[1][1] < 1e-4, errs
    assert errs[0][0] > 8 * errs[1][0] and errs[0][1] > 4 * errs[1][1], errs  # f^(1)'s finite differences converge


def test_first_order_is_exact_on_an_isotropic_gaussian(home):
    """N(mu, c^2 I): sigma eps - l x = -l alpha mu exactly, so f = -l mu; with b = f^(1) (s = 0) g is
    constant and the first-order step is exact up to the EMS grid's interpolation: 3 steps land on the
    exact trajectory where DDIM's first-order steps (the same solver with DPM-Solver++ statistics) miss."""
    mu, c = [1.5, -0.5, 0.25], [0.3, 0.3, 0.3]
    b = gaussian_bundle(mu, c)
    z, gens = draws(b, 32)
    kn = {"order": 1, "corrector": "off", "predictor_pseudo": "off"}
    v3 = METHODS.get("dpm_solver_v3")(**kn).prepare(b, 3)
    free = METHODS.get("dpm_solver_v3")(**kn, ems="dpmpp").prepare(b, 3)
    sch = b.denoiser.schedule
    (a0, s0), (a1, s1) = (S.alpha_sigma(sch, S.t_max(sch)), S.alpha_sigma(sch, S.t_min(sch)))
    mu_t, var = torch.tensor(mu, dtype=torch.float64), 0.09
    v0, v1 = math.sqrt(float(a0) ** 2 * var + float(s0) ** 2), math.sqrt(float(a1) ** 2 * var + float(s1) ** 2)
    exact = float(a1) * mu_t + (z - float(a0) * mu_t) * v1 / v0  # the ODE scales the standardised start
    err = float((v3(z.clone(), None, 1.0, gens) - exact).abs().max())
    err_free = float((free(z.clone(), None, 1.0, gens) - exact).abs().max())
    assert err < 1e-3 and err_free > 0.1, (err, err_free)


# --- the build, the seeds and the result ------------------------------------------------------


def suite_seeds() -> list[tuple[int, int]]:
    return [(int(y.get("seed", 0)), int(y.get("n_samples", 1)))
            for y in (yaml.safe_load(p.read_text()) for p in sorted((REPO / "suites").glob("*.yaml")))]  # fmt: skip


def test_the_build_draws_only_training_noise(home, monkeypatch):
    """Every trajectory starts at a training draw (seeds LEARNED_SEED), none an evaluation draw."""
    b = build_model("gmm", dim=2, prediction="eps")
    drawn: list[torch.Tensor] = []
    real = V3.training_noise

    def spy(*args, **kw):
        z, cond = real(*args, **kw)
        drawn.append(z.clone())
        return z, cond

    monkeypatch.setattr(V3, "training_noise", spy)
    first: list[torch.Tensor] = []
    h = b.denoiser.net.register_forward_pre_hook(lambda mod, args: first.append(args[0].detach().clone()) if not first else None)
    try:
        prep = METHODS.get("dpm_solver_v3")(stat_samples=100, stat_steps=20).prepare(b, 4, guidance=1.0)
    finally:
        h.remove()
    train = noise(generators(LEARNED_SEED, range(100)), (2,), torch.float64)
    assert torch.equal(torch.cat(drawn[:2]), train)  # the trajectories' two chunks (64 + 36)
    assert torch.equal(first[0], train[:64])
    evals = [noise(generators(s, range(min(n, 1000))), (2,), torch.float64) for s, n in {*suite_seeds(), *((s, 1000) for s in range(10))}]  # fmt: skip
    assert float(torch.cdist(torch.cat(drawn), torch.cat(evals)).min()) > 1e-6
    cost = prep.artifacts[0].record["cost"]
    assert cost["teacher_rows"] == 21 * (100 + 64)  # trajectories + trace evaluations, counted by the harness
    assert cost["learned_params"] == 21 * 4 and cost["samples_drawn"] == 100


@pytest.mark.parametrize("prediction,schedule", [("eps", "uniform"), ("eps", "logsnr"), ("flow", "uniform")])
def test_beats_dpmpp_2m_at_4_nfe_on_the_exact_mixture(home, prediction, schedule):
    """Held-out seeds (suite seed 0), 4 NFE each, the same schedule; measured ratios ~0.4 (eps, uniform),
    ~0.1 (eps, logsnr), ~0.15 (flow, uniform)."""
    b = build_model("gmm", dim=2, prediction=prediction)
    z, gens = draws(b, 256)
    errs = []
    for p in (METHODS.get("dpm_solver_v3")(schedule=schedule).prepare(b, 4, guidance=1.0),
              METHODS.get("dpmpp_2m")(schedule=schedule).prepare(b, 4)):  # fmt: skip
        with ForwardCounter(p.denoiser.net, keep_first=True) as c:
            c.arm()
            x = p(z.clone(), None, 1.0, gens)
        assert c.calls == 4
        xs, ts = c.first_inputs[0]
        exact = b.extra["mixture"].ode_endpoint(xs, b.denoiser.schedule, float(ts.flatten()[0]))
        errs.append(float(((x - exact) ** 2).mean()))
    assert errs[0] < 0.6 * errs[1], errs
