"""FORA (Selvaraju et al. 2024, arXiv 2407.01425): fast-forward caching of attention and MLP.

Every ``interval`` network calls (the first always) the model runs in full and each transformer
block's attention and feed-forward outputs are stored; on the calls between, every block runs
with those sub-layers replaced by their stored outputs (norms, modulation and residual adds are
recomputed with the fresh input, as in the paper's Algorithm 1). No diffusers hook implements it,
so it is written here in diffusers' hook style: a root clock hook and one named hook per sub-layer.
"""

from __future__ import annotations

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

CLOCK_HOOK = "fora_clock"
REUSE_HOOK = "fora_reuse"
# attention and MLP sub-layers of diffusers' transformer blocks (Flux single blocks: proj_mlp; Wan: ffn)
SUBLAYERS = ("attn", "attn1", "attn2", "ff", "ff_context", "proj_mlp", "ffn")


def _own_sublayers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, c) for n, c in module.named_children() if n in SUBLAYERS]


def sublayers(model: nn.Module) -> dict[str, nn.Module]:
    """Every block's attention and MLP sub-layers, by name. A block made of sub-blocks (a video DiT
    layer holding a spatial and a temporal transformer block) gives its sub-blocks' sub-layers."""
    out = {}
    for bname, block in block_lists(model):
        own = _own_sublayers(block)
        if not own:
            own = [(f"{sname}.{n}", c) for sname, sub in block.named_children() for n, c in _own_sublayers(sub)]
        for cname, child in own:
            out[f"{bname}.{cname}"] = child
    return out


@register_method
class FORA(CacheAdapter):
    name = "fora"
    paper = "Selvaraju et al. 2024, FORA: Fast-Forward Caching in Diffusion Transformer Acceleration, arXiv 2407.01425"
    applies_to = Applies(arch=("dit",))  # diffusers transformers (their blocks are what it caches)
    description = "full pass every N calls; between, reuse every block's attention and MLP outputs"
    knobs = (SOLVER_KNOB, Knob("interval", int, 3, "cache interval N (1: no caching)", low=1, high=100))

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        n = self.config["interval"]
        state = new_state()
        layers = sublayers(model)
        register(model, StepClockHook(state, lambda i: i % n == 0), CLOCK_HOOK)
        for layer in layers.values():
            register(layer, ReuseOutputHook(state), REUSE_HOOK)
        return CacheHandle(model, [CLOCK_HOOK, REUSE_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return sublayers(model)
