"""FirstBlockCache (ParaAttention; diffusers ``apply_first_block_cache``), wrapped.

Each forward computes the first transformer block; when the relative mean absolute change of its
residual since the last full pass is at most ``threshold``, the remaining blocks are skipped and
their cached residual is added to the first block's output. diffusers ships the algorithm as
named hooks, so this adapter only installs and removes them around each sampler call.
"""

from __future__ import annotations

from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheAdapter, CacheHandle, block_lists


@register_method
class FirstBlockCache(CacheAdapter):
    name = "first_block_cache"
    paper = "ParaAttention First Block Cache (chengzeyi), as diffusers hooks/first_block_cache.py"
    applies_to = Applies(arch=("dit", "video-dit"))  # diffusers transformers and video DiTs (their blocks are what it caches)
    description = "compute the first block; if its residual changed less than threshold, reuse the cached rest"
    knobs = (
        SOLVER_KNOB,
        Knob(
            "threshold",
            float,
            0.2,
            "relative L1 change of the first block's residual below which the rest is reused (0: never)",
            low=0.0,
            high=10.0,
        ),
    )

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        block_lists(model)  # a clear error for a model without transformer blocks
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=self.config["threshold"]))
        return CacheHandle(model, [_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return dict(block_lists(model)[1:])
