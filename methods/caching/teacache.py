"""TeaCache (Liu et al. 2024, arXiv 2411.19108): timestep-embedding-aware cache of the block-stack residual.

On each network call the first block's timestep-modulated input ``m = norm1(h, emb=temb)[0]`` is
computed; its relative L1 change since the previous call, ``|m - m_prev|_1 / |m_prev|_1`` (over the
whole batch), is rescaled by a polynomial fitted per model and accumulated. While the accumulator
stays under ``threshold`` the block stack is skipped and the residual cached at the last full call
(image-token output of the last block minus input of the first) is added to its input; otherwise the
blocks run, the residual is stored and the accumulator is reset to 0. The first and the last call
of a sampler run are always full.

The rescaling polynomial is calibrated per (model, solver, steps): on an uncached run over a few
seeds, every pair (relative L1 change of the modulated input, relative L1 change of the model
output) between successive calls, per batch row, is fitted by ``numpy.polyfit`` (degree a knob,
4 as in the paper). diffusers ships no TeaCache hook, so it is written here in diffusers' hook style.

Departure from the paper's reference code: a rescaled change below 0 (a fitted polynomial can dip
below 0 near x = 0, where no relative change is negative) is clamped to 0, so the accumulator never
decreases and ``threshold = 0`` never skips.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheHandle, block_lists, register
from methods.caching.calibrated import (
    CALIB_KNOBS,
    CalibratedCache,
    Recorder,
    block_hidden_in,
    block_hidden_out,
    block_meta,
    block_result,
    fit_rescale,
    modulated_input,
    rel_l1,
    stack_residual,
)

HEAD_HOOK = "teacache_head"
BLOCK_HOOK = "teacache_block"


class TeaState(BaseState):
    """Per-context state of one sampler run."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.call = 0
        self.acc = 0.0
        self.prev_mod: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.head_in: torch.Tensor | None = None
        self.skip = False


class _TeaHook(ModelHook):
    """What both TeaCache hooks hold: the shared state, whether the block ends the stack, and the
    block's diffusers metadata (read when the hook is installed)."""

    _is_stateful = True

    def __init__(self, state: StateManager, is_tail: bool) -> None:
        super().__init__()
        self.state_manager = state
        self.is_tail = is_tail
        self.meta: Any = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.meta = block_meta(module)
        return module

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


class TeaHeadHook(_TeaHook):
    """On the first block: the indicator, the skip decision, and (skipping) input + cached residual."""

    def __init__(
        self, state: StateManager, coefficients: list[float], threshold: float, n_calls: int, is_tail: bool, log: list[bool]
    ) -> None:
        super().__init__(state, is_tail)
        self.log = log  # per call: True when the block stack was skipped
        self.rescale = np.poly1d(np.asarray(coefficients, dtype=np.float64))
        self.threshold = float(threshold)
        self.n_calls = int(n_calls)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        s: TeaState = self.state_manager.get_state()
        hidden = block_hidden_in(self.meta, args, kwargs)
        mod = modulated_input(module, self.meta, args, kwargs)
        i = s.call
        s.call += 1
        skip = False
        first_or_last = i == 0 or i >= self.n_calls - 1
        if first_or_last or s.prev_mod is None or s.residual is None or s.prev_mod.shape != mod.shape:
            s.acc = 0.0
        else:
            s.acc += max(float(self.rescale(float(rel_l1(mod, s.prev_mod, dims=0)))), 0.0)
            if s.acc < self.threshold:
                skip = True
            else:
                s.acc = 0.0
        s.prev_mod = mod
        s.skip = skip
        self.log.append(skip)
        if skip:
            return block_result(self.meta, args, kwargs, hidden + s.residual)
        s.head_in = hidden
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            s.residual = stack_residual(block_hidden_out(self.meta, out), hidden)
        return out


class TeaBlockHook(_TeaHook):
    """On every later block: pass the hidden states through when skipping; the last block stores the residual."""

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        s: TeaState = self.state_manager.get_state()
        if s.skip:
            return block_result(self.meta, args, kwargs, block_hidden_in(self.meta, args, kwargs))
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            s.residual = stack_residual(block_hidden_out(self.meta, out), s.head_in)
            s.head_in = None
        return out


@register_method
class TeaCache(CalibratedCache):
    name = "teacache"
    paper = "Liu et al. 2024, Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model, arXiv 2411.19108"
    applies_to = Applies(arch=("dit", "video-dit"))  # diffusers transformers and video DiTs (their blocks are what it caches)
    description = "accumulate the rescaled change of the modulated input; reuse the block-stack residual while under threshold"
    knobs = (
        SOLVER_KNOB,
        Knob(
            "threshold",
            float,
            0.1,
            "accumulated rescaled relative L1 change below which the block stack is skipped (0: never)",
            low=0.0,
            high=10.0,
        ),
        Knob("degree", int, 4, "degree of the rescaling polynomial fitted on the calibration run", low=1, high=8),
        *CALIB_KNOBS,
    )
    calibration_knobs = ("calib_samples", "calib_guidance", "degree")
    modulation = True

    def fit(self, rec: Recorder) -> dict[str, Any]:
        x, y = np.asarray(rec.tea_x), np.asarray(rec.tea_y)
        coef = fit_rescale(x, y, self.config["degree"])
        return {"coefficients": coef.tolist(), "x": x.tolist(), "y": y.tolist()}

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        cal = self.need_calibration()
        blocks = block_lists(model)
        state = StateManager(TeaState)
        self.skip_log: list[bool] = []  # of the latest sampler run, per network call
        c = cal.data["coefficients"]
        head = TeaHeadHook(state, c, self.config["threshold"], cal.n_calls, len(blocks) == 1, self.skip_log)
        register(blocks[0][1], head, HEAD_HOOK)
        for k, (_, block) in enumerate(blocks[1:], start=2):
            register(block, TeaBlockHook(state, is_tail=k == len(blocks)), BLOCK_HOOK)
        return CacheHandle(model, [HEAD_HOOK, BLOCK_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        # every block; the first counts as computed on each call, since its norm1 modulation (the
        # indicator) always runs -- a small part of the block, but UnitCounter sees its weights used
        block_meta(block_lists(model)[0][1])
        return dict(block_lists(model))
