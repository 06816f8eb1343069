"""Accounting from outside the method: network forwards, FLOPs, latency, memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ForwardCounter:
    """Counts calls and batch rows of ``net.forward`` with a forward pre-hook.

    A classifier-free-guided evaluation is one forward of a doubled batch: one call, 2B rows.
    ``first_inputs`` keeps the (x, t) of each batch's first call when ``keep_first`` is set
    (the state the sampler really started from, used by the exact-ODE oracle).
    """

    net: nn.Module
    keep_first: bool = False
    calls: int = 0
    rows: int = 0
    first_inputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _handle: Any = None
    _armed: bool = False

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        self.calls += 1
        self.rows += int(x.shape[0])
        if self.keep_first and self._armed:
            t = args[1] if len(args) > 1 else kwargs["t"]
            self.first_inputs.append((x.detach().clone(), torch.as_tensor(t).detach().clone()))
            self._armed = False

    def arm(self) -> None:
        """Record the next call's inputs (call before each sampler call)."""
        self._armed = True

    def __enter__(self) -> ForwardCounter:
        self._handle = self.net.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def flops_of(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention) by torch's flop counter."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float]:
    """Run ``fn`` once; return its result and wall seconds (device synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def median_iqr(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    if len(xs) < 2:
        return xs[0], 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[2] - q[0]


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak allocator memory on CUDA; the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
