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
from torch.overrides import TorchFunctionMode
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


CLEAR_REFS = "/proc/self/clear_refs"  # writing "5" resets the peak RSS (VmHWM) on Linux
STATUS = "/proc/self/status"  # VmHWM (peak RSS) and VmRSS, in kB


def reset_peak_memory(device: torch.device | str = "cpu") -> bool:
    """Start a new peak-memory window: the CUDA allocator's peak, or on Linux the process's peak
    RSS (VmHWM, reset through /proc/self/clear_refs).

    Returns whether the window really started. Some kernels and sandboxes (gVisor, for one)
    accept the write to ``clear_refs`` and ignore it, so the reset is checked: right after it the
    peak must equal the current RSS. Where it does not, :func:`peak_memory_bytes` keeps reporting
    the process-lifetime peak and callers should record that scope, not pass it off as a window.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 4 * 2**20


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (reported in kB), in bytes; None where unreadable."""
    try:
        with open(STATUS) as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key == field:
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak allocator memory on CUDA; the process's peak RSS on CPU (since the last
    :func:`reset_peak_memory` where that reset took effect)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class _ParamUse(TorchFunctionMode):
    """Calls ``seen(name)`` whenever a torch function receives a parameter registered in ``owner``."""

    def __init__(self, owner: dict[int, str], seen: Callable[[str], None]) -> None:
        super().__init__()
        self.owner = owner
        self.seen = seen

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            if isinstance(a, nn.Parameter) and id(a) in self.owner:
                self.seen(self.owner[id(a)])
        return func(*args, **kwargs)


@dataclass
class UnitCounter:
    """Counts the units (blocks, attention/MLP layers) a cache really computed.

    ``called`` counts entries into a unit's ``__call__``; a call counts in ``computed`` when one
    of the unit's own parameters is then used by a torch function (a ``TorchFunctionMode`` watches
    the weights). A cache hook that returns a stored output enters the unit but uses none of its
    weights, so it is called and not computed; a skipped block that is never entered counts in
    neither (pass ``expected`` calls yourself). The mode costs Python overhead per op: count in
    a separate pass, never inside a timed one. ``fraction`` = computed / called.
    """

    units: dict[str, nn.Module]
    called: int = 0
    computed: int = 0
    per_unit: dict[str, int] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)
    _armed: dict[str, bool] = field(default_factory=dict)
    _mode: Any = None

    def _seen(self, name: str) -> None:
        if self._armed.get(name):
            self._armed[name] = False
            self.computed += 1
            self.per_unit[name] += 1

    def __enter__(self) -> UnitCounter:
        owner: dict[int, str] = {}
        for name, unit in self.units.items():
            self.per_unit.setdefault(name, 0)
            owner.update({id(p): name for p in unit.parameters()})

            def enter(module: nn.Module, args: tuple, name: str = name) -> None:
                self.called += 1
                self._armed[name] = True

            self._handles.append(unit.register_forward_pre_hook(enter))
        self._mode = _ParamUse(owner, self._seen)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def fraction(self) -> float:
        return self.computed / self.called if self.called else 1.0


UNIT_COLUMNS = ("units_called", "units_computed", "units_fraction")


def cache_units(method: Any, net: nn.Module) -> dict[str, nn.Module]:
    """The units a caching adapter may skip: its ``units(model)`` on the diffusers model it hooks
    (``net.transformer`` / ``net.unet`` of the digits wrappers, else ``net``); ``{}`` for a method
    without ``units`` (solvers, students)."""
    units = getattr(method, "units", None)
    if units is None:
        return {}
    subs = [getattr(net, a, None) for a in ("transformer", "unet")]
    return units(next((m for m in subs if isinstance(m, nn.Module)), net))


def units_of(units: dict[str, nn.Module], fn: Callable[[], Any]) -> dict[str, float]:
    """Blocks entered and blocks really computed during one call of ``fn`` (an untimed counting
    pass: the counter's torch-function mode slows every op), as the row's ``units_*`` columns;
    NaN for a method without units."""
    if not units:
        return dict.fromkeys(UNIT_COLUMNS, float("nan"))
    with UnitCounter(units) as uc:
        fn()
    return {"units_called": float(uc.called), "units_computed": float(uc.computed), "units_fraction": uc.fraction}
