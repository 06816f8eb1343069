"""The solver family as registered adapters: metadata, schedules, step budgets, bad input."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from helpers import job, random_bundle, tiny_suite

from bench import schedules as S
from bench.adapter import KnobError, MethodNotApplicable
from bench.cli import main
from bench.denoiser import FlowSchedule, VPSchedule
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.worker import run_job
from methods.solvers import base
from methods.solvers.core import Grid, ODEModel, lagrange_integrals
from methods.solvers.ddim import sample_ddim, trailing_timesteps
from methods.solvers.deis import sample_deis
from methods.solvers.ipndm import IPNDM_COEFFS

SOLVERS = {
    "ddim": ("eps", "v", "x0"),
    "ddpm": ("eps", "v", "x0"),
    "euler": ("eps", "v", "x0", "flow"),
    "euler_ancestral": ("eps", "v", "x0", "flow"),
    "heun": ("eps", "v", "x0", "flow"),
    "dpm_solver": ("eps", "v", "x0", "flow"),
    "dpmpp_2m": ("eps", "v", "x0", "flow"),
    "dpmpp_3m": ("eps", "v", "x0", "flow"),
    "dpmpp_2m_sde": ("eps", "v", "x0", "flow"),
    "deis": ("eps", "v", "x0", "flow"),
    "unipc": ("eps", "v", "x0", "flow"),
    "ipndm": ("eps", "v", "x0", "flow"),
    "pndm": ("eps", "v", "x0", "flow"),
    "lms": ("eps", "v", "x0", "flow"),
}
VP, FLOW = VPSchedule.linear(), FlowSchedule()


def test_every_solver_is_listed_with_its_metadata(capsys):
    assert main(["list", "methods", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    for name, kinds in SOLVERS.items():
        e = entries[name]
        assert e["family"] == "solver" and e["training"] == "free"
        assert "arXiv" in e["paper"]
        assert e["applies_to"] == {"prediction": list(kinds)}
        assert e["knobs"]["schedule"]["choices"] == list(S.SCHEDULES)
    assert entries["unipc"]["knobs"]["variant"]["choices"] == ["bh1", "bh2"]
    assert entries["dpm_solver"]["knobs"]["order"]["range"] == [1, 3]


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_vp_only_solver_on_a_flow_model_is_a_clear_error(name):
    with pytest.raises(MethodNotApplicable, match="flow"):
        METHODS.get(name)().prepare(build_model("gmm", prediction="flow"), 5)


def test_bad_knobs_name_the_valid_values():
    with pytest.raises(KnobError, match="uniform"):
        METHODS.get("euler")(schedule="linear")
    with pytest.raises(KnobError, match="has no knob 'budget'"):
        METHODS.get("ddim")(budget="nfe")
    with pytest.raises(KnobError, match=r"\[1, 3\]"):
        METHODS.get("unipc")(order=4)


def test_solver_that_divides_by_alpha_rejects_a_pure_noise_start():
    b = build_model("gmm", prediction="flow")
    grid = Grid.from_times(b.denoiser.schedule, S.uniform(b.denoiser.schedule, 4, pure_noise=True))
    with pytest.raises(ValueError, match="pure noise"):
        sample_deis(ODEModel(b.denoiser), torch.randn(2, 2, dtype=torch.float64), grid)


# ---------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("sch", [VP, FLOW], ids=["vp", "flow"])
@pytest.mark.parametrize("name", ["uniform", "karras", "logsnr", "ays"])
@pytest.mark.parametrize("n", [1, 4, 10, 50])
def test_schedules_start_at_the_noisiest_level_and_end_at_the_data(sch, name, n):
    t = S.timesteps(name, sch, n, pure_noise=False)
    assert len(t) == n + 1 and np.all(np.diff(t) < 0)
    assert t[0] == pytest.approx(S.t_max(sch, pure_noise=False) if name != "ays" or sch is VP else t[0])
    assert t[-1] == S.t_data(sch)
    if sch is VP:
        assert t[0] == 999.0


def test_uniform_vp_is_the_trailing_spacing_and_flow_is_linear_in_s():
    for n in (1, 6, 10, 15):
        np.testing.assert_array_equal(S.uniform(VP, n), np.append(trailing_timesteps(1000, n), -1))
    np.testing.assert_allclose(S.uniform(FLOW, 4), [1000, 750, 500, 250, 0])
    np.testing.assert_allclose(S.uniform(FLOW, 4, pure_noise=False), [999, 749.25, 499.5, 249.75, 0])


def test_karras_is_edm_eq5_and_logsnr_is_uniform_in_lambda():
    smin, smax = S.sigma_range(VP)
    t = S.karras(VP, 8, rho=7.0)
    ramp = np.linspace(0, 1, 8)
    want = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    np.testing.assert_allclose(S.sigma_bar(VP, t[:-1]), want, rtol=1e-10)
    assert not np.allclose(S.karras(VP, 8, rho=3.0), t)
    lam = -np.log(S.sigma_bar(FLOW, S.logsnr(FLOW, 9)[:-1]))
    np.testing.assert_allclose(np.diff(lam), np.full(8, np.diff(lam)[0]), rtol=1e-9)


def test_ays_uses_the_published_tables_and_log_linear_interpolation():
    from diffusers.schedulers import AysSchedules

    np.testing.assert_allclose(S.ays(VP, 10)[:-1], AysSchedules["StableDiffusionTimesteps"], atol=1e-9)
    svd = np.array(AysSchedules["StableDiffusionVideoSigmas"][:-1])
    np.testing.assert_allclose(S.sigma_bar(FLOW, S.ays(FLOW, 10)[:-1]), svd, rtol=1e-9)
    # 19 levels: every other one is a table level, the ones between are geometric means
    sb = S.sigma_bar(FLOW, S.ays(FLOW, 19)[:-1])
    np.testing.assert_allclose(sb[::2], svd, rtol=1e-9)
    np.testing.assert_allclose(sb[1::2], np.sqrt(svd[:-1] * svd[1:]), rtol=1e-9)


def test_gits_dp_finds_the_cheapest_path():
    rng = np.random.default_rng(0)
    M, n = 9, 3
    cost = rng.uniform(0.1, 1.0, (M + 1, M + 1))
    coeff = 1.15

    def value(path):
        v = 0.0
        for a, b in reversed(list(itertools.pairwise(path))):
            v = cost[a, b] + coeff * v
        return v

    best = min(([0, *mid, M] for mid in itertools.combinations(range(1, M), n - 1)), key=value)
    assert S.gits_select(cost, n, coeff) == best


def test_gits_schedule_is_calibrated_on_the_model(monkeypatch):
    monkeypatch.setattr(base, "GITS_TEACHER_STEPS", 40)
    monkeypatch.setattr(base, "GITS_SAMPLES", 32)
    b = build_model("gmm", dim=2, prediction="eps")
    euler = METHODS.get("euler")(schedule="gits")
    (art,) = euler.prepare(b, 5).artifacts
    t = euler.grid.t
    fine = S.karras(VP, 40)
    assert len(t) == 6 and t[0] == 999.0 and t[-1] == -1.0 and set(t) <= set(fine)
    # the calibration is an artifact, its teacher forwards counted by the harness: 40 iPNDM steps on 32 draws
    assert art.cost["teacher_rows"] == 40 * 32 and art.cost["teacher_calls"] == 40 and art.cost["wall_s"] > 0
    assert art.record["method"] == "ipndm" and art.record["name"] == "gits-cost"
    (again,) = METHODS.get("dpmpp_2m")(schedule="gits").prepare(b, 7).artifacts  # shared by every solver and step count
    assert again.key == art.key and not again.built
    assert not np.allclose(t, S.karras(VP, 5))


def test_gits_beats_the_schedule_it_selects_from_for_euler(monkeypatch):
    monkeypatch.setattr(base, "GITS_TEACHER_STEPS", 60)
    b = build_model("gmm", dim=2, prediction="eps")
    suite = tiny_suite(metrics=("exact_mse",))
    err = {}
    for sched in ("karras", "gits"):
        row, _ = run_job(job("euler", 6, 1.0, 64, 64, "gmm", knobs=(("schedule", sched),)), b, suite)
        err[sched] = row["exact_mse"]
    assert err["gits"] < err["karras"], err


# ---------------------------------------------------------------------------------------------
# adapters


@pytest.mark.parametrize(
    "method,knobs,steps,nfe",
    [
        ("heun", {"budget": "nfe"}, 10, 9),
        ("heun", {"budget": "steps"}, 10, 19),
        ("pndm", {"budget": "nfe", "variant": "s"}, 10, 10),
        ("pndm", {"budget": "nfe", "variant": "f"}, 16, 16),
        ("pndm", {"budget": "steps", "variant": "f"}, 5, 14),
        ("dpm_solver", {"budget": "nfe", "order": 3}, 10, 10),
        ("dpm_solver", {"budget": "nfe", "order": 3}, 8, 8),
        ("dpm_solver", {"budget": "steps", "order": 2}, 5, 9),
        ("unipc", {}, 7, 7),
    ],
)
def test_step_budget_maps_to_the_nfe_the_harness_counts(method, knobs, steps, nfe):
    b = build_model("gmm", dim=2, prediction="eps")
    row, _ = run_job(job(method, steps, 1.0, 4, 4, "gmm", knobs=tuple(knobs.items())), b, tiny_suite())
    assert row["nfe"] == nfe


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_every_solver_runs_every_schedule_on_gmm(prediction, monkeypatch):
    monkeypatch.setattr(base, "GITS_TEACHER_STEPS", 20)
    monkeypatch.setattr(base, "GITS_SAMPLES", 8)
    b = build_model("gmm", dim=2, prediction=prediction)
    x = noise(generators(0, range(4)), (2,), torch.float64)
    for name, kinds in SOLVERS.items():
        for schedule in S.SCHEDULES:
            if prediction not in kinds:
                continue
            out = METHODS.get(name)(schedule=schedule).prepare(b, 5)(x, None, 1.0, generators(0, range(4)))
            assert out.shape == x.shape and torch.isfinite(out).all(), (name, schedule)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_every_solver_runs_on_a_digits_network_with_guidance(kind):
    b = random_bundle(kind)
    x = noise(generators(0, range(2)), b.sample_shape)
    for name, kinds in SOLVERS.items():
        if kind in kinds:
            out = METHODS.get(name)().prepare(b, 3)(x, torch.tensor([1, 2]), 2.0, generators(0, range(2)))
            assert out.shape == x.shape and torch.isfinite(out).all(), name


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_every_schedule_runs_on_a_digits_network(kind, monkeypatch):
    monkeypatch.setattr(base, "GITS_TEACHER_STEPS", 8)
    monkeypatch.setattr(base, "GITS_SAMPLES", 2)
    b = random_bundle(kind)
    x = noise(generators(0, range(2)), b.sample_shape)
    for name in ("euler", "dpmpp_2m"):
        for schedule in S.SCHEDULES:
            out = METHODS.get(name)(schedule=schedule).prepare(b, 3)(x, torch.tensor([1, 2]), 1.0, generators(0, range(2)))
            assert torch.isfinite(out).all(), (name, schedule)


@pytest.mark.parametrize("name,knobs", [("ddpm", {}), ("euler_ancestral", {}), ("dpmpp_2m_sde", {}), ("heun", {"s_churn": 10.0})])
def test_stochastic_solvers_do_not_depend_on_batching(name, knobs):
    b = build_model("gmm", dim=2, prediction="eps")
    sampler = METHODS.get(name)(**knobs).prepare(b, 8)
    whole = sampler(noise(generators(5, range(4)), (2,), torch.float64), None, 1.0, generators(5, range(4)))
    halves = [sampler(noise(generators(5, r), (2,), torch.float64), None, 1.0, generators(5, r)) for r in (range(2), range(2, 4))]
    torch.testing.assert_close(whole, torch.cat(halves), rtol=0, atol=0)


def test_ddim_is_unchanged():
    """The grid-based DDIM equals the original trailing-timestep loop (Song et al. Eq. 12)."""
    b = random_bundle("eps")
    d = b.denoiser
    x = noise(generators(0, range(3)), b.sample_shape)
    cond = torch.tensor([0, 4, 9])
    for eta in (0.0, 1.0):
        ts = trailing_timesteps(1000, 7)
        y = x.clone()
        gens = generators(0, range(3))
        for g in gens:
            torch.randn(b.sample_shape, generator=g)  # the initial draw the harness makes
        for i, t in enumerate(ts):  # the original implementation
            a_t, s_t = d.alpha_sigma(float(t), y)
            x0, eps = d.x0_eps(y, float(t), d(y, float(t), cond, 1.5))
            if i + 1 == len(ts):
                y = x0
                break
            a_s, s_s = d.alpha_sigma(float(ts[i + 1]), y)
            c = eta * ((s_s**2 / s_t**2) * (1 - a_t**2 / a_s**2)).clamp(min=0).sqrt()
            y = a_s * x0 + (s_s**2 - c**2).clamp(min=0).sqrt() * eps
            if eta > 0:
                y = y + c * torch.stack([torch.randn(y.shape[1:], generator=g) for g in gens])
        gens = generators(0, range(3))
        for g in gens:
            torch.randn(b.sample_shape, generator=g)
        grid = Grid.from_times(d.schedule, S.uniform(d.schedule, 7))
        out = sample_ddim(ODEModel(d, cond, 1.5), x.clone(), grid, eta, gens)
        torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)


def test_ipndm_coefficients_are_equal_step_adams_bashforth():
    for k, c in IPNDM_COEFFS.items():
        np.testing.assert_allclose(c, lagrange_integrals(-np.arange(k, dtype=float)), rtol=1e-12)
