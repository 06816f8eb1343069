"""PAB (Zhao et al. 2024, arXiv 2408.12588): Pyramid Attention Broadcast, wrapped.

Inside a middle window of the denoising timesteps, each attention layer's output is computed
once and broadcast (reused) for the following calls: spatial self-attention is recomputed every
``spatial`` calls, temporal attention every ``temporal`` calls, cross-attention every ``cross``
calls (the pyramid: cross-attention varies least, so it is reused longest). Outside the window
every attention runs. diffusers ships the algorithm as a named hook per attention layer
(``apply_pyramid_attention_broadcast``, one call counter per layer: a layer computes when the
window does not hold, or on its first call, or when its call count is a multiple of its range);
this adapter wraps it. diffusers reads the timestep through a callback; here a root hook on the
transformer records the ``timestep`` argument of each forward, in the scheduler's 0..1000 units
(diffusers' Flux-family transformers take timestep / 1000, so theirs is scaled back).

In a Flux model every attention is a joint text+image self-attention (``FluxAttention``, no
``is_cross_attention``), so diffusers classes all of them as spatial: ``temporal`` and ``cross``
only act on models with temporal blocks or separate cross-attention (video DiTs, PixArt). The
paper's optional MLP broadcast is not in diffusers and not here.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
from diffusers.hooks._common import _ATTENTION_CLASSES
from diffusers.hooks.hooks import ModelHook
from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheAdapter, CacheHandle, register

TIMESTEP_HOOK = "bench_timestep"
# diffusers transformers whose ``timestep`` argument is the scheduler's timestep / 1000
UNIT_TIMESTEP_MODELS = ("FluxTransformer2DModel", "Flux2Transformer2DModel", "ChromaTransformer2DModel")


def timestep_scale(model: nn.Module) -> float:
    return 1000.0 if type(model).__name__ in UNIT_TIMESTEP_MODELS else 1.0


class TimestepHook(ModelHook):
    """Root hook: records the current call's timestep (first row, scheduler units) for callbacks."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.current: float | None = None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise ValueError(f"{type(module).__name__}.forward got no timestep; this cache needs the model's timestep argument")
        self.current = float(torch.as_tensor(t).flatten()[0]) * self.scale
        return self.fn_ref.original_forward(*args, **kwargs)

    def __call__(self) -> float:
        if self.current is None:
            raise RuntimeError("timestep read before the model's first forward")
        return self.current


def install_timestep_hook(model: nn.Module) -> TimestepHook:
    hook = TimestepHook(timestep_scale(model))
    register(model, hook, TIMESTEP_HOOK)
    return hook


def identifiers(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The model's own patterns for its spatial / temporal / cross attention layer names, where it
    declares them (``attention_identifiers``: bench's video DiT, whose temporal layers' names would
    match diffusers' default spatial patterns); otherwise diffusers' defaults (empty dict)."""
    declared = getattr(model, "attention_identifiers", None) or {}
    bad = set(declared) - {"spatial", "temporal", "cross"}
    if bad:
        raise ValueError(f"{type(model).__name__}.attention_identifiers has unknown kinds {sorted(bad)}")
    return {k: tuple(v) for k, v in declared.items()}


def _matches(name: str, identifiers: tuple[str, ...]) -> bool:
    return any(re.search(i, name) is not None for i in identifiers)


def attention_layers(model: nn.Module, config: PyramidAttentionBroadcastConfig) -> dict[str, tuple[str, nn.Module]]:
    """The attention layers diffusers' PAB hooks, by name: (kind, module), kind in spatial/temporal/cross
    (the same classification as ``apply_pyramid_attention_broadcast``)."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, _ATTENTION_CLASSES):
            continue
        cross = bool(getattr(m, "is_cross_attention", False))
        if not cross and config.spatial_attention_block_skip_range and _matches(name, config.spatial_attention_block_identifiers):
            out[name] = ("spatial", m)
        elif (
            not cross
            and config.temporal_attention_block_skip_range
            and _matches(name, config.temporal_attention_block_identifiers)
        ):
            out[name] = ("temporal", m)
        elif cross and config.cross_attention_block_skip_range and _matches(name, config.cross_attention_block_identifiers):
            out[name] = ("cross", m)
    if not out:
        raise ValueError(
            f"{type(model).__name__} has no diffusers attention layers in transformer blocks; PAB targets diffusers DiTs"
        )
    return out


@register_method
class PAB(CacheAdapter):
    name = "pab"
    paper = "Zhao et al. 2024, Real-Time Video Generation with Pyramid Attention Broadcast, arXiv 2408.12588"
    applies_to = Applies(arch=("dit", "video-dit"))  # diffusers transformers and video DiTs (their blocks are what it caches)
    description = "inside a timestep window, reuse each attention output for N calls (spatial < temporal < cross)"
    knobs = (
        SOLVER_KNOB,
        Knob(
            "spatial", int, 2, "spatial self-attention recomputed every N calls in the window (1: never reused)", low=1, high=100
        ),
        Knob("temporal", int, 4, "temporal attention recomputed every N calls (video models)", low=1, high=100),
        Knob("cross", int, 6, "cross-attention recomputed every N calls (models with separate cross-attention)", low=1, high=100),
        Knob("t_low", float, 100.0, "window lower bound, exclusive (scheduler timestep, 0..1000)", low=-1.0, high=1001.0),
        Knob("t_high", float, 800.0, "window upper bound, exclusive (scheduler timestep, 0..1000)", low=-1.0, high=1001.0),
    )

    def pab_config(self, model: nn.Module, clock: Any = None) -> PyramidAttentionBroadcastConfig:
        c = self.config
        window = (c["t_low"], c["t_high"])
        names = identifiers(model)
        return PyramidAttentionBroadcastConfig(
            **{f"{kind}_attention_block_identifiers": names[kind] for kind in names},
            spatial_attention_block_skip_range=c["spatial"],
            temporal_attention_block_skip_range=c["temporal"],
            cross_attention_block_skip_range=c["cross"],
            spatial_attention_timestep_skip_range=window,
            temporal_attention_timestep_skip_range=window,
            cross_attention_timestep_skip_range=window,
            current_timestep_callback=clock,
        )

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        layers = attention_layers(model, self.pab_config(model))
        clock = install_timestep_hook(model)
        apply_pyramid_attention_broadcast(model, self.pab_config(model, clock))
        hooked = {n for n, m in model.named_modules() if _hooked(m)}
        if hooked != set(layers):
            raise RuntimeError(f"PAB hooked {sorted(hooked)}, expected {sorted(layers)}: diffusers' PAB layer matching changed")
        return CacheHandle(model, [TIMESTEP_HOOK, _PYRAMID_ATTENTION_BROADCAST_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, (_, m) in attention_layers(model, self.pab_config(model)).items()}


def _hooked(m: nn.Module) -> bool:
    reg = m.__dict__.get("_diffusers_hook")
    return reg is not None and _PYRAMID_ATTENTION_BROADCAST_HOOK in reg.hooks
