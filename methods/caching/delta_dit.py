"""Delta-DiT (Chen et al. 2024, arXiv 2406.01125): cache the residual of a span of blocks.

The Delta-Cache stores, on a full pass, the deviation a span of consecutive transformer blocks
adds to the residual stream (span output minus span input); on the calls between, the span is
not run and the stored deviation is added to the span's fresh input instead. Stage-adaptive, as
the paper: in the first part of sampling (network calls before ``boundary`` x steps, where the
outline forms) the cached span is the *rear* ``span`` blocks (they add detail); from the boundary
on it is the *front* ``span`` blocks. A full pass runs every ``interval`` calls within a stage;
the first call of each stage is always full (a delta of the other span is of no use).

Departures from the paper: the boundary and interval count network calls, not solver steps
(identical for one-evaluation solvers such as Euler/DDIM; multi-evaluation solvers switch
stage after ``boundary`` x steps calls); blocks are taken in execution order across diffusers'
block lists (Flux: the double-stream then the single-stream blocks), and both streams (image
and text tokens) get their own delta. Written in diffusers' hook style: a root clock hook and a
named hook on every block (each knows whether it heads or ends the span of the current stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheAdapter, CacheHandle, CallClockHook, block_lists, register

CLOCK_HOOK = "delta_dit_clock"
BLOCK_HOOK = "delta_dit_block"

Streams = tuple[torch.Tensor, torch.Tensor | None]  # (hidden_states, encoder_hidden_states)


@dataclass
class BlockIO:
    """Reads a transformer block's residual-stream inputs and outputs and builds outputs of the same
    structure, from diffusers' ``TransformerBlockRegistry`` metadata (a block returning one tensor,
    e.g. ``BasicTransformerBlock``, needs none)."""

    meta: Any  # diffusers TransformerBlockMetadata or None

    @classmethod
    def of(cls, block: nn.Module) -> BlockIO:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        try:
            meta = TransformerBlockRegistry.get(type(block))
        except ValueError:
            return cls(None)
        # a one-stream block (BasicTransformerBlock: PixArt, DiT) returns its tensor, not a tuple
        return cls(meta if meta.return_encoder_hidden_states_index is not None else None)

    def inputs(self, args: tuple, kwargs: dict) -> Streams:
        if self.meta is None:
            return (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]), None
        hs = self.meta._get_parameter_from_args_kwargs(self.meta.hidden_states_argument_name, args, kwargs)
        ehs = None
        if self.meta.return_encoder_hidden_states_index is not None:
            ehs = self.meta._get_parameter_from_args_kwargs(self.meta.encoder_hidden_states_argument_name, args, kwargs)
        return hs, ehs

    def outputs(self, out: Any) -> Streams:
        if self.meta is None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"block output of type {type(out).__name__} is not understood; register the block class with "
                    "diffusers.hooks._helpers.TransformerBlockRegistry (return indices of the two streams)"
                )
            return out, None
        ehs_i = self.meta.return_encoder_hidden_states_index
        return out[self.meta.return_hidden_states_index], (out[ehs_i] if ehs_i is not None else None)

    def build(self, hs: torch.Tensor, ehs: torch.Tensor | None) -> Any:
        if self.meta is None:
            return hs
        ehs_i = self.meta.return_encoder_hidden_states_index
        n = 1 + max(self.meta.return_hidden_states_index, ehs_i if ehs_i is not None else -1)
        out: list[Any] = [None] * n
        out[self.meta.return_hidden_states_index] = hs
        if ehs_i is not None:
            out[ehs_i] = ehs
        return tuple(out)


def sub(a: Streams, b: Streams) -> Streams:
    return a[0] - b[0], (a[1] - b[1] if a[1] is not None and b[1] is not None else None)


def add(a: Streams, b: Streams) -> Streams:
    return a[0] + b[0], (a[1] + b[1] if a[1] is not None and b[1] is not None else a[1])


class DeltaState(BaseState):
    """Per-call state shared by Delta-DiT's hooks: call index, stage, full/cached, span input."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.call = 0
        self.full = True
        self.rear = True  # which span the current call caches
        self.span_input: Streams | None = None
        self.delta: Streams | None = None


def schedule(call: int, steps: int, interval: int, boundary: float) -> tuple[bool, bool]:
    """(rear stage?, full pass?) of network call ``call`` in a ``steps``-step run."""
    b = round(boundary * steps)
    rear = call < b
    start = 0 if rear else b
    return rear, (call - start) % interval == 0


class DeltaClockHook(CallClockHook):
    """Root hook: decides each call's stage and whether it is full; counts calls."""

    def __init__(self, state: StateManager, steps: int, interval: int, boundary: float) -> None:
        super().__init__(state)
        self.steps, self.interval, self.boundary = steps, interval, boundary

    def begin(self, s: Any) -> None:
        rear, full = schedule(s.call, self.steps, self.interval, self.boundary)
        if rear != s.rear or s.delta is None:
            full, s.delta = True, None  # a new stage (or nothing cached yet) starts with a full pass
        s.rear, s.full = rear, full


class DeltaBlockHook(ModelHook):
    """On block ``index`` of ``n``: inside the current stage's span, record the span input (head) and
    the span delta (tail) on full passes, and on cached passes pass the input through, the tail
    adding the stored delta; outside the span, run the block."""

    _is_stateful = True

    def __init__(self, state: StateManager, index: int, n: int, span: int) -> None:
        super().__init__()
        self.state_manager = state
        self.index = index
        self.front = (0, span - 1) if index < span else None  # (head, tail) when in the front span
        self.rear = (n - span, n - 1) if index >= n - span else None
        self.io: BlockIO | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.io = BlockIO.of(module)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        s = self.state_manager.get_state()
        span = self.rear if s.rear else self.front
        if span is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        head, tail = span
        x = self.io.inputs(args, kwargs)
        if s.full:
            if self.index == head:
                s.span_input = x
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.index == tail:
                s.delta = sub(self.io.outputs(out), s.span_input)
                s.span_input = None
            return out
        if self.index == tail:
            return self.io.build(*add(x, s.delta))
        return self.io.build(*x)  # a skipped block inside the span: the stream passes through unchanged

    def reset_state(self, module: nn.Module) -> nn.Module:
        return module


def all_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return dict(block_lists(model))


@register_method
class DeltaDiT(CacheAdapter):
    name = "delta_dit"
    paper = (
        "Chen et al. 2024, Delta-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers, arXiv 2406.01125"
    )
    applies_to = Applies(arch=("dit",))  # diffusers transformers (their blocks are what it caches)
    description = "cache a block span's residual (rear blocks early, front blocks late); full pass every N calls"
    knobs = (
        SOLVER_KNOB,
        Knob("interval", int, 2, "N: full pass every N calls within a stage (1: no caching)", low=1, high=100),
        Knob("span", int, 3, "N_c: number of consecutive blocks whose residual is cached", low=1, high=1000),
        Knob(
            "boundary",
            float,
            0.5,
            "b: fraction of the steps that caches the rear span; the front span from there on",
            low=0.0,
            high=1.0,
        ),
    )

    def _check_span(self, model: nn.Module) -> int:
        n = len(block_lists(model))
        if self.config["span"] > n:
            raise ValueError(
                f"delta_dit: span={self.config['span']} exceeds the {n} blocks of {type(model).__name__}; set span <= {n}"
            )
        return n

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        c = self.config
        n = self._check_span(model)
        state = StateManager(DeltaState)
        register(model, DeltaClockHook(state, steps, c["interval"], c["boundary"]), CLOCK_HOOK)
        for i, (_, block) in enumerate(block_lists(model)):
            register(block, DeltaBlockHook(state, i, n, c["span"]), BLOCK_HOOK)
        return CacheHandle(model, [CLOCK_HOOK, BLOCK_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        self._check_span(model)
        return all_blocks(model)
