"""DBCache (cache-dit, vipshop): Dual Block Cache, FirstBlockCache with a computed tail.

The transformer's blocks are split into the first ``Fn`` (always computed), the middle ones (the
cache) and the last ``Bn`` (always computed). Each call computes the first Fn blocks and compares
their hidden-state residual (output of block Fn-1 minus input of block 0) with the one of the last
full call: relative L1 change ``mean|r - r_prev| / mean|r_prev|``. At or under ``threshold`` the
middle blocks are skipped and their residual from the last full call (hidden and encoder states)
is added to the Fn output; the last Bn blocks then run on it, correcting the approximation. Over
threshold (or in the first ``warmup`` calls, or after ``max_consecutive`` cached calls in a row)
every block runs and the Fn residual and the middle residual are stored. ``threshold`` 0 never
caches. With Fn=1, Bn=0 the decisions and outputs are those of FirstBlockCache (tested).

No diffusers hook implements the dual split, so it is written here in diffusers' hook style:
a root hook counts calls, named hooks on the first Fn blocks and on the middle blocks share a
state; the last Bn blocks carry no hook (they always run).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheAdapter, CacheHandle, CallClockHook, block_lists, register

CLOCK_HOOK = "dbcache_clock"
HEAD_HOOK = "dbcache_head"
MIDDLE_HOOK = "dbcache_middle"


class DBState(BaseState):
    """Shared state of one DBCache run."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.call = 0  # network calls finished
        self.consecutive = 0  # cached calls in a row
        self.skip = False  # this call reuses the middle residual
        self.head_input: torch.Tensor | None = None  # hidden states entering block 0 on this call
        self.head_output: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (hidden, encoder) after block Fn-1
        self.prev_residual: torch.Tensor | None = None  # Fn residual of the last full call
        self.middle_residual: tuple[torch.Tensor, torch.Tensor | None] | None = None


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """``mean|new - old| / mean|old|`` (FirstBlockCache's and cache-dit's residual change)."""
    return ((new - old).abs().mean() / old.abs().mean()).item()


def _meta(module: nn.Module) -> Any:
    return TransformerBlockRegistry.get(unwrap_module(module).__class__)


def _split(meta: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(output, tuple):
        ehs = output[meta.return_encoder_hidden_states_index] if meta.return_encoder_hidden_states_index is not None else None
        return output[meta.return_hidden_states_index], ehs
    return output, None


def _join(meta: Any, like: Any, hs: torch.Tensor, ehs: torch.Tensor | None) -> Any:
    if not isinstance(like, tuple):
        return hs
    out = list(like)
    out[meta.return_hidden_states_index] = hs
    if meta.return_encoder_hidden_states_index is not None:
        out[meta.return_encoder_hidden_states_index] = ehs
    return tuple(out)


class DBClockHook(CallClockHook):
    """Root hook: starts each call un-skipped and counts finished calls."""

    def begin(self, s: Any) -> None:
        s.skip = False


class DBHeadHook(ModelHook):
    """On the first Fn blocks: block 0 records its input, block Fn-1 decides and applies the cache."""

    _is_stateful = True

    def __init__(
        self,
        state: StateManager,
        first: bool,
        last: bool,
        threshold: float,
        warmup: int,
        max_consecutive: int,
        decisions: list[bool],
    ) -> None:
        super().__init__()
        self.state_manager = state
        self.decisions = decisions  # per call: True = cached (read by tests and reports)
        self.first, self.last = first, last
        self.threshold, self.warmup, self.max_consecutive = threshold, warmup, max_consecutive

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.meta = _meta(module)
        return module

    def can_cache(self, s: DBState, residual: torch.Tensor) -> bool:
        if self.threshold <= 0 or s.call < self.warmup or s.prev_residual is None or s.middle_residual is None:
            return False
        if 0 <= self.max_consecutive <= s.consecutive:
            return False
        if residual.shape != s.prev_residual.shape:
            return False
        return relative_l1(residual, s.prev_residual) <= self.threshold

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        s = self.state_manager.get_state()
        if self.first:
            s.head_input = self.meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not self.last:
            return output
        hs, ehs = _split(self.meta, output)
        residual = hs - s.head_input
        s.skip = self.can_cache(s, residual)
        self.decisions.append(s.skip)
        if s.skip:
            s.consecutive += 1
            mh, me = s.middle_residual
            return _join(self.meta, output, hs + mh, ehs + me if ehs is not None else None)
        s.consecutive = 0
        s.prev_residual = residual
        s.head_output = (hs, ehs)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


class DBMiddleHook(ModelHook):
    """On the middle blocks: pass the (already cache-corrected) states through on a cached call;
    otherwise compute, and the last middle block stores the middle residual."""

    def __init__(self, state: StateManager, last: bool) -> None:
        super().__init__()
        self.state_manager = state
        self.last = last

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.meta = _meta(module)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        s = self.state_manager.get_state()
        if s.skip:
            hs = self.meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
            if self.meta.return_encoder_hidden_states_index is None:
                return hs
            ehs = self.meta._get_parameter_from_args_kwargs("encoder_hidden_states", args, kwargs)
            return _join(self.meta, (None, None), hs, ehs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            hs, ehs = _split(self.meta, output)
            h0, e0 = s.head_output
            s.middle_residual = (hs - h0, ehs - e0 if ehs is not None else None)
        return output


def split_blocks(model: nn.Module, fn: int, bn: int) -> tuple[list, list, list]:
    """(first Fn, middle, last Bn) blocks as (name, module) lists; at least one middle block."""
    blocks = block_lists(model)
    if fn < 1 or bn < 0 or fn + bn >= len(blocks):
        raise ValueError(
            f"DBCache needs Fn >= 1, Bn >= 0 and Fn + Bn < {len(blocks)} (the model's block count) so that a middle "
            f"block remains to cache; got Fn={fn}, Bn={bn}: lower Fn or Bn"
        )
    return blocks[:fn], blocks[fn : len(blocks) - bn], blocks[len(blocks) - bn :]


@register_method
class DBCache(CacheAdapter):
    name = "dbcache"
    paper = "DBCache (Dual Block Cache), vipshop/cache-dit; extends ParaAttention's First Block Cache"
    applies_to = Applies(arch=("dit",))  # diffusers transformers (their blocks are what it caches)
    description = "compute the first Fn and last Bn blocks; reuse the middle blocks' residual while the Fn residual is unchanged"
    knobs = (
        SOLVER_KNOB,
        Knob("Fn", int, 1, "first blocks always computed (their residual drives the decision)", low=1, high=256),
        Knob("Bn", int, 1, "last blocks always computed (they refine the cached approximation)", low=0, high=256),
        Knob(
            "threshold",
            float,
            0.2,
            "relative L1 change of the Fn residual at or below which the middle blocks are reused (0: never)",
            low=0.0,
            high=10.0,
        ),
        Knob("warmup", int, 0, "first network calls always computed in full", low=0, high=1000),
        Knob("max_consecutive", int, -1, "most cached calls in a row (-1: no limit)", low=-1, high=1000),
    )

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        c = self.config
        head, middle, _ = split_blocks(model, c["Fn"], c["Bn"])
        state = StateManager(DBState)
        self.decisions: list[bool] = []  # per network call of the latest run: True = middle blocks reused
        register(model, DBClockHook(state), CLOCK_HOOK)
        for i, (_, block) in enumerate(head):
            last = i == len(head) - 1
            hook = DBHeadHook(state, i == 0, last, c["threshold"], c["warmup"], c["max_consecutive"], self.decisions)
            register(block, hook, HEAD_HOOK)
        for i, (_, block) in enumerate(middle):
            register(block, DBMiddleHook(state, i == len(middle) - 1), MIDDLE_HOOK)
        return CacheHandle(model, [CLOCK_HOOK, HEAD_HOOK, MIDDLE_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every block (first, middle and last), so ``computed / called`` is the fraction of blocks run."""
        head, middle, tail = split_blocks(model, self.config["Fn"], self.config["Bn"])
        return dict(head + middle + tail)
