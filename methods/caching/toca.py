"""ToCa (Zou et al. 2024, arXiv 2410.05317): token-wise feature caching.

Every ``interval`` network calls (the first always) the model runs in full and each transformer
block's attention and MLP sub-layer outputs are stored per token. On the calls between, each MLP
sub-layer (Flux: ``ff``, ``ff_context``, the single blocks' ``proj_mlp``; all act on each token
alone) recomputes only the ``ratio`` fraction of tokens (``floor(ratio * N)`` per sample) that score
highest and reuses the stored outputs of the others; the attention outputs are reused whole.
The score per token and layer combines
  * ToCa's cache-frequency score s3: calls since the token was last computed, over ``interval``,
    weighted by ``freq_weight`` (tokens reused longest come back first), and
  * a cheap influence score in place of the paper's attention-map scores s1/s2 (which need the
    attention map, which fused attention never materialises): the norm of the change of the
    token's output between its last two computations, normalised by its maximum over tokens.
Selected tokens run through the real sub-layer; the cache rows are updated with their outputs.

Departures: as in ToCa's own FLUX release (where attention is not partially computed and its
budget is moved to the MLP), attention is reused whole between full calls rather than
recomputed for a token subset (at ``ratio`` 1 every token is fresh, so attention then runs too); the paper's spatial-uniformity bonus s4 and its per-layer/per-step
ratio schedule are not applied (one ``ratio`` everywhere). Written in diffusers' hook style
(no diffusers hook implements it): a root clock hook, a reuse hook per attention layer and a
token-cache hook per MLP sub-layer. ``ratio`` 1 or ``interval`` 1 compute everything, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook, StateManager
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import (
    SOLVER_KNOB,
    CacheAdapter,
    CacheHandle,
    ReuseOutputHook,
    StepClockHook,
    block_lists,
    new_state,
    register,
)

CLOCK_HOOK = "toca_clock"
ATTN_HOOK = "toca_attention"
TOKEN_HOOK = "toca_tokens"
ATTENTION = ("attn", "attn1", "attn2")
TOKENWISE = ("ff", "ff_context", "proj_mlp")  # sub-layers that act on each token independently


def sublayers(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    out = {}
    for bname, block in block_lists(model):
        for cname, child in block.named_children():
            if cname in names:
                out[f"{bname}.{cname}"] = child
    return out


def token_scores(change: torch.Tensor, freq: torch.Tensor, interval: int, freq_weight: float) -> torch.Tensor:
    """(B, N) ToCa score: normalised output-change norm + freq_weight * calls-since-computed / interval."""
    influence = change / change.amax(dim=1, keepdim=True).clamp_min(torch.finfo(change.dtype).tiny)
    return influence + freq_weight * freq.to(change.dtype) / interval


class TokenCacheHook(ModelHook):
    """Full calls: compute all tokens and store them. Cached calls: compute the top ``ratio`` tokens
    by :func:`token_scores`, reuse the stored outputs of the rest."""

    _is_stateful = True

    def __init__(self, state: StateManager, ratio: float, interval: int, freq_weight: float) -> None:
        super().__init__()
        self.state_manager = state
        self.ratio, self.interval, self.freq_weight = ratio, interval, freq_weight
        self.reset_state(None)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        if len(args) + len(kwargs) != 1 or not torch.is_tensor(x) or x.ndim != 3:
            raise ValueError(f"ToCa token-caches sub-layers called with one (B, N, D) tensor; {type(module).__name__} was not")
        b, n, _ = x.shape
        k = int(self.ratio * n)
        full = self.state_manager.get_state().full or self.cache is None or self.cache.shape[:2] != (b, n)
        if full or k >= n:
            out = self.fn_ref.original_forward(*args, **kwargs)
            same = self.cache is not None and self.cache.shape == out.shape
            self.change = (out - self.cache).float().norm(dim=-1) if same else out.new_zeros(b, n, dtype=torch.float32)
            self.cache = out
            self.freq = torch.zeros(b, n, dtype=torch.long, device=x.device)
            self.fresh.append(n)
            return out
        self.fresh.append(k)
        self.freq += 1
        if k == 0:
            return self.cache
        idx = token_scores(self.change, self.freq, self.interval, self.freq_weight).topk(k, dim=1).indices
        fresh = self.fn_ref.original_forward(x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])))
        out_idx = idx[..., None].expand(-1, -1, fresh.shape[-1])
        self.change = self.change.scatter(1, idx, (fresh - self.cache.gather(1, out_idx)).float().norm(dim=-1))
        self.cache = self.cache.scatter(1, out_idx, fresh)
        self.freq = self.freq.scatter(1, idx, 0)
        self.selected.append(idx)
        return self.cache

    def reset_state(self, module: nn.Module | None) -> nn.Module | None:
        self.cache: torch.Tensor | None = None
        self.change: torch.Tensor | None = None
        self.freq: torch.Tensor | None = None
        self.fresh: list[int] = []  # tokens computed per call (per sample)
        self.selected: list[torch.Tensor] = []  # indices chosen on cached calls
        return module


@register_method
class ToCa(CacheAdapter):
    name = "toca"
    paper = "Zou et al. 2024, Accelerating Diffusion Transformers with Token-wise Feature Caching, arXiv 2410.05317"
    applies_to = Applies(arch=("dit",))  # diffusers transformers (their blocks are what it caches)
    description = "full pass every N calls; between, MLPs recompute only the top-scored tokens, attention reused"
    knobs = (
        SOLVER_KNOB,
        Knob("interval", int, 3, "N: full pass every N calls (1: no caching)", low=1, high=100),
        Knob("ratio", float, 0.3, "fraction of tokens each MLP recomputes on cached calls (1: all)", low=0.0, high=1.0),
        Knob("freq_weight", float, 0.25, "weight of the cache-frequency score s3 against the change score", low=0.0, high=10.0),
    )

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        c = self.config
        n = c["interval"]
        state = new_state()
        register(model, StepClockHook(state, lambda i: i % n == 0), CLOCK_HOOK)
        if c["ratio"] < 1.0:  # ratio 1: every token of every sub-layer is fresh, attention included
            for layer in sublayers(model, ATTENTION).values():
                register(layer, ReuseOutputHook(state), ATTN_HOOK)
        self.token_hooks = {}
        for name, layer in sublayers(model, TOKENWISE).items():
            hook = TokenCacheHook(state, c["ratio"], n, c["freq_weight"])
            register(layer, hook, TOKEN_HOOK)
            self.token_hooks[name] = hook
        return CacheHandle(model, [CLOCK_HOOK, ATTN_HOOK, TOKEN_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        units = sublayers(model, ATTENTION + TOKENWISE)
        if not units:
            raise ValueError(f"{type(model).__name__} has no attention/MLP sub-layers in its blocks; ToCa targets diffusers DiTs")
        return units
