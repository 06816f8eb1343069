"""What every feature cache shares: one hook style, the cache x solver adapter, clean removal.

A cache is a config plus ``apply(model, config) -> handle`` that installs *named* diffusers
``ModelHook``s (diffusers' own where it ships the algorithm, ours otherwise, in the same
``HookRegistry``), and ``remove(handle)`` that takes every hook away and restores each touched
module's ``__dict__`` (diffusers leaves a bound ``forward`` and ``_diffusers_hook`` behind).
The adapter composes a cache with any registered solver: the solver's sampler runs while the
hooks are installed, from the start to the end of each sampler call, so no cache state outlives
a call and the model is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import BaseState, CacheContext, ModelHook, StateManager, _set_cache_context
from torch import nn

from bench.adapter import Knob, MethodAdapter, Sampler
from bench.bundle import ModelBundle
from bench.registry import METHODS

if TYPE_CHECKING:
    from bench.artifacts import Artifact, ArtifactSpec

SOLVER_KNOB = Knob("solver", str, "euler", "registered solver the cache runs under (its default knobs)")
CONTEXT = "cond"  # a guided evaluation is one batched forward, so one cache context per call


def target_model(net: nn.Module) -> nn.Module:
    """The diffusers model a cache hooks: ``net.transformer`` / ``net.unet`` of the digits wrappers,
    or ``net`` itself when it is a diffusers model."""
    for attr in ("transformer", "unet"):
        sub = getattr(net, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    return net


@dataclass
class CacheHandle:
    """What ``apply`` installed: hook names per module and the modules' prior ``__dict__`` keys."""

    model: nn.Module
    hook_names: list[str]
    touched: dict[nn.Module, set[str]] = field(default_factory=dict)


def snapshot(model: nn.Module) -> dict[nn.Module, set[str]]:
    """Which of ``forward`` / ``_diffusers_hook`` each module had in its ``__dict__`` before apply."""
    return {m: {k for k in ("forward", "_diffusers_hook") if k in m.__dict__} for m in model.modules()}


def remove_hooks(handle: CacheHandle) -> None:
    """Remove the named hooks everywhere under the model and undo what diffusers left behind."""
    registry = HookRegistry.check_if_exists_or_initialize(handle.model)
    for name in handle.hook_names:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    for m, before in handle.touched.items():
        reg = m.__dict__.get("_diffusers_hook")
        if reg is not None and reg.hooks:
            continue  # someone else's hooks remain: leave them
        for k in ("forward", "_diffusers_hook"):
            if k not in before:
                m.__dict__.pop(k, None)


def set_context(model: nn.Module, name: str | None) -> None:
    _set_cache_context(model, CacheContext(name) if name is not None else None)


class StepState(BaseState):
    """Shared per-call state of the scheduled caches: network-call index and whether it is full."""

    def __init__(self) -> None:
        self.call = 0
        self.full = True

    def reset(self) -> None:
        self.call = 0
        self.full = True


class CallClockHook(ModelHook):
    """Root hook of a scheduled cache: ``begin(state)`` sets up each model forward (``state.call``
    is the index of the network call), and the call is counted when the forward returns."""

    _is_stateful = True

    def __init__(self, state: StateManager) -> None:
        super().__init__()
        self.state_manager = state

    def begin(self, s: Any) -> None:
        raise NotImplementedError

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        s = self.state_manager.get_state()
        self.begin(s)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            s.call += 1

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


class StepClockHook(CallClockHook):
    """Root hook: before each model forward, decide from the call index whether it is a full pass."""

    def __init__(self, state: StateManager, is_full: Callable[[int], bool]) -> None:
        super().__init__(state)
        self.is_full = is_full

    def begin(self, s: Any) -> None:
        s.full = self.is_full(s.call)


class ReuseOutputHook(ModelHook):
    """Computes the module on full passes and stores its output; returns the stored one otherwise."""

    _is_stateful = True

    def __init__(self, state: StateManager) -> None:
        super().__init__()
        self.state_manager = state  # shared StepState (the clock's)
        self.cached: Any = None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.state_manager.get_state().full or self.cached is None:
            self.cached = self.fn_ref.original_forward(*args, **kwargs)
        return self.cached

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.cached = None
        return module


def register(module: nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


class CacheAdapter(MethodAdapter):
    """Base adapter of the caching family: subclasses implement :meth:`apply` (and :meth:`units`)."""

    family = "caching"
    training = "free"
    knobs: ClassVar[tuple[Knob, ...]] = (SOLVER_KNOB,)

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        """Install this cache's named hooks on ``model`` (a diffusers model) for a ``steps``-step run."""
        raise NotImplementedError

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules a cache skips, for ``bench.accounting.UnitCounter`` (blocks computed)."""
        return {}

    def solver_adapter(self) -> MethodAdapter:
        """The registered solver (at its default knobs) this cache runs under."""
        name = self.config["solver"]
        cls = METHODS.get(name)
        if getattr(cls, "family", None) != "solver":
            raise ValueError(f"{self.name}: knob solver={name!r} is not a solver; choose a registered solver method")
        return cls()

    def solver(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact] | None = None) -> Sampler:
        """The solver's prepared sampler (``artifacts``: the solver's own, such as a GITS schedule)."""
        return self.solver_adapter().prepare(bundle, steps, artifacts)

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        return self.solver_adapter().artifacts(bundle, steps, guidance)

    @contextmanager
    def installed(self, model: nn.Module, steps: int) -> Iterator[CacheHandle]:
        """The cache's hooks on ``model`` for the duration of the block, in a fresh cache context."""
        before = snapshot(model)
        handle = self.apply(model, steps)
        handle.touched = before
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        set_context(model, CONTEXT)
        try:
            yield handle
        finally:
            set_context(model, None)
            remove_hooks(handle)

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Sampler:
        inner = self.solver(bundle, steps, artifacts)
        model = target_model(bundle.denoiser.net)
        self.units(model)  # fails here, with the fix named, on a model this cache cannot hook

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            with self.installed(model, steps):
                return inner(noise, cond, guidance, generators)

        return sampler


def block_lists(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A transformer's blocks in execution order, named ``<list>.<index>`` (diffusers' identifiers)."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    out = []
    for name, sub in model.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(sub, nn.ModuleList):
            out += [(f"{name}.{i}", b) for i, b in enumerate(sub)]
    if not out:
        raise ValueError(f"{type(model).__name__} has no transformer block lists; this cache targets diffusers transformers")
    return out


def new_state() -> StateManager:
    return StateManager(StepState)
