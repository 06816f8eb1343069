"""DeepCache (Ma et al. 2023, arXiv 2312.00858): reuse a UNet's deep features across steps.

On a full pass every block runs and the outputs of the blocks deeper than the skip branch ``b``
(down blocks b+1.., the mid block, the up blocks before up block n-1-b) are stored. On a partial
pass only the shallow branch runs: conv_in, down blocks 0..b, then up blocks n-1-b.. with the
stored deep feature as their input and the fresh skip connections, then conv_out. Full passes
follow the uniform 1:N schedule or the non-uniform one (denser around ``center``, spacing
growing with ``power``, the paper's Sec. 3.3). Written in diffusers' hook style (no diffusers
hook implements it): a root clock hook and a named reuse hook on each deep block.
"""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import CacheAdapter, CacheHandle, ReuseOutputHook, StepClockHook, new_state, register

CLOCK_HOOK = "deepcache_clock"
REUSE_HOOK = "deepcache_reuse"


def full_steps(steps: int, interval: int, schedule: str, center: float = 0.3, power: float = 1.4) -> set[int]:
    """Indices of the full passes among ``steps`` network calls (the first is always full)."""
    if schedule == "uniform" or interval == 1:
        return set(range(0, steps, interval))
    k = math.ceil(steps / interval)
    c = center * (steps - 1)
    u = np.linspace(-1.0, 1.0, k)
    span = np.where(u < 0, c, steps - 1 - c)
    pos = np.rint(c + np.sign(u) * np.abs(u) ** power * span).astype(int)
    return {0, *pos.clip(0, steps - 1).tolist()}


def deep_blocks(model: nn.Module, branch: int) -> dict[str, nn.Module]:
    """The blocks a partial pass skips for skip branch ``branch`` (0 = shallowest)."""
    down, up = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
    if not isinstance(down, nn.ModuleList) or not isinstance(up, nn.ModuleList):
        raise ValueError(f"DeepCache targets diffusers UNets (down_blocks/up_blocks); got {type(model).__name__}")
    n = len(down)
    if not 0 <= branch < n:
        raise ValueError(f"DeepCache branch must be in [0, {n - 1}] for this UNet, got {branch}")
    out = {f"down_blocks.{i}": down[i] for i in range(branch + 1, n)}
    if getattr(model, "mid_block", None) is not None:
        out["mid_block"] = model.mid_block
    out.update({f"up_blocks.{j}": up[j] for j in range(n - 1 - branch)})
    return out


@register_method
class DeepCache(CacheAdapter):
    name = "deepcache"
    paper = "Ma et al. 2023, DeepCache: Accelerating Diffusion Models for Free, arXiv 2312.00858"
    applies_to = Applies(arch=("unet",))  # diffusers UNets (its skip branches are what it caches)
    description = "UNet: full pass every N calls caches the deep features; between, only the shallow skip branch runs"
    knobs = (
        Knob("solver", str, "ddim", "registered solver the cache runs under (its default knobs)"),
        Knob("interval", int, 3, "N: one full pass per N network calls (1: no caching)", low=1, high=100),
        Knob("branch", int, 0, "skip branch: the down/up level that stays live (0 = shallowest)", low=0, high=16),
        Knob("schedule", str, "uniform", "full-pass placement: uniform 1:N or non-uniform", choices=("uniform", "nonuniform")),
        Knob("center", float, 0.3, "non-uniform: where full passes are densest (fraction of the run)", low=0.0, high=1.0),
        Knob(
            "power", float, 1.4, "non-uniform: spacing exponent (>1 spreads the full passes away from center)", low=1.0, high=4.0
        ),
    )

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        c = self.config
        blocks = deep_blocks(model, c["branch"])
        full = full_steps(steps, c["interval"], c["schedule"], c["center"], c["power"])
        state = new_state()
        # calls beyond `steps` (multi-evaluation solvers) fall back to the uniform 1:N rule
        register(model, StepClockHook(state, lambda i: i in full if i < steps else i % c["interval"] == 0), CLOCK_HOOK)
        for block in blocks.values():
            register(block, ReuseOutputHook(state), REUSE_HOOK)
        return CacheHandle(model, [CLOCK_HOOK, REUSE_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return deep_blocks(model, self.config["branch"])
