"""TeaCache and MagCache: off = bit-identical, clean removal, no leaks, the calibration, the skip rules, the artifact."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import assert_model_clean, dict_state, flux_args, inputs, random_bundle, tiny_flux_model

import methods.caching  # noqa: F401  (registers the caches)
import methods.solvers  # noqa: F401
from bench.accounting import UnitCounter
from bench.calibrate import calibrate, parse_knobs
from bench.cli import main
from bench.models import ModelBundle, build_model
from bench.registry import METHODS
from methods.caching.base import block_lists, target_model
from methods.caching.calibrated import fit_rescale, magnitude_ratio, record_run, rel_l1

STEPS = 4
CALIB = {"calib_samples": 2}  # small calibration runs keep the tests fast
CASES = [
    ("teacache", {"threshold": 0.0, **CALIB}, {"threshold": 0.5, **CALIB}),
    ("magcache", {"threshold": 0.0, "retention": 0.0, **CALIB}, {"threshold": 1.0, "retention": 0.0, **CALIB}),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(autouse=True)
def bench_home(tmp_path, monkeypatch):
    """Every test calibrates into its own artifact store, never the user's home."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "bench_home"))
    return tmp_path / "bench_home"


def plain(bundle: ModelBundle, steps: int = STEPS):
    return METHODS.get("euler")().prepare(bundle, steps)


@pytest.fixture(scope="module")
def flow_bundle():
    return random_bundle("flow")


# --- off = uncached, removal, leaks (random-weight Flux bundle and digits-dit) ------------------


@pytest.mark.parametrize(("method", "off", "on"), CASES, ids=IDS)
def test_threshold_zero_is_bit_identical_and_removal_restores(flow_bundle, method, off, on):
    b = flow_bundle
    model = target_model(b.denoiser.net)
    before_dict, before_params = dict_state(model), copy.deepcopy(model.state_dict())
    x, c, g = inputs(b, range(2), [1, 7])
    ref = plain(b)(x, c, 2.0, g)
    ad = METHODS.get(method)(**off)
    sampler = ad.prepare(b, STEPS)  # calibrates (recording hooks on and off again)
    assert_model_clean(model, before_dict, before_params)
    with UnitCounter(dict(block_lists(model)[1:])) as uc:
        out = sampler(x, c, 2.0, g)
    assert torch.equal(out, ref)
    assert uc.called > 0 and uc.computed == uc.called
    cached_ad = METHODS.get(method)(**on)
    with UnitCounter(dict(block_lists(model)[1:])) as uc:
        cached = cached_ad.prepare(b, STEPS)(x, c, 2.0, g)
    assert uc.computed < uc.called and not torch.equal(cached, ref)
    assert_model_clean(model, before_dict, before_params)
    assert torch.equal(plain(b)(x, c, 2.0, g), ref)


@pytest.mark.parametrize(("method", "off", "on"), CASES, ids=IDS)
def test_no_state_leaks_between_jobs(flow_bundle, method, off, on):
    b = flow_bundle
    xa, ca, ga = inputs(b, range(3), [0, 9, 4])
    xb, cb, gb = inputs(b, range(5, 6), [3])
    sampler = METHODS.get(method)(**on).prepare(b, STEPS)
    b_alone = METHODS.get(method)(**on).prepare(b, STEPS)(xb, cb, 1.5, gb)
    sampler(xa, ca, 3.0, ga)  # job A (other batch size, classes, guidance)
    assert torch.equal(sampler(xb, cb, 1.5, gb), b_alone)


@pytest.mark.parametrize("method", ["teacache", "magcache"])
def test_on_digits_dit(method):
    b = build_model("digits-dit")
    x, c, g = inputs(b, range(2), [3, 8])
    ref = plain(b, 8)(x, c, 2.0, g)
    off = METHODS.get(method)(threshold=0.0, **CALIB)
    assert torch.equal(off.prepare(b, 8)(x, c, 2.0, g), ref)
    ad = METHODS.get(method)(threshold=0.3, **CALIB)
    sampler = ad.prepare(b, 8)
    with UnitCounter(dict(block_lists(target_model(b.denoiser.net))[1:])) as uc:
        out = sampler(x, c, 2.0, g)
    assert uc.computed < uc.called
    assert not torch.equal(out, ref)
    assert (out - ref).abs().mean() < 0.2 * ref.abs().mean()  # close to, not equal to, the uncached samples


# --- tiny random-weight FluxTransformer2DModel, called directly ---------------------------------


@pytest.fixture(scope="module")
def tiny_flux():
    return tiny_flux_model()


def trajectory(model, n: int) -> list[dict]:
    """n calls along a made-up trajectory: the same noise drifting, time decreasing."""
    base = flux_args(model, 0)
    out = []
    for i in range(n):
        a = dict(base)
        torch.manual_seed(100 + i)
        a["hidden_states"] = base["hidden_states"] + 0.3 * i * torch.randn_like(base["hidden_states"])
        a["timestep"] = torch.full((2,), 1.0 - i / n)
        out.append(a)
    return out


def hooked_calls(model, ad, args_list) -> tuple[list[torch.Tensor], list[bool]]:
    """Call the cached model on each input; return outputs and, per call, whether the block stack ran."""
    ran: list[bool] = []
    last = block_lists(model)[-1][1]
    h = last.attn.register_forward_pre_hook(lambda *a: ran.append(True))
    outs, computed = [], []
    try:
        with ad.installed(model, len(args_list)), torch.no_grad():
            for a in args_list:
                n = len(ran)
                outs.append(model(**a)[0])
                computed.append(len(ran) > n)
    finally:
        h.remove()
    return outs, computed


def test_threshold_zero_bit_identical_on_tiny_flux(tiny_flux):
    m = tiny_flux
    args = trajectory(m, 5)
    before_dict, before_params = dict_state(m), copy.deepcopy(m.state_dict())
    with torch.no_grad():
        ref = [m(**a)[0] for a in args]
    tea = METHODS.get("teacache")(threshold=0.0)
    tea.use({"n_calls": 5, "coefficients": [-1.0, 0.0]})  # even a polynomial that goes negative never skips at 0
    mag = METHODS.get("magcache")(threshold=0.0, retention=0.0)
    mag.use({"n_calls": 5, "mag_ratios": [1.0] * 5})  # even exactly-1 ratios (zero predicted error) never skip at 0
    for ad in (tea, mag):
        outs, computed = hooked_calls(m, ad, args)
        assert all(computed)
        assert all(torch.equal(o, r) for o, r in zip(outs, ref, strict=True))
        assert_model_clean(m, before_dict, before_params)


def test_teacache_skip_pattern_follows_the_accumulated_indicator(tiny_flux):
    m = tiny_flux
    a = flux_args(m, 1)
    with torch.no_grad():
        full = m(**a)[0]
    # a constant rescaling polynomial (0.4 per call), threshold 1: accumulator 0.4, 0.8 skip; 1.2 runs and resets
    ad = METHODS.get("teacache")(threshold=1.0)
    ad.use({"n_calls": 7, "coefficients": [0.4]})
    units = dict(block_lists(m)[1:])
    with UnitCounter(units) as uc:
        outs, computed = hooked_calls(m, ad, [a] * 7)
    assert computed == [True, False, False, True, False, False, True]  # first and last always full
    assert ad.skip_log == [not c for c in computed]
    assert uc.called == 7 * len(units) and uc.computed == 3 * len(units)
    for o in outs:  # same input each call: input + cached residual = the full output
        torch.testing.assert_close(o, full, rtol=1e-5, atol=1e-5)
    # the real indicator: relative L1 change of the first block's norm1 output, rescaled by the identity
    args = trajectory(m, 8)
    seen: list[dict] = []
    block0 = block_lists(m)[0][1]
    h = block0.register_forward_pre_hook(lambda mod, ar, kw: seen.append(kw), with_kwargs=True)
    with torch.no_grad():
        for x in args:
            m(**x)
        mods = [block0.norm1(kw["hidden_states"], emb=kw["temb"])[0] for kw in seen]
    h.remove()
    rel = [float((mods[i] - mods[i - 1]).abs().mean() / mods[i - 1].abs().mean()) for i in range(1, 8)]
    thr = 1.5 * float(np.median(rel))
    want, acc = [True], 0.0
    for i in range(1, 8):
        acc += rel[i - 1]
        if i < 7 and acc < thr:
            want.append(False)
        else:
            want.append(True)
            acc = 0.0
    assert True in want[1:-1] and False in want  # the case exercises both branches
    ad = METHODS.get("teacache")(threshold=thr)
    ad.use({"n_calls": 8, "coefficients": [1.0, 0.0]})
    _, computed = hooked_calls(m, ad, args)
    assert computed == want


def test_magcache_skip_pattern_follows_the_accumulated_ratio_error(tiny_flux):
    m = tiny_flux
    args = trajectory(m, 8)
    # retention 0.25 of 8 calls: calls 0, 1 always computed; threshold 0.15, K = 2
    ratios = [1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 0.5]
    # call 2: prod .9, err .1 -> skip; 3: err .1 + .1 = .2 -> compute, reset; 4, 5: err 0 -> skip (2 in a row);
    # 6: third in a row > K -> compute, reset; 7: err .5 -> compute
    ad = METHODS.get("magcache")(threshold=0.15, max_skip=2, retention=0.25)
    ad.use({"n_calls": 8, "mag_ratios": ratios})
    outs, computed = hooked_calls(m, ad, args)
    assert computed == [True, True, False, True, False, False, True, True]
    # a skipped call returns its input plus the last computed residual: with the same input, the full output
    with torch.no_grad():
        full = m(**args[1])[0]
    ad = METHODS.get("magcache")(threshold=0.1, retention=0.0)
    ad.use({"n_calls": 3, "mag_ratios": [1.0, 1.0, 1.0]})
    outs, computed = hooked_calls(m, ad, [args[1]] * 3)
    assert computed == [True, False, False]
    torch.testing.assert_close(outs[2], full, rtol=1e-5, atol=1e-5)


# --- the calibration -------------------------------------------------------------------------


def test_teacache_fit_recovers_a_known_polynomial():
    rng = np.random.default_rng(0)
    true = np.array([3.0, -2.0, 0.5, 0.8, 0.01])
    x = rng.uniform(0.01, 0.4, size=(12, 5))
    coef = fit_rescale(x, np.polyval(true, x), 4)
    np.testing.assert_allclose(coef, true, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="lower the degree"):
        fit_rescale([0.1, 0.2], [0.1, 0.2], 4)


def test_calibration_records_the_pairs_and_ratios_by_hand(tiny_flux):
    # MagCache's ratio on hand-made residuals: token norms 2 and 1 -> 2; mixed per token -> mean of ratios
    prev = torch.zeros(1, 2, 4)
    prev[0, :, 0] = 1.0
    assert magnitude_ratio(2 * prev, prev) == pytest.approx(2.0, rel=1e-6)
    cur = prev.clone()
    cur[0, 1, 0] = 3.0
    assert magnitude_ratio(cur, prev) == pytest.approx(2.0, rel=1e-6)  # (1 + 3) / 2
    # the recorder on a tiny Flux: compare with residuals, modulated inputs and outputs taken by hand
    m = tiny_flux
    args = trajectory(m, 4)
    blocks = block_lists(m)
    head, tail = blocks[0][1], blocks[-1][1]
    ins, outs, mods = [], [], []
    h1 = head.register_forward_pre_hook(lambda mod, ar, kw: ins.append(kw), with_kwargs=True)
    h2 = tail.register_forward_hook(lambda mod, ar, out: outs.append(out[1]))
    with torch.no_grad():
        model_out = [m(**a)[0] for a in args]
        mods = [head.norm1(kw["hidden_states"], emb=kw["temb"])[0] for kw in ins]
    h1.remove()
    h2.remove()
    res = [o - kw["hidden_states"] for o, kw in zip(outs, ins, strict=True)]
    with torch.no_grad():
        rec = record_run(m, lambda: [m(**a) for a in args], modulation=True)
    assert rec.calls == 4
    want = [1.0] + [float((res[i].norm(dim=-1) / (res[i - 1].norm(dim=-1) + 1e-8)).mean()) for i in range(1, 4)]
    np.testing.assert_allclose(rec.mag_ratios, want, rtol=1e-5)
    for i in range(1, 4):
        row_x = [float((mods[i][r] - mods[i - 1][r]).abs().mean() / mods[i - 1][r].abs().mean()) for r in range(2)]
        row_y = [float((model_out[i][r] - model_out[i - 1][r]).abs().mean() / model_out[i - 1][r].abs().mean()) for r in range(2)]
        np.testing.assert_allclose(rec.tea_x[i - 1], row_x, rtol=1e-5)
        np.testing.assert_allclose(rec.tea_y[i - 1], row_y, rtol=1e-5)
    np.testing.assert_allclose(rel_l1(mods[1], mods[0]).numpy(), rec.tea_x[0], rtol=1e-6)
    assert not any("_diffusers_hook" in mm.__dict__ or "forward" in mm.__dict__ for mm in m.modules())


def test_calibration_built_once_reused_and_its_cost_recorded(flow_bundle, bench_home, capsys):
    b = flow_bundle
    ad = METHODS.get("teacache")(**CALIB)
    cal = ad.calibrate(b, STEPS)
    assert cal.artifact.built and cal.artifact.path.parent == bench_home / "artifacts"
    rec = cal.artifact.record
    assert rec["method"] == "teacache" and rec["params"]["steps"] == STEPS and rec["params"]["solver"] == "euler"
    cost = cal.artifact.cost  # counted by the harness on the teacher network: STEPS guided calls of calib_samples rows x 2
    assert cost["teacher_calls"] == STEPS and cost["teacher_rows"] == STEPS * CALIB["calib_samples"] * 2 and cost["wall_s"] > 0
    data = json.loads((cal.artifact.path / "calibration.json").read_text())
    assert data["n_calls"] == STEPS and len(data["coefficients"]) == 5 and len(data["x"]) == STEPS - 1
    again = METHODS.get("teacache")(**CALIB)
    prepared = again.prepare(b, STEPS)  # the adapter's prepare gets the same artifact: not rebuilt
    assert again.calibration.artifact.built is False and again.calibration.artifact.path == cal.artifact.path
    assert [a.key for a in prepared.artifacts] == [cal.artifact.key] and prepared.artifacts[0].cost == cost
    assert METHODS.get("teacache")(threshold=0.7, **CALIB).calibrate(b, STEPS).artifact.built is False  # threshold not in spec
    assert METHODS.get("teacache")(calib_samples=3).calibrate(b, STEPS).artifact.built  # a calibration knob is
    assert METHODS.get("magcache")(**CALIB).calibrate(b, STEPS).artifact.path != cal.artifact.path
    assert METHODS.get("teacache").training == METHODS.get("magcache").training == "calibration"


def test_bench_calibrate_cli(bench_home, capsys):
    assert main(["calibrate", "magcache", "--model", "digits-dit", "--steps", "3", "--knob", "calib_samples=2", "--json"]) == 0
    (first,) = json.loads(capsys.readouterr().out)["artifacts"]
    assert first["built"] is True and first["cost"]["teacher_rows"] == 3 * 2 * 2 and first["cost"]["wall_s"] > 0
    assert first["path"].startswith(str(bench_home))
    assert main(["calibrate", "magcache", "--model", "digits-dit", "--steps", "3", "--knob", "calib_samples=2"]) == 0
    text = capsys.readouterr().out
    assert "found (already built)" in text and first["path"] in text and "12 teacher network rows" in text
    ad, _ = calibrate("magcache", "digits-dit", 3, knobs={"calib_samples": 2})
    ad.prepare(build_model("digits-dit"), 3)
    assert str(ad.calibration.artifact.path) == first["path"]


def test_bad_input_fails_clearly(flow_bundle):
    with pytest.raises(SystemExit, match="builds no artifact with these knobs; methods that train or calibrate: .*teacache"):
        main(["calibrate", "euler", "--model", "digits-dit"])
    assert main(["calibrate", "teacahce", "--model", "digits-dit"]) == 2  # unknown name: closest names printed
    with pytest.raises(SystemExit, match="calib_samples"):
        main(["calibrate", "teacache", "--model", "digits-dit", "--knob", "calib_sample=2"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_knobs(["calib_samples"])
    with pytest.raises(ValueError, match="not a solver"):
        METHODS.get("teacache")(solver="fora", **CALIB).prepare(flow_bundle, STEPS)
    with pytest.raises(ValueError, match="call prepare"):
        METHODS.get("magcache")().apply(target_model(flow_bundle.denoiser.net), STEPS)
    with pytest.raises(ValueError, match="applies to arch=dit"):
        METHODS.get("teacache")().prepare(random_bundle("eps"), STEPS)
