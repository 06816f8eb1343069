"""DBCache, PAB, FasterCache (with CFG-Cache) and ToCa: disabled = bit-identical, clean removal,
no leaks between jobs, and each algorithm as its paper states it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_model_clean, dict_state, flux_args, inputs, random_bundle, tiny_flux_model
from torch import nn

import methods.caching  # noqa: F401  (registers the caches)
import methods.solvers  # noqa: F401
from bench.accounting import ForwardCounter, UnitCounter
from bench.denoiser import Denoiser, FlowSchedule
from bench.models import ModelBundle, build_model
from bench.registry import METHODS
from methods.caching.base import block_lists, target_model
from methods.caching.dbcache import split_blocks
from methods.caching.fastercache import CFGCacheDenoiser
from methods.caching.pab import PAB

STEPS = 4  # flow timesteps 1000, 750, 500, 250: inside the default PAB / FasterCache windows from call 1 or 2
METHOD_CASES = [
    ("dbcache", {"threshold": 0.0}, {"threshold": 1.0}),
    ("dbcache", {"threshold": 0.0, "Fn": 2, "Bn": 2}, {"threshold": 1.0, "Fn": 2, "Bn": 2, "warmup": 1}),
    ("pab", {"spatial": 1}, {"spatial": 2}),
    ("pab", {"t_low": 1001.0}, {"spatial": 3, "t_low": -1.0, "t_high": 1001.0}),
    ("fastercache", {"attn_interval": 1, "cfg_interval": 1}, {}),
    ("fastercache", {"attn_interval": 1, "cfg_interval": 1}, {"attn_interval": 1, "cfg_interval": 2, "cfg_t_high": 1001.0}),
    ("toca", {"interval": 1}, {"interval": 3}),
    ("toca", {"ratio": 1.0, "interval": 2}, {"ratio": 0.5, "interval": 2}),
]
IDS = [f"{m}-{i}" for i, (m, *_) in enumerate(METHOD_CASES)]


def euler(bundle: ModelBundle, steps: int = STEPS):
    return METHODS.get("euler")().prepare(bundle, steps)


@pytest.fixture(scope="module")
def bundle():
    return random_bundle("flow")


@pytest.mark.parametrize(("method", "off", "on"), METHOD_CASES, ids=IDS)
def test_disabled_is_bit_identical_and_removal_restores(bundle, method, off, on):
    b = bundle
    model = target_model(b.denoiser.net)
    before_dict = dict_state(model)
    before_params = copy.deepcopy(model.state_dict())
    x, c, g = inputs(b, range(2), [1, 7])
    ref = euler(b)(x, c, 2.0, g)
    ad = METHODS.get(method)(**off)
    with UnitCounter(ad.units(model)) as uc, ForwardCounter(b.denoiser.net) as fc:
        out = ad.prepare(b, STEPS)(x, c, 2.0, g)
    assert torch.equal(out, ref)
    assert uc.called > 0 and uc.computed == uc.called
    assert fc.calls == STEPS and fc.rows == STEPS * 4  # every guided call: cond + uncond rows
    cached = METHODS.get(method)(**on).prepare(b, STEPS)(x, c, 2.0, g)
    assert not torch.equal(cached, ref)
    assert_model_clean(model, before_dict, before_params)
    assert torch.equal(euler(b)(x, c, 2.0, g), ref)


@pytest.mark.parametrize(("method", "off", "on"), METHOD_CASES, ids=IDS)
def test_no_state_leaks_between_jobs(bundle, method, off, on):
    b = bundle
    xa, ca, ga = inputs(b, range(3), [0, 9, 4])
    xb, cb, gb = inputs(b, range(5, 6), [3])
    sampler = METHODS.get(method)(**on).prepare(b, STEPS)
    b_alone = METHODS.get(method)(**on).prepare(b, STEPS)(xb, cb, 1.5, gb)
    sampler(xa, ca, 3.0, ga)  # job A (other batch size, classes, guidance)
    assert torch.equal(sampler(xb, cb, 1.5, gb), b_alone)


@pytest.mark.parametrize(
    ("method", "off", "on"),
    [
        ("dbcache", {"threshold": 0.0}, {"threshold": 0.3}),
        ("pab", {"spatial": 1}, {"spatial": 2}),
        ("fastercache", {"attn_interval": 1, "cfg_interval": 1}, {"cfg_interval": 3}),
        ("toca", {"ratio": 1.0}, {"interval": 2}),
    ],
)
def test_on_digits_dit(method, off, on):
    b = build_model("digits-dit")
    x, c, g = inputs(b, range(1), [3])
    ref = euler(b, 6)(x, c, 2.0, g)
    assert torch.equal(METHODS.get(method)(**off).prepare(b, 6)(x, c, 2.0, g), ref)
    ad = METHODS.get(method)(**on)
    with UnitCounter(ad.units(target_model(b.denoiser.net))) as uc, ForwardCounter(b.denoiser.net) as fc:
        out = ad.prepare(b, 6)(x, c, 2.0, g)
    assert uc.computed < uc.called or fc.rows < 6 * 2
    assert (out - ref).abs().mean() < 0.5 * ref.abs().mean()  # close to, not equal to, the uncached samples
    assert not torch.equal(out, ref)


def test_bad_knobs_fail_clearly(bundle):
    with pytest.raises(ValueError, match="lower Fn or Bn"):
        METHODS.get("dbcache")(Fn=3, Bn=3).prepare(bundle, 4)
    with pytest.raises(ValueError, match="applies to arch=dit"):
        METHODS.get("toca")().prepare(random_bundle("eps"), 4)


# --- tiny random-weight diffusers Flux transformer -----------------------------------------


@pytest.fixture(scope="module")
def tiny_flux():
    return tiny_flux_model()


def calls(model: nn.Module, ad, kwargs_list, units=None, steps: int = 10):
    outs = []
    with ad.installed(model, steps), UnitCounter(units if units is not None else ad.units(model)) as uc, torch.no_grad():
        for kw in kwargs_list:
            outs.append(model(**kw)[0])
    return outs, uc


def full(model, kw):
    with torch.no_grad():
        return model(**kw)[0]


# --- DBCache --------------------------------------------------------------------------------


@pytest.mark.parametrize(("fn", "bn"), [(1, 1), (2, 1), (1, 2)])
def test_dbcache_computes_exactly_first_fn_and_last_bn_blocks_on_a_cached_call(tiny_flux, fn, bn):
    m = tiny_flux
    a, bb = flux_args(m, 1), flux_args(m, 2)
    ad = METHODS.get("dbcache")(Fn=fn, Bn=bn, threshold=0.05)
    head, middle, tail = (dict(x) for x in split_blocks(m, fn, bn))
    outs, uc = calls(m, ad, [a, a, bb])  # the repeat is cached, the new input is not
    assert ad.decisions == [False, True, False]
    for name in head | tail:
        assert uc.per_unit[name] == 3
    for name in middle:
        assert uc.per_unit[name] == 2
    # cached call on an unchanged input: Fn output + cached middle residual, then the real Bn blocks
    torch.testing.assert_close(outs[1], full(m, a), rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[2], full(m, bb))
    # a changed input with a tail: the last Bn blocks see the approximation and still run
    outs, uc = calls(m, METHODS.get("dbcache")(Fn=fn, Bn=bn, threshold=10.0), [a, bb])
    assert all(uc.per_unit[n] == 2 for n in head | tail) and all(uc.per_unit[n] == 1 for n in middle)
    assert not torch.equal(outs[1], full(m, bb))


def test_dbcache_warmup_and_max_consecutive(tiny_flux):
    m = tiny_flux
    a = flux_args(m, 1)
    ad = METHODS.get("dbcache")(Fn=1, Bn=1, threshold=10.0, warmup=2, max_consecutive=1)
    calls(m, ad, [a] * 7)
    assert ad.decisions == [False, False, True, False, True, False, True]
    ad = METHODS.get("dbcache")(Fn=1, Bn=1, threshold=10.0)
    calls(m, ad, [a] * 4)
    assert ad.decisions == [False, True, True, True]


@pytest.mark.parametrize("threshold", [0.05, 0.5, 2.0])
def test_dbcache_fn1_bn0_equals_first_block_cache(bundle, threshold):
    b = bundle
    model = target_model(b.denoiser.net)
    rest = dict(block_lists(model)[1:])
    x, c, g = inputs(b, range(2), [2, 5])
    results = []
    for method, knobs in (("first_block_cache", {}), ("dbcache", {"Fn": 1, "Bn": 0})):
        with UnitCounter(rest) as uc:
            out = METHODS.get(method)(threshold=threshold, **knobs).prepare(b, 8)(x, c, 2.0, g)
        results.append((out, uc.per_unit))
    (fbc, fbc_units), (db, db_units) = results
    assert torch.equal(db, fbc) and db_units == fbc_units
    assert min(fbc_units.values()) < 8 or threshold < 2.0  # the grid includes real skipping


# --- PAB ------------------------------------------------------------------------------------


def test_pab_finds_every_flux_attention_as_spatial(tiny_flux):
    from methods.caching.pab import attention_layers

    layers = attention_layers(tiny_flux, PAB().pab_config(tiny_flux))
    assert sorted(layers) == [f"single_transformer_blocks.{i}.attn" for i in range(2)] + [
        f"transformer_blocks.{i}.attn" for i in range(2)
    ]
    assert {kind for kind, _ in layers.values()} == {"spatial"}


@pytest.mark.parametrize(("spatial", "pattern"), [(2, [1, 0, 1, 0, 1, 1]), (3, [1, 0, 0, 1, 1, 1])])
def test_pab_broadcasts_attention_exactly_in_the_configured_range_and_window(tiny_flux, spatial, pattern):
    m = tiny_flux
    # Flux takes timestep / 1000: scheduler timesteps 900 (outside (100, 800)), 700, 500, 300 (inside), 50, 20 (outside)
    ts = [0.9, 0.7, 0.5, 0.3, 0.05, 0.02]
    args = [flux_args(m, i, t) for i, t in enumerate(ts)]
    layer = m.single_transformer_blocks[1].attn
    seen: list[torch.Tensor] = []
    h = layer.register_forward_hook(lambda mod, a, out: seen.append(out))
    try:
        ad = METHODS.get("pab")(spatial=spatial)
        _, uc = calls(m, ad, args)
    finally:
        h.remove()
    for name in ad.units(m):
        assert uc.per_unit[name] == sum(pattern)
    for i, computed in enumerate(pattern):
        if not computed:
            assert seen[i] is seen[i - 1]  # the broadcast output, not a recomputation
        else:
            assert i == 0 or not torch.equal(seen[i], seen[i - 1])


# --- FasterCache ----------------------------------------------------------------------------


def test_fastercache_extrapolates_attention_from_the_two_latest_computed_outputs(tiny_flux):
    m = tiny_flux
    args = [flux_args(m, s, 0.3) for s in range(6)]  # t = 300 < 681: inside the reuse window
    single, double = m.single_transformer_blocks[0].attn, m.transformer_blocks[1].attn
    seen: dict[str, list] = {"s": [], "d": []}
    hs = [single.register_forward_hook(lambda mod, a, out: seen["s"].append(out))]
    hs.append(double.register_forward_hook(lambda mod, a, out: seen["d"].append(out)))
    try:
        ad = METHODS.get("fastercache")(attn_interval=2)
        _, uc = calls(m, ad, args)
    finally:
        for h in hs:
            h.remove()
    # per layer: calls 0, 1 (only one computed output yet), 2, 4 computed; 3, 5 extrapolated
    n = len(ad.units(m))
    assert uc.called == 6 * n and uc.computed == 4 * n
    assert ad.attention_hooks["transformer_blocks.1.attn"].decisions == [True, True, True, False, True, False]
    w = 1 - 300 / 1000
    s = seen["s"]
    torch.testing.assert_close(s[3], s[2] + w * (s[2] - s[1]))
    torch.testing.assert_close(s[5], s[4] + w * (s[4] - s[2]))  # from computed outputs, not the extrapolated s[3]
    d = seen["d"]
    for j in range(2):  # the joint attention returns (image, text) outputs: both extrapolated
        torch.testing.assert_close(d[3][j], d[2][j] + w * (d[2][j] - d[1][j]))
    # fixed weight, and nothing reused outside the window (t = 900)
    seen["s"].clear()
    h = single.register_forward_hook(lambda mod, a, out: seen["s"].append(out))
    try:
        calls(m, METHODS.get("fastercache")(attn_interval=2, attn_weight=0.25), args[:4])
        _, uc = calls(m, METHODS.get("fastercache")(attn_interval=2), [flux_args(m, s, 0.9) for s in range(4)])
    finally:
        h.remove()
    s = seen["s"]
    torch.testing.assert_close(s[3], s[2] + 0.25 * (s[2] - s[1]))
    assert uc.computed == uc.called


class ToyNet(nn.Module):
    """A class-conditional toy 'network' with spatial structure: net(x, t, cond) -> (B, C, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.emb = nn.Embedding(11, 2)

    def forward(self, x, t, cond):
        return torch.tanh(self.conv(x)) * (1 + t[:, None, None, None] / 1000) + self.emb(cond)[:, :, None, None]


def hand_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low/high split by hand: radius min(H, W) // 5 around the centre of the shifted spectrum."""
    h, w = x.shape[-2:]
    f = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
    r = min(h, w) // 5
    mask = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            mask[i, j] = (i - h // 2) ** 2 + (j - w // 2) ** 2 <= r * r
    return torch.where(mask, f, 0), torch.where(mask, 0, f)


def test_fastercache_cfg_cache_reconstructs_uncond_from_the_frequency_split_difference():
    den = Denoiser(ToyNet().eval(), "flow", FlowSchedule(), null_class=10)
    fc = CFGCacheDenoiser(den, interval=3, t_high=1001.0, alpha_low=1.5, alpha_high=0.5)
    torch.manual_seed(1)
    xs = [torch.randn(3, 2, 12, 10) for _ in range(4)]
    cond, g = torch.tensor([1, 4, 7]), 2.5
    ts = [950.0, 500.0, 200.0, 100.0]
    net = den.net
    with torch.no_grad(), ForwardCounter(net) as counter:
        outs = [fc(x, t, cond, g) for x, t in zip(xs, ts, strict=True)]
    assert fc.decisions == [True, False, False, True]  # calls 1, 2 cached; call 3 = 0 mod 3 is full
    assert counter.calls == 4 and counter.rows == 2 * 6 + 2 * 3  # cached calls run the conditional rows only
    null = torch.full_like(cond, 10)
    with torch.no_grad():
        c0, u0 = net(xs[0], torch.full((3,), ts[0]), cond), net(xs[0], torch.full((3,), ts[0]), null)
        d_lo, d_hi = (u - c for u, c in zip(hand_split(u0), hand_split(c0), strict=True))
        for i, (w_lo, w_hi) in ((1, (1.5, 1.0)), (2, (1.5, 0.5))):  # t = 500: low weight only; t = 200: both
            c = net(xs[i], torch.full((3,), ts[i]), cond)
            lo, hi = hand_split(c)
            u = torch.fft.ifft2(torch.fft.ifftshift(lo + w_lo * d_lo + hi + w_hi * d_hi, dim=(-2, -1))).real.float()
            torch.testing.assert_close(outs[i], u + g * (c - u), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[3], den(xs[3], ts[3], cond, g), rtol=0, atol=0)
    # unit weights: the uncond output is the conditional one plus the cached difference
    fc1 = CFGCacheDenoiser(den, interval=5, t_high=1001.0, alpha_low=1.0, alpha_high=1.0)
    with torch.no_grad():
        fc1(xs[0], ts[0], cond, 1.0)  # unguided: a plain pass, not counted as a guided call
        fc1(xs[0], ts[0], cond, g)
        c = net(xs[1], torch.full((3,), ts[1]), cond)
        u = c + (u0 - c0)
        torch.testing.assert_close(fc1(xs[1], ts[1], cond, g), u + g * (c - u), rtol=1e-5, atol=1e-5)


def test_fastercache_nfe_counts_the_skipped_uncond_rows(bundle):
    b = bundle
    x, c, g = inputs(b, range(2), [1, 7])
    ad = METHODS.get("fastercache")(cfg_interval=3, cfg_t_high=1001.0, attn_interval=1)
    with ForwardCounter(b.denoiser.net) as fc:
        ad.prepare(b, 6)(x, c, 2.0, g)
    assert ad.cfg.decisions == [True, False, False, True, False, False]
    assert fc.calls == 6 and fc.rows == 2 * 4 + 4 * 2
    assert fc.rows / (2 * 2) == 4.0  # the runner's NFE (rows / (n * 2)): 2 full + 4 half evaluations


# --- ToCa -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_toca_recomputes_exactly_ratio_times_tokens_and_reuses_the_rest(tiny_flux, ratio):
    m = tiny_flux
    args = [flux_args(m, s) for s in range(4)]
    ff = m.transformer_blocks[0].ff
    tokens: list[int] = []
    seen: list[torch.Tensor] = []
    hs = [ff.net[0].register_forward_pre_hook(lambda mod, a: tokens.append(a[0].shape[1]))]
    hs.append(ff.register_forward_hook(lambda mod, a, out: seen.append(out.clone())))
    try:
        ad = METHODS.get("toca")(interval=3, ratio=ratio)
        _, uc = calls(m, ad, args)
    finally:
        for h in hs:
            h.remove()
    n, k = 16, int(ratio * 16)
    assert tokens == [n, k, k, n]  # call 3 is a full pass again
    hook = ad.token_hooks["transformer_blocks.0.ff"]
    assert hook.fresh == [n, k, k, n]
    # cached call 1: the selected tokens are the real MLP outputs on call 1's input, the rest call 0's
    x1: list[torch.Tensor] = []
    h = ff.register_forward_pre_hook(lambda mod, a: x1.append(a[0]))
    try:
        calls(m, METHODS.get("toca")(interval=3, ratio=ratio), args[:2])
    finally:
        h.remove()
    with torch.no_grad():
        true1 = ff(x1[1])
    sel = torch.zeros(2, n, dtype=torch.bool).scatter(1, hook.selected[0], True)
    torch.testing.assert_close(seen[1][sel], true1[sel], rtol=1e-5, atol=1e-5)
    assert torch.equal(seen[1][~sel], seen[0][~sel])
    # attention is reused whole between full passes; the MLP layers ran on the selected tokens
    attn = {name for name in ad.units(m) if name.endswith(".attn")}
    assert all(uc.per_unit[a] == 2 for a in attn)


def test_toca_scores_cache_frequency_and_output_change(tiny_flux):
    m = tiny_flux
    args = [flux_args(m, s) for s in range(3)]
    picks = {}
    for w in (0.0, 10.0):
        ad = METHODS.get("toca")(interval=5, ratio=0.5, freq_weight=w)
        calls(m, ad, args)
        picks[w] = ad.token_hooks["single_transformer_blocks.0.proj_mlp"].selected
    # change only: call 2 picks the tokens whose output changed on call 1 (the others show no change yet)
    assert torch.equal(picks[0.0][1].sort(1).values, picks[0.0][0].sort(1).values)
    # frequency dominant: call 2 picks the tokens reused on call 1 (the complement)
    for b in range(2):
        assert set(picks[10.0][1][b].tolist()).isdisjoint(picks[10.0][0][b].tolist())
