"""Feature caches: disabled = bit-identical, clean removal, no leaks between jobs, the algorithms."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import assert_model_clean, dict_state, hooked_calls, inputs, random_bundle, tiny_flux_model
from torch import nn

import methods.caching  # noqa: F401  (registers the caches)
import methods.solvers  # noqa: F401
from bench.accounting import UnitCounter
from bench.adapter import KnobError
from bench.denoiser import Denoiser, VPSchedule
from bench.models import ModelBundle, build_model
from bench.registry import METHODS
from methods.caching.base import target_model
from methods.caching.deepcache import deep_blocks, full_steps

STEPS = 4
# (method, kind of model it targets, knobs that disable caching, knobs that cache)
METHOD_CASES = [
    ("first_block_cache", "flow", {"threshold": 0.0}, {"threshold": 1.0}),
    ("fora", "flow", {"interval": 1}, {"interval": 3}),
    ("taylorseer", "flow", {"interval": 1}, {"interval": 2, "order": 2, "warmup": 1}),
    ("deepcache", "eps", {"interval": 1}, {"interval": 3}),
    ("deepcache", "eps", {"interval": 1, "schedule": "nonuniform"}, {"interval": 3, "schedule": "nonuniform", "branch": 1}),
]
IDS = [f"{m}-{i}" for i, (m, *_) in enumerate(METHOD_CASES)]


def plain(bundle: ModelBundle, method: str, knobs: dict, steps: int = STEPS):
    solver = knobs.get("solver", METHODS.get(method)().config["solver"])
    return METHODS.get(solver)().prepare(bundle, steps)


@pytest.fixture(scope="module")
def bundles():
    return {"flow": random_bundle("flow"), "eps": random_bundle("eps")}


@pytest.mark.parametrize(("method", "kind", "off", "on"), METHOD_CASES, ids=IDS)
def test_disabled_is_bit_identical_and_removal_restores(bundles, method, kind, off, on):
    b = bundles[kind]
    model = target_model(b.denoiser.net)
    before_dict = dict_state(model)
    before_params = copy.deepcopy(model.state_dict())
    x, c, g = inputs(b, range(2), [1, 7])
    ref = plain(b, method, off)(x, c, 2.0, g)
    ad = METHODS.get(method)(**off)
    with UnitCounter(ad.units(model)) as uc:
        out = ad.prepare(b, STEPS)(x, c, 2.0, g)
    assert torch.equal(out, ref)
    assert uc.called > 0 and uc.computed == uc.called
    # a caching run, then the model must be exactly as before
    cached = METHODS.get(method)(**on).prepare(b, STEPS)(x, c, 2.0, g)
    assert not torch.equal(cached, ref)
    assert_model_clean(model, before_dict, before_params)
    assert torch.equal(plain(b, method, off)(x, c, 2.0, g), ref)


@pytest.mark.parametrize(("method", "kind", "off", "on"), METHOD_CASES, ids=IDS)
def test_no_state_leaks_between_jobs(bundles, method, kind, off, on):
    b = bundles[kind]
    xa, ca, ga = inputs(b, range(2), [0, 9])
    xb, cb, gb = inputs(b, range(5, 6), [3])
    sampler = METHODS.get(method)(**on).prepare(b, STEPS)
    b_alone = METHODS.get(method)(**on).prepare(b, STEPS)(xb, cb, 1.5, gb)
    sampler(xa, ca, 3.0, ga)  # job A (other batch size, prompts, guidance)
    assert torch.equal(sampler(xb, cb, 1.5, gb), b_alone)


def test_unknown_solver_and_wrong_model_fail_clearly(bundles):
    with pytest.raises(ValueError, match="not a solver"):
        METHODS.get("fora")(solver="deepcache").prepare(bundles["flow"], 4)
    with pytest.raises(ValueError, match="applies to arch=unet"):
        METHODS.get("deepcache")(interval=2, solver="euler").prepare(bundles["flow"], 4)
    with pytest.raises(ValueError, match="diffusers UNets"):
        deep_blocks(target_model(bundles["flow"].denoiser.net), 0)
    with pytest.raises(KnobError):
        METHODS.get("fora")(interval=0)


# --- the algorithms ------------------------------------------------------------------------


def calls(model: nn.Module, ad, args_list, steps: int = 10):
    """Call the hooked model on each (args, kwargs) in turn; return outputs and the unit counter."""
    return hooked_calls(model, ad, args_list, steps, unpack=True)


def flux_args(model, seed: int):
    torch.manual_seed(seed)
    hs = torch.randn(2, 16, model.config.in_channels)
    ids = torch.zeros(16, 3)
    ids[:, 1] = torch.arange(16) // 4
    ids[:, 2] = torch.arange(16) % 4
    return (), dict(
        hidden_states=hs,
        encoder_hidden_states=torch.randn(2, 3, model.config.joint_attention_dim),
        pooled_projections=torch.randn(2, model.config.pooled_projection_dim),
        timestep=torch.tensor([0.5, 0.5]),
        img_ids=ids,
        txt_ids=torch.zeros(3, 3),
        return_dict=False,
    )


@pytest.fixture(scope="module")
def tiny_flux():
    return tiny_flux_model()


def test_fora_reuses_attention_and_mlp_between_full_passes(tiny_flux):
    m = tiny_flux
    a, bb = flux_args(m, 1), flux_args(m, 2)
    with torch.no_grad():
        full_a, full_b = m(*a[0], **a[1])[0], m(*bb[0], **bb[1])[0]
    ad = METHODS.get("fora")(interval=3)
    outs, uc = calls(m, ad, [a, bb, bb, bb])
    assert torch.equal(outs[0][0], full_a)
    n_layers = len(ad.units(m))
    assert uc.called == 4 * n_layers and uc.computed == 2 * n_layers  # calls 0 and 3 are full
    assert torch.equal(outs[3][0], full_b)  # the refresh pass is exact
    # calls 1, 2: fresh input through norms/residuals, stale sub-layer outputs
    assert not torch.equal(outs[1][0], full_b) and not torch.equal(outs[1][0], full_a)
    assert torch.equal(outs[1][0], outs[2][0])
    # same input on a cached call = the full output (only sub-layer outputs are reused)
    outs, _ = calls(m, ad, [a, a])
    assert torch.equal(outs[1][0], full_a)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylorseer_forecasts_sublayer_outputs_by_taylor_expansion(tiny_flux, order):
    m = tiny_flux
    args = [flux_args(m, s) for s in (1, 2, 3, 4)]
    layer = m.transformer_blocks[0].ff
    seen: list[torch.Tensor] = []
    h = layer.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone()))
    try:
        ad = METHODS.get("taylorseer")(interval=3, order=order, warmup=3)
        _, uc = calls(m, ad, args)  # full: 0, 1, 2 (warm-up); forecast: 3
    finally:
        h.remove()
    assert uc.called == 4 * len(ad.units(m)) and uc.computed == 3 * len(ad.units(m))
    f0, f1, f2 = seen[:3]
    d1 = f2 - f1  # divided differences, step distance 1
    d2 = d1 - (f1 - f0)
    want = f2 + (d1 if order >= 1 else 0) + (d2 / 2 if order >= 2 else 0)
    torch.testing.assert_close(seen[3], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_reuses_its_factor_buffers_across_runs(tiny_flux, order):
    """On the CPU the factors live in per-sub-layer buffers allocated once: a second run writes into
    the same memory and gives the same outputs bit for bit; a new shape gets buffers of its own."""
    from methods.caching.fora import sublayers
    from methods.caching.taylorseer import BUFFERS

    m = tiny_flux
    args = [flux_args(m, s) for s in range(7)]
    ad = METHODS.get("taylorseer")(interval=2, order=order, warmup=2)
    layers = list(sublayers(m).values())

    def pointers() -> set[int]:
        return {b.data_ptr() for layer in layers for bufs in BUFFERS[layer].values() for b in bufs}

    for layer in layers:  # (earlier tests' buffers for this network)
        BUFFERS.pop(layer, None)
    first, _ = calls(m, ad, args)
    held = pointers()
    assert len(held) == (order + 1) * sum(len(BUFFERS[layer]) for layer in layers) > 0
    second, _ = calls(m, ad, args)
    assert pointers() == held
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a[0], b[0])
    fewer = [flux_args(m, s) for s in range(7)]
    for _, kw in fewer:  # one sample instead of two: other shapes, other buffers
        for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
            kw[k] = kw[k][:1]
    calls(m, ad, fewer)
    assert held < pointers()


@pytest.mark.parametrize(("interval", "order", "warmup"), [(3, 1, 3), (2, 2, 1), (4, 0, 2), (2, 3, 2)])
def test_taylorseer_equals_diffusers_taylorseer_hooks(tiny_flux, interval, order, warmup):
    """bench's TaylorSeer hooks (Horner forecast) give diffusers' apply_taylorseer_cache outputs and schedule."""
    import re

    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    from methods.caching.base import CacheHandle, remove_hooks, set_context, snapshot
    from methods.caching.fora import sublayers

    m = tiny_flux
    args = [flux_args(m, s) for s in range(9)]
    ad = METHODS.get("taylorseer")(interval=interval, order=order, warmup=warmup)
    mine, uc = calls(m, ad, args)
    before = snapshot(m)
    cfg = TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=warmup,
        max_order=order,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[re.escape(n) for n in sublayers(m)],
    )
    apply_taylorseer_cache(m, cfg)
    set_context(m, "cond")
    try:
        with torch.no_grad():
            theirs = [m(*a[0], **a[1]) for a in args]
    finally:
        set_context(m, None)
        remove_hooks(CacheHandle(m, [_TAYLORSEER_CACHE_HOOK], before))
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    n = len(ad.units(m))
    full = sum(s < warmup or (s - warmup - 1) % interval == 0 for s in range(9))
    assert uc.called == 9 * n and uc.computed == full * n


def test_norm_liveness_is_traced_through_the_operations_between_norm_and_block_output():
    """methods/caching/liveness.py on a toy block: norm a feeds only the attention sub-layer (through a
    modulation, a slice and a concatenation), norm b feeds the attention and also a plain linear
    layer, norm c reaches the output directly: b and c are live, a is not, and a's output meets
    shape-dependent operations (a scalar could not stand in for it); values are unchanged."""
    from methods.caching.liveness import live_candidates

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (nn.LayerNorm(4, elementwise_affine=False) for _ in range(3))
            self.attn, self.proj = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            m = torch.cat([self.a(h)[:, :1] * 2 + 1, self.a(h)[:, 1:]], dim=1)
            h = h + self.attn(m)
            h = h + self.attn(self.b(h)) + self.proj(self.b(h))
            return h + 0.1 * self.c(h)

    block = Block()
    x = torch.randn(2, 3, 4)
    live, shaped, out = live_candidates(lambda: block(x), [block.a, block.b, block.c], [block.attn], [block])
    assert live == {1, 2}
    assert 0 in shaped and 2 not in shaped  # a's output is sliced and concatenated; c's only scaled and added
    assert torch.equal(out, block(x))


def test_first_block_cache_skips_the_rest_when_the_first_residual_is_unchanged(tiny_flux):
    m = tiny_flux
    a, bb = flux_args(m, 1), flux_args(m, 2)
    with torch.no_grad():
        full_a = m(*a[0], **a[1])[0]
    ad = METHODS.get("first_block_cache")(threshold=0.05)
    outs, uc = calls(m, ad, [a, a, bb])
    rest = len(ad.units(m))
    assert uc.computed == 2 * rest and uc.called == 3 * rest  # the repeat skipped, the new input did not
    torch.testing.assert_close(outs[1][0], full_a, rtol=1e-5, atol=1e-5)  # head output + cached tail residual
    # threshold 0 reuses only an exactly unchanged residual (diffusers skips when change <= threshold)
    outs, uc = calls(m, METHODS.get("first_block_cache")(threshold=0.0), [a, bb, a])
    assert uc.computed == uc.called == 3 * rest


def test_deepcache_schedules():
    assert full_steps(10, 3, "uniform") == {0, 3, 6, 9}
    nu = sorted(full_steps(50, 5, "nonuniform", center=0.3, power=1.4))
    assert nu[0] == 0 and 8 <= len(nu) <= 11
    gaps = torch.tensor(nu).diff()
    near = min(range(len(nu)), key=lambda i: abs(nu[i] - 15))
    assert gaps[max(near - 1, 0)] < gaps[-1] and gaps[max(near - 1, 0)] < gaps[0]  # densest near the center
    assert full_steps(7, 1, "nonuniform") == set(range(7))


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        layers_per_block=1,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


def unet_args(seed: int):
    torch.manual_seed(seed)
    return (torch.randn(2, 2, 8, 8), torch.tensor([500, 500])), dict(encoder_hidden_states=torch.randn(2, 3, 8))


def test_deepcache_runs_only_the_shallow_branch_with_the_cached_deep_feature(tiny_unet):
    m = tiny_unet
    a, bb = unet_args(1), unet_args(2)
    with torch.no_grad():
        full_a, full_b = m(*a[0], **a[1]).sample, m(*bb[0], **bb[1]).sample
    ad = METHODS.get("deepcache")(interval=2, branch=0)
    outs, uc = calls(m, ad, [a, bb, bb, a], steps=4)
    deep = len(ad.units(m))
    assert deep == 2 + 1 + 2  # down 1-2, mid, up 0-1
    assert uc.called == 4 * deep and uc.computed == 2 * deep  # partial passes run none of the deep weights
    assert torch.equal(outs[0].sample, full_a) and torch.equal(outs[2].sample, full_b)
    assert not torch.equal(outs[1].sample, full_b)  # stale deep feature from a ...
    assert not torch.equal(outs[1].sample, full_a)  # ... with b's live shallow branch
    assert not torch.equal(outs[3].sample, full_a)  # call 3 is partial: b's deep feature, a's shallow branch
    outs, _ = calls(m, ad, [a, a], steps=2)
    assert torch.equal(outs[1].sample, full_a)  # same input: the cached deep feature is the exact one


class CondUNet(nn.Module):
    """``net(x, t, cond)`` around a tiny UNet2DConditionModel (class label -> one text token)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet
        self.emb = nn.Embedding(11, 8)

    def forward(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=self.emb(cond)[:, None]).sample


def test_deepcache_on_unet2dcondition_bundle(tiny_unet):
    torch.manual_seed(0)
    b = ModelBundle("tiny-sd-unet", Denoiser(CondUNet(tiny_unet).eval(), "eps", VPSchedule.linear(), 10), (2, 8, 8), "image", 10)
    x, c, g = inputs(b, range(2), [1, 2])
    ref = METHODS.get("ddim")().prepare(b, STEPS)(x, c, 2.0, g)
    assert torch.equal(METHODS.get("deepcache")(interval=1).prepare(b, STEPS)(x, c, 2.0, g), ref)
    out = METHODS.get("deepcache")(interval=3).prepare(b, STEPS)(x, c, 2.0, g)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.mark.parametrize(
    ("model", "method", "off", "on"),
    [
        ("digits-dit", "first_block_cache", {"threshold": 0.0}, {"threshold": 0.3}),
        ("digits-dit", "fora", {"interval": 1}, {"interval": 2}),
        ("digits-dit", "taylorseer", {"interval": 1}, {"interval": 2, "warmup": 2}),
        ("digits-unet", "deepcache", {"interval": 1}, {"interval": 3}),
    ],
)
def test_on_digits_teachers(model, method, off, on):
    b = build_model(model)
    x, c, g = inputs(b, range(1), [3])
    ref = plain(b, method, off, 6)(x, c, 2.0, g)
    assert torch.equal(METHODS.get(method)(**off).prepare(b, 6)(x, c, 2.0, g), ref)
    ad = METHODS.get(method)(**on)
    with UnitCounter(ad.units(target_model(b.denoiser.net))) as uc:
        out = ad.prepare(b, 6)(x, c, 2.0, g)
    assert uc.computed < uc.called
    assert (out - ref).abs().mean() < 0.5 * ref.abs().mean()  # close to, not equal to, the uncached samples
    assert not torch.equal(out, ref)
