"""AMED-Solver and AMED-Plugin (Zhou et al. 2024): the mean-direction step by hand on a Gaussian,
where it is exact with the right direction scale; a fresh predictor is DPM-Solver-2 (the Solver)
and the base solver on the grid split at geometric midpoints (the Plugin); a tiny build's loss
falls, records its learned parameters and spends exactly its NFE budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import methods.learned_solvers.amed as A
import methods.solvers  # noqa: F401  (registers the base solvers)
from bench.accounting import ForwardCounter
from bench.denoiser import Denoiser, VPSchedule
from bench.models import build_model
from bench.models.gmm import GaussianMixture, GMMNet
from bench.registry import METHODS
from bench.seeds import generators, noise
from methods.solvers.core import Grid, ODEModel
from methods.solvers.euler import sample_euler

TINY = {"train_samples": 32, "train_steps": 30, "batch_size": 16}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


def gaussian_denoiser(mu: float, s: float) -> Denoiser:
    f64 = torch.float64
    mix = GaussianMixture(torch.ones(1, dtype=f64), torch.tensor([[mu]], dtype=f64), torch.tensor([[s]], dtype=f64))
    sch = VPSchedule.linear()
    return Denoiser(GMMNet(mix, sch), "eps", sch)


def test_the_mean_direction_step_by_hand_and_exact_on_a_gaussian():
    """Data N(mu, s^2): in EDM's frame eps(y, tau) = tau (y - mu) / (s^2 + tau^2) and the ODE's exact
    solution is y(tau) = mu + (y0 - mu) sqrt(s^2 + tau^2) / sqrt(s^2 + tau0^2). The AMED step is
    y_mid = y0 + (tau_m - tau0) eps0, tau_m = tau1^r tau0^(1-r), y1 = y0 + c_dir (tau1 - tau0) d_mid with
    d_mid = eps at (y_mid, c_time tau_m) read through x0, divided by tau_m; linear in (y0 - mu), so one
    c_dir makes it exact for every y0."""
    mu, s = 0.7, 0.4
    den = gaussian_denoiser(mu, s)
    ev = A.Evaluator(den, A.Coords(den.schedule, "ve"), None, 1.0)
    tau0, tau1, r, ct = 3.0, 0.2, 0.3, 1.1
    y0 = torch.tensor([[-2.0], [0.5], [4.0]], dtype=torch.float64)
    eps = lambda y, t: t * (y - mu) / (s**2 + t**2)  # noqa: E731
    d0 = eps(y0, tau0)
    torch.testing.assert_close(ev.slope(y0, tau0), d0, rtol=1e-9, atol=1e-9)
    tm = tau1**r * tau0 ** (1 - r)
    y_mid = y0 + (tm - tau0) * d0
    x0_mid = y_mid - ct * tm * eps(y_mid, ct * tm)  # the model's x0 at (y_mid, c_time tau_m)
    d_mid = (y_mid - x0_mid) / tm
    exact = mu + (y0 - mu) * math.sqrt(s**2 + tau1**2) / math.sqrt(s**2 + tau0**2)
    c_star = ((exact - y0) / ((tau1 - tau0) * d_mid)).flatten()
    assert float(c_star.max() - c_star.min()) < 1e-9  # one direction scale for every start
    R, CT = torch.full((3,), r), torch.full((3,), ct)
    by_hand = y0 + 1.0 * (tau1 - tau0) * d_mid
    torch.testing.assert_close(A.amed_solver_step(ev, y0, d0, tau0, tau1, R, torch.ones(3), CT), by_hand, rtol=1e-9, atol=1e-9)
    got = A.amed_solver_step(ev, y0, d0, tau0, tau1, R, c_star, CT)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-9)
    # and the DPM-Solver-2 midpoint (r = 1/2, no scales) is not exact there
    half = A.amed_solver_step(ev, y0, d0, tau0, tau1, torch.full((3,), 0.5), torch.ones(3), torch.ones(3))
    assert float((half - exact).abs().max()) > 1e-3


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_a_fresh_amed_solver_is_dpm_solver_2(prediction):
    """Zero heads: r = 1/2, c_dir = c_time = 1. At an odd budget (q AMED steps, then sigma_min -> 0
    by the x0 prediction) that is DPM-Solver-2 on the same q + 1 levels (orders 2, ..., 2, 1)."""
    b = build_model("gmm", dim=2, prediction=prediction)
    gens = generators(0, range(64))
    z = noise(gens, b.sample_shape, b.dtype)
    m = A.AMEDSolver()
    got = m.sampler(b, 5, m.new_predictor(b, 5))(z, None, 1.0, gens)
    want = METHODS.get("dpm_solver")(order=2, budget="steps", schedule="karras").prepare(b, 3)(z, None, 1.0, gens)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_a_fresh_amed_plugin_on_euler_is_euler_on_the_split_grid(prediction):
    """AMED-Plugin splits each base step at tau_n^(1/2) tau_{n+1}^(1/2) in the base's frame (sigma_bar on
    VP, s on a flow); fresh, with Euler as the base, it is Euler on the grid with those points inserted."""
    b = build_model("gmm", dim=2, prediction=prediction)
    gens = generators(0, range(64))
    z = noise(gens, b.sample_shape, b.dtype)
    m = A.AMEDPlugin(base="euler")
    got = m.sampler(b, 5, m.new_predictor(b, 5))(z, None, 1.0, gens)
    grid = m.grid(b, 5)
    coords = A.Coords(b.denoiser.schedule, "native")
    tau = coords.tau(grid)
    times = []
    for n in range(grid.steps - 1):
        mid = math.sqrt(tau[n] * tau[n + 1])
        t_mid = float(coords.time(torch.tensor([mid], dtype=torch.float64))[0])
        times += [grid.t[n], t_mid]
    fine = Grid.from_times(b.denoiser.schedule, np.array([*times, grid.t[-2], grid.t[-1]]))
    want = sample_euler(ODEModel(b.denoiser), z, fine)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_layout_spends_the_budget():
    assert A.layout(4, False) == [2, 2, 0]
    assert A.layout(5, False) == [2, 2, 1]
    assert A.layout(3, True) == [2, 2, 0]  # AFS: the first evaluation is free
    with pytest.raises(ValueError):
        A.layout(1, False)


@pytest.mark.parametrize("name,knobs", [("amed_solver", {}), ("amed_plugin", {"base": "ipndm"})])
def test_a_tiny_build_trains_and_runs_at_its_budget(home, name, knobs):
    b = build_model("gmm", dim=2, prediction="eps")
    method = METHODS.get(name)(**TINY, **knobs)
    prep = method.prepare(b, 4, guidance=1.0)
    art = prep.artifacts[0]
    cost = art.record["cost"]
    assert cost["final_loss"] < cost["first_loss"]
    n = A.n_params(method.new_predictor(b, 4))
    assert cost["learned_params"] == n == prep.info["learned_params"]
    assert n == A.n_params(A.AMEDPredictor(2, 3)) and 8000 < A.n_params(A.AMEDPredictor(64, 3)) < 10000  # ~9k at 8x8
    assert cost["teacher_rows"] > 0 and cost["optimizer_steps"] == TINY["train_steps"]
    gens = generators(0, range(8))
    z = noise(gens, b.sample_shape, b.dtype)
    with ForwardCounter(prep.denoiser.net) as c:
        x = prep(z, None, 1.0, gens)
    assert c.calls == 4 and torch.isfinite(x).all()
