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
``torch.add(f_k, acc, alpha=offset / (k + 1))`` per order, and an update divides its differences in
place. At order 1 (the default) an update forms no difference at all: it keeps the last two outputs
and the forecast is one ``torch.lerp(F_prev, F, 1 + offset / delta)``, the same
F + offset (F - F_prev) / delta in one pass, and none at the full call. On the CPU the factors are
kept in buffers allocated once per network and reused by later runs (:func:`buffers`: fresh ones
fragmented malloc's heap, so every run faulted in a new copy of them). And on a forecast call the
blocks' own pre-norms, whose outputs only feed the forecast sub-layers, are not computed (:class:`DeadNormHook`): the paper's blocks skip
them together with the layers they feed. Which norms those are is traced on the first call
(:mod:`methods.caching.liveness`), not guessed from names: Wan's ``norm3`` feeds its ``ffn``, which
an earlier version did not know as a sub-layer and left uncomputed, changing the samples.
``tests/test_caching.py`` checks the outputs against diffusers' hooks; ``tests/test_video_caches.py``
and ``tests/test_pipelines_video.py`` that skipping the norms changes no sample bit.
"""

from __future__ import annotations

from typing import Any, ClassVar
from weakref import WeakKeyDictionary

import torch
from diffusers.hooks.hooks import ModelHook, StateManager
from torch import nn

from bench.adapter import Knob, register_method
from bench.bundle import Applies
from methods.caching.base import SOLVER_KNOB, CacheAdapter, CacheHandle, StepClockHook, block_lists, new_state, register
from methods.caching.fora import sublayers
from methods.caching.liveness import live_candidates

HOOK = "taylorseer"
CLOCK_HOOK = "taylorseer_clock"
NORM_HOOK = "taylorseer_dead_norm"
LIVENESS_HOOK = "taylorseer_norm_liveness"
FACTOR_DTYPE = torch.float32


class TaylorSeerHook(ModelHook):
    """On one sub-layer: compute and update the Taylor factors on full calls, forecast otherwise
    (whether a call is full is decided once per model forward by the root clock, ``state``)."""

    _is_stateful = True

    def __init__(self, state: StateManager, order: int) -> None:
        super().__init__()
        self.state_manager, self.order = state, order
        self.reset_state(None)

    def reset_state(self, module: nn.Module | None) -> nn.Module | None:
        self.last: int | None = None
        self.delta: int | None = None  # steps between the last two full calls
        # per output (float32): [F, dF, d2F, ...]; at order 1 [F, F_prev], the forecast forms the difference
        self.factors: list[list[torch.Tensor]] = []
        self.dtypes: list[torch.dtype] = []
        self.tuple_out = False
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        s = self.state_manager.get_state()
        if s.full or self.last is None:
            out = self.fn_ref.original_forward(*args, **kwargs)
            self.update(module, out, s.call)
            return out
        return self.forecast(s.call)

    def update(self, module: nn.Module, out: Any, step: int) -> None:
        self.tuple_out = not torch.is_tensor(out)
        outs = tuple(out) if self.tuple_out else (out,)
        delta = None if self.last is None else step - self.last
        factors = []
        for i, f in enumerate(outs):
            prev = self.factors[i] if delta is not None and i < len(self.factors) else []
            valid = 0  # how many of the previous factors continue (a changed shape restarts from order 0)
            while valid < min(self.order, len(prev)) and prev[valid].shape == f.shape:
                valid += 1
            bufs = buffers(module, i, f, self.order + 1)
            if self.order == 1:  # [F, F_prev]: F goes to the buffer not holding the current F
                slot = bufs[1] if valid and prev[0] is bufs[0] else bufs[0]
                factors.append([keep(slot, f)] + prev[:valid])
                continue
            new, t = [], f
            for j in range(valid + 1):  # F, then each difference from the previous factor of its order
                nxt = (t.to(FACTOR_DTYPE) - prev[j]).div_(delta) if j < valid else None
                new.append(keep(bufs[j], t))
                t = nxt
            factors.append(new)
        self.factors, self.dtypes, self.last = factors, [f.dtype for f in outs], step
        self.delta = delta

    def forecast(self, step: int) -> Any:
        offset = step - self.last
        outs = []
        for fs, dtype in zip(self.factors, self.dtypes, strict=True):
            if self.order == 1 and len(fs) == 2:  # F + o (F - F_prev) / delta in one pass
                outs.append(torch.lerp(fs[1], fs[0], 1.0 + offset / self.delta).to(dtype))
                continue
            acc = fs[-1]
            for k in range(len(fs) - 2, -1, -1):  # f_0 + o (f_1 + o/2 (f_2 + o/3 (...)))
                acc = torch.add(fs[k], acc, alpha=offset / (k + 1))
            outs.append(acc.to(dtype, copy=len(fs) == 1))  # order 0: a copy, never the stored factor itself
        return tuple(outs) if self.tuple_out else outs[0]


# sub-layer -> (output index, shape) -> its factor buffers, kept across sampler runs (CPU only)
BUFFERS: WeakKeyDictionary[nn.Module, dict[tuple[int, torch.Size], list[torch.Tensor]]] = WeakKeyDictionary()


def buffers(module: nn.Module, index: int, like: torch.Tensor, n: int) -> list[torch.Tensor | None]:
    """Where a sub-layer's Taylor factors are kept. On the CPU: ``n`` float32 buffers per output and
    shape, allocated once per network and reused by every later run. A factor outlives the calls
    between two full passes, so when each was a fresh tensor, the blocks freed around it could not
    be joined again and malloc's heap grew by the whole factor set (120 MB on the video teacher) on
    run after run, every page of it faulting in on first touch: TaylorSeer's runs took a fifth
    longer (``benchmarks/cache_speedup.py`` counts the warm-up runs until no page faults). Elsewhere
    (CUDA's caching allocator reuses its blocks) the factors stay fresh tensors (``None`` here)."""
    if like.device.type != "cpu":
        return [None] * n
    per = BUFFERS.setdefault(module, {})
    key = (index, like.shape)
    if key not in per or len(per[key]) < n:
        per[key] = [torch.empty(like.shape, dtype=FACTOR_DTYPE) for _ in range(n)]
    return per[key]


def keep(buf: torch.Tensor | None, f: torch.Tensor) -> torch.Tensor:
    """``f`` in float32, written into ``buf`` where there is one (a copy either way unless ``f`` is
    already float32 and there is no buffer)."""
    return f.to(FACTOR_DTYPE) if buf is None else buf.copy_(f)


class DeadNormHook(ModelHook):
    """On a block's own normalisation layer (outside its sub-layers) whose output only feeds the
    sub-layers being forecast (``dead``, traced on the first call by :class:`NormLivenessHook`): on a
    forecast call nothing reads it, so it returns a zero scalar in its place. The block's modulation
    of it (``norm * (1 + scale) + shift``) then costs a (B, 1, D) tensor instead of two passes over
    the hidden states, and the forecast sub-layer ignores what it is given. Where the block reshapes
    the norm's output on its way to the sub-layer (Sana), the trace says so and the uncomputed input
    stands in instead, with the right shape. The paper's blocks skip these norms with the layers they
    feed; diffusers' hooks on the sub-layers alone compute them on every call.
    ``tests/test_video_caches.py`` and ``tests/test_pipelines_video.py`` check the samples are bit-identical with and without these hooks on Latte, Wan, LTX, CogVideoX and
    HunyuanVideo blocks."""

    def __init__(self, state: StateManager) -> None:
        super().__init__()
        self.state_manager = state
        self.dead = False  # until the trace shows it
        self.scalar = False  # a zero scalar may stand in (else the input does, uncomputed)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.state_manager.get_state().full or not self.dead:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        return x.new_zeros(()) if self.scalar else x


class NormLivenessHook(ModelHook):
    """Root hook: the first forward (always a full pass) runs traced (:mod:`methods.caching.liveness`),
    and each candidate norm whose output reaches a block's output other than through a forecast
    sub-layer stays computed on every call. The trace costs about half a full call on the video
    teacher, so its result is kept per network (``LIVE``) and later runs skip it."""

    def __init__(
        self, norms: list[nn.Module], hooks: list[DeadNormHook], layers: list[nn.Module], blocks: list[nn.Module]
    ) -> None:
        super().__init__()
        self.norms, self.hooks, self.layers, self.blocks = norms, hooks, layers, blocks
        self.traced = False

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.traced:
            return self.fn_ref.original_forward(*args, **kwargs)
        live, shaped, out = live_candidates(
            lambda: self.fn_ref.original_forward(*args, **kwargs), self.norms, self.layers, self.blocks
        )
        LIVE[module] = (frozenset(live), frozenset(shaped))
        settle(self.hooks, LIVE[module])
        self.traced = True
        return out


# network -> (its live candidate norms, those whose outputs meet shape-dependent operations)
LIVE: WeakKeyDictionary[nn.Module, tuple[frozenset[int], frozenset[int]]] = WeakKeyDictionary()


def settle(hooks: list[DeadNormHook], traced: tuple[frozenset[int], frozenset[int]]) -> None:
    live, shaped = traced
    for i, hook in enumerate(hooks):
        hook.dead, hook.scalar = i not in live, i not in shaped


def dead_norms(model: nn.Module) -> list[nn.Module]:
    """The candidates: the LayerNorms of every block that sit outside the block's sub-layers (pre-norms);
    which of them only feed sub-layers is traced on the first call."""
    inside = {id(m) for layer in sublayers(model).values() for m in layer.modules()}
    out = []
    for _, block in block_lists(model):
        out += [m for m in block.modules() if isinstance(m, nn.LayerNorm) and id(m) not in inside]
    return out


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

    skip_dead_norms: ClassVar[bool] = True

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        c = self.config
        state = new_state()
        interval, warmup = c["interval"], c["warmup"]
        register(model, StepClockHook(state, lambda i: i < warmup or (i - warmup - 1) % interval == 0), CLOCK_HOOK)
        layers = list(sublayers(model).values())
        for layer in layers:
            register(layer, TaylorSeerHook(state, c["order"]), HOOK)
        if self.skip_dead_norms:
            norms = dead_norms(model)
            hooks = [DeadNormHook(state) for _ in norms]
            for norm, hook in zip(norms, hooks, strict=True):
                register(norm, hook, NORM_HOOK)
            if model in LIVE:
                settle(hooks, LIVE[model])
            else:
                blocks = [b for _, b in block_lists(model)]
                register(model, NormLivenessHook(norms, hooks, layers, blocks), LIVENESS_HOOK)
        return CacheHandle(model, [CLOCK_HOOK, HOOK, NORM_HOOK, LIVENESS_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return sublayers(model)
