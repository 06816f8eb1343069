"""Delta-DiT and Block Caching: disabled = bit-identical, clean removal, no leaks, the algorithms,
and Block Caching's calibrated schedule as a once-built artifact."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import assert_model_clean, dict_state, inputs, random_bundle, tiny_flux_model

import methods.caching  # noqa: F401  (registers the caches)
import methods.solvers  # noqa: F401
from bench.accounting import UnitCounter
from bench.artifacts import default_artifact_store
from bench.models import build_model
from bench.registry import METHODS
from methods.caching.base import block_lists, target_model
from methods.caching.block_caching import build_schedule
from methods.caching.delta_dit import schedule

STEPS = 6
CASES = [  # (method, knobs that disable caching, knobs that cache)
    ("delta_dit", {"interval": 1}, {"interval": 2, "span": 2}),
    ("block_caching", {"threshold": 0.0}, {"threshold": 0.5}),
]
IDS = [c[0] for c in CASES]


def flux_args(model, seed: int):
    torch.manual_seed(seed)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    kw = dict(
        hidden_states=torch.randn(2, 16, model.config.in_channels),
        encoder_hidden_states=torch.randn(2, 3, model.config.joint_attention_dim),
        pooled_projections=torch.randn(2, model.config.pooled_projection_dim),
        timestep=torch.tensor([0.5, 0.5]),
        img_ids=ids,
        txt_ids=torch.zeros(3, 3),
        return_dict=False,
    )
    return (), kw


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Artifacts (Block Caching's calibrations) in a fresh $BENCH_HOME per test."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def flow():
    return random_bundle("flow")


def euler(b, steps=STEPS):
    return METHODS.get("euler")().prepare(b, steps)


@pytest.mark.parametrize(("method", "off", "on"), CASES, ids=IDS)
def test_disabled_is_bit_identical_and_removal_restores(flow, method, off, on):
    b = flow
    model = target_model(b.denoiser.net)
    before_dict, before_params = dict_state(model), copy.deepcopy(model.state_dict())
    x, c, g = inputs(b, range(2), [1, 7])
    ref = euler(b)(x, c, 2.0, g)
    ad = METHODS.get(method)(**off)
    sampler = ad.prepare(b, STEPS)
    with UnitCounter(ad.units(model)) as uc:
        out = sampler(x, c, 2.0, g)
    assert torch.equal(out, ref)
    assert uc.called == STEPS * len(block_lists(model)) and uc.computed == uc.called
    cached = METHODS.get(method)(**on).prepare(b, STEPS)(x, c, 2.0, g)
    assert not torch.equal(cached, ref) and torch.isfinite(cached).all()
    assert_model_clean(model, before_dict, before_params)
    assert torch.equal(euler(b)(x, c, 2.0, g), ref)


@pytest.mark.parametrize(("method", "off", "on"), CASES, ids=IDS)
def test_no_state_leaks_between_jobs(flow, method, off, on):
    b = flow
    xa, ca, ga = inputs(b, range(2), [0, 9])
    xb, cb, gb = inputs(b, range(5, 6), [3])
    b_alone = METHODS.get(method)(**on).prepare(b, STEPS)(xb, cb, 1.5, gb)
    sampler = METHODS.get(method)(**on).prepare(b, STEPS)
    sampler(xa, ca, 3.0, ga)  # job A: other batch size, labels, guidance
    assert torch.equal(sampler(xb, cb, 1.5, gb), b_alone)


@pytest.mark.parametrize(("method", "off", "on"), CASES, ids=IDS)
def test_on_digits_dit(method, off, on):
    b = build_model("digits-dit")
    x, c, g = inputs(b, range(2), [3, 8])
    ref = euler(b)(x, c, 2.0, g)
    assert torch.equal(METHODS.get(method)(**off).prepare(b, STEPS)(x, c, 2.0, g), ref)
    ad = METHODS.get(method)(**on)
    sampler = ad.prepare(b, STEPS)
    with UnitCounter(ad.units(target_model(b.denoiser.net))) as uc:
        out = sampler(x, c, 2.0, g)
    assert uc.computed < uc.called
    assert not torch.equal(out, ref) and (out - ref).abs().mean() < 0.5 * ref.abs().mean()


# --- Delta-DiT ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flux():
    return tiny_flux_model()


def test_delta_dit_schedule():
    # 8 calls, boundary 0.5: calls 0-3 cache the rear span, 4-7 the front; full every 3 calls per stage
    got = [schedule(i, 8, 3, 0.5) for i in range(8)]
    assert got == [
        (True, True),
        (True, False),
        (True, False),
        (True, True),
        (False, True),
        (False, False),
        (False, False),
        (False, True),
    ]
    assert all(full for _, full in (schedule(i, 8, 1, 0.5) for i in range(8)))
    assert not any(rear for rear, _ in (schedule(i, 8, 2, 0.0) for i in range(8)))  # boundary 0: front span throughout


def test_delta_dit_caches_the_rear_span_before_the_boundary_and_the_front_span_after(tiny_flux):
    m = tiny_flux
    blocks = block_lists(m)  # 2 double + 2 single blocks
    names = [n for n, _ in blocks]
    front, rear = names[:2], names[2:]
    ad = METHODS.get("delta_dit")(interval=2, span=2, boundary=0.5)
    args = [flux_args(m, s) for s in range(1, 9)]
    # the span's input (head block's input) and output (tail block's output) on every call
    seen: dict[str, list] = {n: [] for n in names}
    hooks = []
    for n, blk in blocks:
        hooks.append(blk.register_forward_hook(lambda mod, a, kw, out, n=n: seen[n].append((kw, out)), with_kwargs=True))
    try:
        with ad.installed(m, 8), torch.no_grad():
            counters = []
            for stage in (args[:4], args[4:]):  # calls 0-3 (before the boundary), 4-7 (after)
                with UnitCounter(ad.units(m)) as uc:
                    for a in stage:
                        m(*a[0], **a[1])
                counters.append(uc)
    finally:
        for h in hooks:
            h.remove()
    early, late = counters
    assert {n: early.per_unit[n] for n in names} == {**dict.fromkeys(front, 4), **dict.fromkeys(rear, 2)}
    assert {n: late.per_unit[n] for n in names} == {**dict.fromkeys(front, 2), **dict.fromkeys(rear, 4)}

    def streams(kw_or_out, is_out):
        if is_out:
            ehs, hs = kw_or_out
            return hs, ehs
        return kw_or_out["hidden_states"], kw_or_out["encoder_hidden_states"]

    # cached call = the span's fresh input plus the delta (span output - span input) of the last full call
    for head, tail, full_call, cached_call in ((rear[0], rear[-1], 2, 3), (front[0], front[-1], 6, 7)):
        d = [
            o - i for o, i in zip(streams(seen[tail][full_call][1], True), streams(seen[head][full_call][0], False), strict=True)
        ]
        fresh_in = streams(seen[head][cached_call][0], False)
        got = streams(seen[tail][cached_call][1], True)
        for g_, x_, d_ in zip(got, fresh_in, d, strict=True):
            assert torch.equal(g_, x_ + d_)
        assert not torch.allclose(fresh_in[0], streams(seen[head][full_call][0], False)[0])  # a really new input


def test_delta_dit_span_larger_than_the_model_fails_clearly(tiny_flux):
    with pytest.raises(ValueError, match="set span <= 4"):
        METHODS.get("delta_dit")(span=5).units(tiny_flux)


def test_delta_dit_interval_one_on_tiny_flux_is_bit_identical(tiny_flux):
    m = tiny_flux
    a = [flux_args(m, s) for s in (1, 2, 3)]
    with torch.no_grad():
        ref = [m(*x[0], **x[1])[0] for x in a]
    for knobs in ({"interval": 1, "span": 4}, {"interval": 1, "span": 1, "boundary": 0.0}):
        ad = METHODS.get("delta_dit")(**knobs)
        with ad.installed(m, 3), torch.no_grad():
            out = [m(*x[0], **x[1])[0] for x in a]
        assert all(torch.equal(o, r) for o, r in zip(out, ref, strict=True))


# --- Block Caching --------------------------------------------------------------------------


def test_block_caching_schedule_by_hand():
    inf = float("inf")
    change = np.array([[inf, 0.1, 0.1, 0.1, 0.5, 0.05], [inf, 0.3, 0.01, 0.01, 0.01, 0.01]])
    # block 0: acc .1, .2 (reuse), .3 > .25 (compute, reset), .5 (compute), .05 (reuse)
    # block 1: .3 (compute, reset), then .01 .. .04 (reuse)
    want = np.array([[1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=bool)
    assert np.array_equal(build_schedule(change, 0.25), want)
    assert build_schedule(change, 0.0).all()
    assert np.array_equal(build_schedule(change, 10.0), np.array([[1, 0, 0, 0, 0, 0]] * 2, dtype=bool))


def test_block_caching_runs_its_schedule(flow):
    b = flow
    model = target_model(b.denoiser.net)
    ad = METHODS.get("block_caching")(threshold=0.4)
    sampler = ad.prepare(b, STEPS)
    x, c, g = inputs(b, range(2), [1, 2])
    with UnitCounter(ad.units(model)) as uc:
        sampler(x, c, 2.0, g)
    assert ad.schedule.shape == (len(block_lists(model)), STEPS)
    assert 0 < ad.schedule.mean() < 1
    assert [uc.per_unit[n] for n, _ in block_lists(model)] == ad.schedule.sum(1).tolist()
    assert np.isinf(ad.change[:, 0]).all() and (ad.change[:, 1:] > 0).all() and np.isfinite(ad.change[:, 1:]).all()


def test_block_caching_artifact_is_built_once_and_its_cost_recorded(flow, home):
    b = flow
    ad = METHODS.get("block_caching")(threshold=0.3)
    (art,) = ad.prepare(b, STEPS).artifacts
    # the harness counted the calibration run's teacher forwards: STEPS calls of 8 guided samples (2 rows each)
    assert art.built and art.cost["wall_s"] > 0 and art.cost["teacher_calls"] == STEPS
    assert art.cost["teacher_rows"] == STEPS * 8 * 2 and art.chain_cost["wall_s"] == art.cost["wall_s"]
    again = METHODS.get("block_caching")(threshold=0.3).prepare(b, STEPS)
    assert not again.artifacts[0].built and again.artifacts[0].path == art.path
    rec = json.loads((art.path / "artifact.json").read_text())
    assert rec["method"] == "block_caching" and rec["name"] == "change-table"
    assert {"steps", "solver", "net", "calib_guidance"} <= set(rec["params"]) and "threshold" not in rec["params"]
    assert rec["params"]["net"].startswith("params-")  # random weights: identified by a hash of the parameters
    # another threshold: a new schedule from the same (not re-run) change table
    other = METHODS.get("block_caching")(threshold=0.6)
    (o,) = other.prepare(b, STEPS).artifacts
    assert o.key == art.key and not o.built and other.schedule.sum() <= ad.schedule.sum()
    assert len(list((home / "artifacts").glob("*/artifact.json"))) == 1
    assert default_artifact_store().root == home / "artifacts"
    assert METHODS.get("block_caching").training == "calibration"


def test_bench_calibrate_builds_the_block_caching_table_once(home):
    from bench import calibrate as cal

    assert "block_caching" in cal.methods_with_artifacts()
    ad, (a,) = cal.calibrate("block_caching", "digits-dit", steps=4, knobs={"threshold": 0.3})
    assert a.built and a.path.parent == home / "artifacts" and (a.path / "change.npy").is_file()
    assert a.cost["teacher_calls"] == 4 and a.cost["teacher_rows"] == 4 * 8 * 2
    # a suite job with the same spec finds it: prepare does not calibrate again
    again = METHODS.get("block_caching")(threshold=0.3).prepare(build_model("digits-dit"), 4)
    assert again.artifacts[0].key == a.key and not again.artifacts[0].built
    assert len(list((home / "artifacts").glob("*/artifact.json"))) == 1
