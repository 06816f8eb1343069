"""TaylorSeer (Liu et al. 2025, arXiv 2503.06923): forecast features by Taylor expansion, wrapped.

On full passes each attention and MLP sub-layer stores its output and its finite differences up
to order m (divided by the step distance); between full passes its output is forecast as
sum_k Delta^k F / k! * offset^k, without running it. diffusers ships the algorithm as named hooks
(``apply_taylorseer_cache``); this adapter installs them on the same sub-layers FORA reuses,
with float32 factors, around each sampler call. diffusers' schedule: calls 0..warmup-1 are full,
then call s is full when (s - warmup - 1) % interval == 0 (so call ``warmup`` is already a forecast).
"""

from __future__ import annotations

import re

import torch
from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheAdapter, CacheHandle
from methods.caching.fora import sublayers


@register_method
class TaylorSeer(CacheAdapter):
    name = "taylorseer"
    paper = "Liu et al. 2025, From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers, arXiv 2503.06923"
    applies_to = Applies(arch=("dit", "video-dit"))  # diffusers transformers and video DiTs (their blocks are what it caches)
    description = "full pass every N calls stores features and finite differences to order m; between, Taylor forecast"
    knobs = (
        SOLVER_KNOB,
        Knob("interval", int, 4, "N: full pass every N calls after the warm-up (1: no caching)", low=1, high=100),
        Knob("order", int, 1, "m: highest Taylor order", low=0, high=4),
        Knob("warmup", int, 3, "first calls always full (they seed the differences)", low=1, high=100),
    )

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        c = self.config
        names = [re.escape(n) for n in sublayers(model)]
        cfg = TaylorSeerCacheConfig(
            cache_interval=c["interval"],
            disable_cache_before_step=c["warmup"],
            max_order=c["order"],
            taylor_factors_dtype=torch.float32,
            cache_identifiers=names,
        )
        apply_taylorseer_cache(model, cfg)
        return CacheHandle(model, [_TAYLORSEER_CACHE_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return sublayers(model)
