"""TaylorSeer (Liu et al. 2025, arXiv 2503.06923): forecast features by Taylor expansion.

On full passes each attention and MLP sub-layer stores its output and its finite differences up
to order m (divided by the step distance); between full passes its output is forecast as
sum_k Delta^k F / k! * offset^k, without running it. The hooks sit on the same sub-layers FORA
reuses and follow diffusers' ``apply_taylorseer_cache`` schedule: calls 0..warmup-1 are full,
then call s is full when (s - warmup - 1) % interval == 0 (so call ``warmup`` is already a
forecast); factors are kept in float32.

Written here in diffusers' hook style rather than wrapping ``apply_taylorseer_cache`` (an earlier
version did): diffusers' forecast starts from a zero tensor and adds each order's term with a
separate multiply and add, five passes over every cached feature map per forecast at order 1,
which on a small network took a tenth of the time a cache was meant to save
(``benchmarks/cache_speedup.py``). Here a forecast is Horner's rule, one fused
``torch.add(f_k, acc, alpha=offset / (k + 1))`` per order (one pass at order 1), and an update
divides its differences in place. ``tests/test_caching.py`` checks it against diffusers' hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheAdapter, CacheHandle, register
from methods.caching.fora import sublayers

HOOK = "taylorseer"
FACTOR_DTYPE = torch.float32


class TaylorSeerHook(ModelHook):
    """On one sub-layer: compute and update the Taylor factors on full calls, forecast otherwise."""

    _is_stateful = True

    def __init__(self, interval: int, warmup: int, order: int) -> None:
        super().__init__()
        self.interval, self.warmup, self.order = interval, warmup, order
        self.reset_state(None)

    def reset_state(self, module: nn.Module | None) -> nn.Module | None:
        self.step = -1
        self.last: int | None = None
        self.factors: list[list[torch.Tensor]] = []  # per output: [F, dF, d2F, ...] (float32)
        self.dtypes: list[torch.dtype] = []
        self.tuple_out = False
        return module

    def is_full(self, step: int) -> bool:
        return step < self.warmup or (step - self.warmup - 1) % self.interval == 0

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.step += 1
        if self.is_full(self.step) or self.last is None:
            out = self.fn_ref.original_forward(*args, **kwargs)
            self.update(out)
            return out
        return self.forecast()

    def update(self, out: Any) -> None:
        self.tuple_out = not torch.is_tensor(out)
        outs = tuple(out) if self.tuple_out else (out,)
        delta = None if self.last is None else self.step - self.last
        factors = []
        for i, f in enumerate(outs):
            new = [f.to(FACTOR_DTYPE)]
            prev = self.factors[i] if delta is not None and i < len(self.factors) else []
            for j in range(min(self.order, len(prev))):
                if prev[j].shape != new[j].shape:
                    break  # a changed shape restarts the expansion from order 0
                new.append((new[j] - prev[j]).div_(delta))
            factors.append(new)
        self.factors, self.dtypes, self.last = factors, [f.dtype for f in outs], self.step

    def forecast(self) -> Any:
        offset = self.step - self.last
        outs = []
        for fs, dtype in zip(self.factors, self.dtypes, strict=True):
            acc = fs[-1]
            for k in range(len(fs) - 2, -1, -1):  # f_0 + o (f_1 + o/2 (f_2 + o/3 (...)))
                acc = torch.add(fs[k], acc, alpha=offset / (k + 1))
            outs.append(acc.to(dtype) if len(fs) > 1 or dtype != FACTOR_DTYPE else acc.clone())
        return tuple(outs) if self.tuple_out else outs[0]


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
        for layer in sublayers(model).values():
            register(layer, TaylorSeerHook(c["interval"], c["warmup"], c["order"]), HOOK)
        return CacheHandle(model, [HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return sublayers(model)
