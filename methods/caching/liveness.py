"""Which of a block's modules only feed the sub-layers a cache replaces: traced, not assumed.

A cache that forecasts or reuses a block's attention and MLP outputs (TaylorSeer) need not compute
the norms whose outputs only feed those sub-layers. Which norms those are differs per block class
(Wan's feed-forward is ``ffn`` after ``norm3``; a Flux single block's norm feeds its attention and
its MLP projection; a CogVideoX norm output is concatenated with the text tokens first), so it is
measured on one real forward: each candidate's output is marked, every torch operation outside the
sub-layers passes its inputs' marks on to its outputs (``TorchFunctionMode``), a sub-layer's output
starts clean, and a candidate whose mark reaches a block's output is live. The forward computes
exactly what it would untraced.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# operations whose result does not depend on the shape of a marked input beyond broadcasting: a
# candidate whose outputs meet only these (before a sub-layer takes them) may be replaced by a scalar
SHAPE_FREE = frozenset(
    {"add", "__add__", "__radd__", "add_", "__iadd__", "mul", "__mul__", "__rmul__", "mul_", "__imul__", "sub",
     "__sub__", "__rsub__", "div", "__truediv__", "neg", "__neg__", "to", "float", "half", "bfloat16", "type_as",
     "squeeze", "unsqueeze", "clone", "contiguous", "dtype", "device", "is_floating_point"}
)  # fmt: skip


def _name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)  # a property's getter: Tensor.shape.__get__ -> "shape"
    return getattr(owner, "__name__", "") if func.__name__ == "__get__" else func.__name__


class _Marks(TorchFunctionMode):
    """Propagates sets of candidate indices from operation inputs to outputs, outside sub-layers, and
    notes the candidates whose values meet an operation outside :data:`SHAPE_FREE`."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (weak reference, marks): a weak one, so that the trace keeps no activation alive
        self.marks: dict[int, tuple[weakref.ref, frozenset[int]]] = {}
        self.depth = 0  # > 0 inside a sub-layer
        self.shaped: set[int] = set()

    def of(self, obj: Any) -> frozenset[int]:
        out: frozenset[int] = frozenset()
        for t in tree_leaves(obj):
            if torch.is_tensor(t) and id(t) in self.marks and self.marks[id(t)][0]() is t:
                out |= self.marks[id(t)][1]
        return out

    def mark(self, obj: Any, marks: frozenset[int]) -> None:
        for t in tree_leaves(obj):
            if torch.is_tensor(t):
                self.marks[id(t)] = (weakref.ref(t), marks)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            marks = self.of((args, kwargs))
            if marks:
                self.mark(out, marks | self.of(out))
                if _name(func) not in SHAPE_FREE:
                    self.shaped |= marks
        return out


def live_candidates(
    run: Callable[[], Any], candidates: list[nn.Module], sublayers: Iterable[nn.Module], blocks: Iterable[nn.Module]
) -> tuple[set[int], set[int], Any]:
    """During ``run()`` (one forward of the model): the indices of ``candidates`` whose outputs reach a
    block's output other than through a sub-layer (live), those whose outputs meet an operation that
    depends on their shape on the way (a Sana block unflattens its normed tokens into an image before
    its convolutional MLP), and what ``run`` returned."""
    trace = _Marks()
    live: set[int] = set()
    handles = []

    def enter(*_: Any) -> None:
        trace.depth += 1

    def leave(*_: Any) -> None:
        trace.depth -= 1

    for layer in sublayers:
        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    for i, norm in enumerate(candidates):
        handles.append(norm.register_forward_hook(lambda m, a, out, i=i: trace.mark(out, trace.of(out) | {i})))
    for block in blocks:
        handles.append(block.register_forward_hook(lambda m, a, out: live.update(trace.of(out))))
    try:
        with trace:
            result = run()
    finally:
        for h in handles:
            h.remove()
    return live, trace.shaped, result
