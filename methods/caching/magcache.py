"""MagCache (Ma et al. 2025, arXiv 2506.09045): magnitude-aware cache of the block-stack residual, wrapped.

The ratio gamma_t = mean ||r_t|| / ||r_{t-1}|| of the norms of successive block-stack residuals
(image-token output of the last block minus input of the first) is measured once per (model,
solver, steps) on an uncached calibration run (:mod:`methods.caching.calibrated`; 1.0 for the first
call). At sampling, after the first ``retention`` fraction of calls (always computed), each call
multiplies the running ratio by gamma_t and adds |1 - product| to the accumulated error; while that
error stays at most ``threshold`` and the consecutive skips at most ``max_skip`` (K), the blocks are
skipped and the last computed residual is added to the stack's input; otherwise the blocks run and
ratio, error and skip count are reset. This is the paper's algorithm box, and diffusers ships it as
named hooks (``apply_mag_cache``): this adapter produces the ``mag_ratios`` it takes and installs
and removes the hooks around each sampler call (``num_inference_steps`` = network calls per run).

``threshold = 0`` switches skipping off (K = 0 is passed): diffusers skips when the error is *at
most* the threshold, so a calibrated ratio of exactly 1.0 would otherwise skip at threshold 0.
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks import MagCacheConfig, apply_mag_cache
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheHandle, block_lists
from methods.caching.calibrated import CALIB_KNOBS, CalibratedCache, Recorder, block_meta


@register_method
class MagCache(CalibratedCache):
    name = "magcache"
    paper = "Ma et al. 2025, MagCache: Fast Video Generation with Magnitude-Aware Cache, arXiv 2506.09045"
    applies_to = Applies(arch=("dit", "video-dit"))  # diffusers transformers and video DiTs (their blocks are what it caches)
    description = "skip the blocks while the error predicted from calibrated residual magnitude ratios stays under threshold"
    knobs = (
        SOLVER_KNOB,
        Knob(
            "threshold",
            float,
            0.1,
            "accumulated predicted error sum |1 - prod gamma| up to which the blocks are skipped (0: never)",
            low=0.0,
            high=10.0,
        ),
        Knob("max_skip", int, 3, "K: most consecutive skipped calls", low=0, high=100),
        Knob("retention", float, 0.2, "fraction of the first calls always computed", low=0.0, high=1.0),
        *CALIB_KNOBS,
    )

    def fit(self, rec: Recorder) -> dict[str, Any]:
        return {"mag_ratios": rec.mag_ratios}

    def config_for(self, n_calls: int, mag_ratios: list[float]) -> MagCacheConfig:
        c = self.config
        return MagCacheConfig(
            threshold=c["threshold"],
            max_skip_steps=c["max_skip"] if c["threshold"] > 0 else 0,
            retention_ratio=c["retention"],
            num_inference_steps=n_calls,
            mag_ratios=list(mag_ratios),
        )

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        cal = self.need_calibration()
        ratios = cal.data["mag_ratios"]
        if len(ratios) != cal.n_calls:
            raise ValueError(f"magcache: calibration has {len(ratios)} ratios for {cal.n_calls} calls; rebuild it")
        self.units(model)
        apply_mag_cache(model, self.config_for(cal.n_calls, ratios))
        return CacheHandle(model, [_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        blocks = block_lists(model)
        for _, b in blocks:
            block_meta(b)
        return dict(blocks)
