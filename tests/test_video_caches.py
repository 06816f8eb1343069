"""The video caches on the embedded video teacher (``moving-digits-dit``): its layer layout, each
cache disabled = uncached bit for bit, and each cache's skip pattern checked by hand, PAB's per
attention type. (Measured against FLOPs-implied speedup: ``benchmarks/cache_speedup.py``.)"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import LatteTransformer3DModel
from helpers import assert_model_clean, dict_state, hooked_calls, inputs
from safetensors.torch import load_file

import methods.caching  # noqa: F401  (registers the caches)
import methods.solvers  # noqa: F401
from bench.accounting import UnitCounter
from bench.models import build_model
from bench.models.video import LATTE_CONFIG, MovingDigitsDiT
from bench.paths import ASSETS
from bench.registry import METHODS
from methods.caching.base import block_lists, target_model

STEPS = 4
# (method, knobs that disable caching, knobs that cache)
VIDEO_CACHES = [
    ("first_block_cache", {"threshold": 0.0}, {"threshold": 0.5}),
    ("teacache", {"threshold": 0.0}, {"threshold": 0.5, "calib_samples": 2, "degree": 1}),
    ("magcache", {"threshold": 0.0}, {"threshold": 0.5, "retention": 0.0, "calib_samples": 2}),
    ("taylorseer", {"interval": 1}, {"interval": 2, "warmup": 1}),
    ("pab", {"spatial": 1, "temporal": 1, "cross": 1}, {"t_low": -1.0, "t_high": 1001.0}),
    ("fastercache", {"attn_interval": 1, "cfg_interval": 1}, {}),
]


@pytest.fixture(scope="module")
def teacher():
    return build_model("moving-digits-dit")


def stack_args(model, seed: int, t: float = 500.0, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 1, 8, 16, 16, generator=g),
        timestep=torch.full((batch,), t),
        encoder_hidden_states=torch.randn(batch, 1, LATTE_CONFIG["caption_channels"], generator=g),
    )


def test_the_teacher_computes_what_diffusers_latte_computes_on_the_committed_weights(teacher):
    net = teacher.denoiser.net
    ref = LatteTransformer3DModel(**LATTE_CONFIG)
    state = load_file(str(ASSETS / "moving-digits-dit.safetensors"))
    ref.load_state_dict({k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")})
    a = stack_args(net.transformer, 0)
    a["timestep"] = torch.tensor([900.0, 30.0])
    with torch.no_grad():
        mine = net.transformer(**a)
        theirs = ref(**a, return_dict=False)[0]
    assert torch.equal(mine, theirs)
    # one unit per Latte layer: its spatial then its temporal block, so the stack has one layout throughout
    blocks = block_lists(net.transformer)
    assert [n for n, _ in blocks] == [f"transformer_blocks.{i}" for i in range(LATTE_CONFIG["num_layers"])]
    # the file written by `bench train` in the new layout loads as well
    again = MovingDigitsDiT()
    again.load_state_dict(net.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), net.parameters(), strict=True))


@pytest.mark.parametrize(("method", "off", "on"), VIDEO_CACHES, ids=[c[0] for c in VIDEO_CACHES])
def test_disabled_is_bit_identical_and_removal_restores(teacher, method, off, on):
    b = teacher
    model = target_model(b.denoiser.net)
    before_dict, before_params = dict_state(model), copy.deepcopy(model.state_dict())
    x, c, g = inputs(b, range(2), [1, 7])
    ad = METHODS.get(method)(**off)
    ref = METHODS.get(ad.config["solver"])().prepare(b, STEPS)(x, c, 2.0, g)
    with UnitCounter(ad.units(model)) as uc:
        out = ad.prepare(b, STEPS)(x, c, 2.0, g)
    assert torch.equal(out, ref)
    assert uc.called > 0 and uc.computed == uc.called
    cached = METHODS.get(method)(**on)
    with UnitCounter(cached.units(model)) as uc:
        out = cached.prepare(b, STEPS)(x, c, 2.0, g)
    assert uc.computed < uc.called and not torch.equal(out, ref)  # fewer units, another result
    assert_model_clean(model, before_dict, before_params)
    assert torch.equal(METHODS.get(ad.config["solver"])().prepare(b, STEPS)(x, c, 2.0, g), ref)


def test_pab_broadcasts_spatial_temporal_and_cross_attention_each_at_its_own_range(teacher):
    m = target_model(teacher.denoiser.net)
    ad = METHODS.get("pab")(spatial=2, temporal=3, cross=4)  # window (100, 800)
    kinds = {"spatial": [], "temporal": [], "cross": []}
    for name in ad.units(m):
        kind = "cross" if name.endswith("spatial.attn2") else "temporal" if ".temporal." in name else "spatial"
        kinds[kind].append(name)
    assert all(len(v) == LATTE_CONFIG["num_layers"] for v in kinds.values())
    ts = [900.0, 700.0, 600.0, 500.0, 400.0, 300.0, 50.0]  # outside, five inside, outside
    # a layer computes outside the window, on its first call, and when its call index is a multiple of its range
    want = {"spatial": [1, 0, 1, 0, 1, 0, 1], "temporal": [1, 0, 0, 1, 0, 0, 1], "cross": [1, 0, 0, 0, 1, 0, 1]}
    seen = {k: [] for k in kinds}
    args = [stack_args(m, i, t) for i, t in enumerate(ts)]
    with ad.installed(m, len(ts)), torch.no_grad():
        for a in args:
            with UnitCounter(ad.units(m)) as uc:
                m(**a)
            for kind, names in kinds.items():
                seen[kind].append(int(all(uc.per_unit[n] == 1 for n in names)))
                assert len({uc.per_unit[n] for n in names}) == 1  # every layer of a kind decides alike
    assert seen == want


def test_first_block_cache_reuses_the_rest_of_the_stack_when_the_first_layer_is_unchanged(teacher):
    m = target_model(teacher.denoiser.net)
    a, bb = stack_args(m, 1), stack_args(m, 2)
    with torch.no_grad():
        full_a = m(**a)
    ad = METHODS.get("first_block_cache")(threshold=0.05)
    outs, uc = hooked_calls(m, ad, [a, a, bb])
    rest = len(ad.units(m))
    assert rest == LATTE_CONFIG["num_layers"] - 1
    assert uc.computed == 2 * rest and uc.called == 3 * rest  # the repeat skipped, the new input did not
    torch.testing.assert_close(outs[1], full_a, rtol=1e-5, atol=1e-5)  # first layer + cached residual = full


def test_teacache_skips_by_the_accumulated_indicator_and_adds_the_cached_residual(teacher):
    m = target_model(teacher.denoiser.net)
    a = stack_args(m, 3)
    with torch.no_grad():
        full = m(**a)
    # a constant rescaling polynomial (0.4 per call), threshold 1: accumulator 0.4, 0.8 skip; 1.2 runs and resets
    ad = METHODS.get("teacache")(threshold=1.0)
    ad.use({"n_calls": 7, "coefficients": [0.4]})
    outs, uc = hooked_calls(m, ad, [a] * 7)
    assert ad.skip_log == [False, True, True, False, True, True, False]  # first and last always full
    n = len(ad.units(m))
    # the first layer counts as computed on every call: its modulated input (the indicator) is computed
    assert uc.called == 7 * n and uc.computed == 3 * n + 4
    for o in outs:  # same input each call: input + cached residual = the full output
        torch.testing.assert_close(o, full, rtol=1e-5, atol=1e-5)
    # the indicator is the first spatial block's modulated input: LayerNorm(h) * (1 + scale) + shift
    blk = m.transformer_blocks[0]
    h, temb = torch.randn(16, 64, 64), torch.randn(16, 6 * 64)
    shift, scale = (blk.spatial.scale_shift_table[None] + temb.reshape(16, 6, 64))[:, 0:2].unbind(1)
    ln = blk.spatial.norm1
    want = torch.nn.functional.layer_norm(h, (64,), ln.weight, ln.bias, ln.eps) * (1 + scale[:, None]) + shift[:, None]
    with torch.no_grad():
        torch.testing.assert_close(blk.norm1(h, emb=temb), want, rtol=1e-5, atol=1e-5)


def test_magcache_skips_by_the_accumulated_ratio_error(teacher):
    m = target_model(teacher.denoiser.net)
    args = [stack_args(m, 10 + i, 900.0 - 100 * i) for i in range(8)]
    ratios = [1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 0.5]
    # retention 0.25 of 8: calls 0, 1 computed; 2: err .1 skip; 3: .2 compute, reset; 4, 5 skip; 6: > K computes; 7: .5
    ad = METHODS.get("magcache")(threshold=0.15, max_skip=2, retention=0.25)
    ad.use({"n_calls": 8, "mag_ratios": ratios})
    ran = []
    last = m.transformer_blocks[-1]
    h = last.temporal.register_forward_pre_hook(lambda *x: ran.append(True))
    try:
        with ad.installed(m, 8), torch.no_grad():
            computed = []
            for a in args:
                n = len(ran)
                m(**a)
                computed.append(len(ran) > n)
    finally:
        h.remove()
    assert computed == [True, True, False, True, False, False, True, True]


def test_taylorseer_forecasts_spatial_and_temporal_sublayers(teacher):
    m = target_model(teacher.denoiser.net)
    ad = METHODS.get("taylorseer")(interval=3, order=1, warmup=3)
    units = ad.units(m)
    assert {n.split(".", 2)[2] for n in units} == {
        "spatial.attn1",
        "spatial.attn2",
        "spatial.ff",
        "temporal.attn1",
        "temporal.ff",
    }
    layer = m.transformer_blocks[1].temporal.ff
    seen: list[torch.Tensor] = []
    h = layer.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone()))
    try:
        _, uc = hooked_calls(m, ad, [stack_args(m, s, 800.0 - 100 * s) for s in range(4)])  # full 0, 1, 2; forecast 3
    finally:
        h.remove()
    assert uc.called == 4 * len(units) and uc.computed == 3 * len(units)
    torch.testing.assert_close(seen[3], seen[2] + (seen[2] - seen[1]), rtol=1e-5, atol=1e-5)


def test_fastercache_extrapolates_spatial_and_temporal_attention_not_cross(teacher):
    m = target_model(teacher.denoiser.net)
    ad = METHODS.get("fastercache")(attn_interval=2)
    names = set(ad.units(m))
    assert names == {
        f"transformer_blocks.{i}.{k}.attn1" for i in range(LATTE_CONFIG["num_layers"]) for k in ("spatial", "temporal")
    }
    _, uc = hooked_calls(m, ad, [stack_args(m, s, 300.0) for s in range(6)])  # inside the window (t < 681)
    # per layer: calls 0, 1 (one computed output so far), 2, 4 computed; 3, 5 extrapolated
    assert uc.called == 6 * len(names) and uc.computed == 4 * len(names)
    assert ad.attention_hooks["transformer_blocks.0.temporal.attn1"].decisions == [True, True, True, False, True, False]


def test_fastercache_cfg_split_is_over_each_frame_plane(teacher):
    from methods.caching.fastercache import split_frequencies

    x = torch.randn(2, 8, 1, 16, 16)
    lo, hi = split_frequencies(x)
    assert lo.shape == x.shape
    # each frame's own 2-D spectrum: the split of one frame alone is the same
    lo1, _ = split_frequencies(x[:, 3])
    torch.testing.assert_close(lo[:, 3], lo1)


def test_taylorseer_skips_only_dead_norms(teacher):
    """The pre-norms TaylorSeer leaves uncomputed on forecast calls feed nothing else: the samples
    are bit-identical with and without skipping them, and fewer LayerNorm calls run."""
    from methods.caching.taylorseer import TaylorSeer, dead_norms

    b = teacher
    m = target_model(b.denoiser.net)
    assert len(dead_norms(m)) == 2 * 2 * LATTE_CONFIG["num_layers"]  # norm1, norm2 of each spatial and temporal block
    x, c, g = inputs(b, range(2), [1, 7])
    norms = {str(i): n for i, n in enumerate(dead_norms(m))}  # affine LayerNorms: their weights show them computed
    runs = {}
    for skip in (False, True):
        TaylorSeer.skip_dead_norms = skip
        try:
            with UnitCounter(norms) as uc:
                out = METHODS.get("taylorseer")(interval=3, warmup=2).prepare(b, 8)(x, c, 2.0, g)
            runs[skip] = (out, uc.computed, uc.called)
        finally:
            TaylorSeer.skip_dead_norms = True
    assert torch.equal(runs[True][0], runs[False][0])
    # 8 calls: full 0, 1 (warm-up), 3, 6; forecast 2, 4, 5, 7 -> the norms run on 4 of 8 calls
    assert runs[False][1] == runs[False][2] == 8 * len(norms)
    assert runs[True][1] == 4 * len(norms) and runs[True][2] == 8 * len(norms)
