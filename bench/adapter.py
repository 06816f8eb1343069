"""The method adapter interface: metadata, typed knobs, and ``prepare -> sampler``.

A method turns (model bundle, knobs, steps) into a sampler
``x0 = sampler(noise, cond, guidance, generators)``. It never counts its own NFE or times
itself: the harness wraps the network and the sampler call from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from bench.registry import METHODS

if TYPE_CHECKING:
    from bench.models import ModelBundle

TRAINING_CLASSES = ("free", "calibration", "params", "finetune", "full")
FAMILIES = ("solver", "caching", "distillation", "consistency", "learned_solver")


class KnobError(ValueError):
    """A knob value of the wrong type or out of range."""


@dataclass(frozen=True)
class Knob:
    """A typed method setting; the sweep space and docs are built from these."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    def validate(self, value: Any) -> Any:
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise KnobError(f"knob {self.name!r} must be {self.type.__name__}, got {type(value).__name__} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise KnobError(f"knob {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise KnobError(f"knob {self.name!r} must be in [{self.low}, {self.high}], got {value!r}")
        return value

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type.__name__, "default": self.default, "help": self.help}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.low is not None or self.high is not None:
            d["range"] = [self.low, self.high]
        return d


class Sampler(Protocol):
    def __call__(
        self, noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
    ) -> torch.Tensor: ...


class MethodNotApplicable(ValueError):
    """A method asked to run on a model kind it does not support."""


class MethodAdapter:
    """Base class: subclasses set the metadata class attributes and implement ``prepare``."""

    name: ClassVar[str]
    family: ClassVar[str]
    training: ClassVar[str]
    paper: ClassVar[str]
    applies_to: ClassVar[tuple[str, ...]]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, **knobs: Any) -> None:
        self.config = self.resolve_knobs(knobs)

    @classmethod
    def resolve_knobs(cls, knobs: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, types and ranges checked; unknown knobs name the valid ones."""
        by_name = {k.name: k for k in cls.knobs}
        unknown = sorted(set(knobs) - set(by_name))
        if unknown:
            valid = ", ".join(by_name) or "none"
            raise KnobError(f"method {cls.name!r} has no knob {unknown[0]!r}; its knobs: {valid}")
        return {k.name: k.validate(knobs[k.name]) if k.name in knobs else k.default for k in cls.knobs}

    @classmethod
    def metadata(cls) -> dict[str, Any]:
        return {
            "family": cls.family,
            "training": cls.training,
            "paper": cls.paper,
            "applies_to": list(cls.applies_to),
            "description": cls.description,
            "knobs": {k.name: k.describe() for k in cls.knobs},
        }

    def check(self, bundle: ModelBundle) -> None:
        if bundle.kind not in self.applies_to:
            raise MethodNotApplicable(
                f"method {self.name!r} applies to {'/'.join(self.applies_to)} models, "
                f"but {bundle.name!r} predicts {bundle.kind!r}; choose a method that lists {bundle.kind!r}"
            )

    def prepare(self, bundle: ModelBundle, steps: int) -> Sampler:
        raise NotImplementedError

    def train_cost(self) -> dict[str, float]:
        """Training spent to make this method usable (zero for training-free methods)."""
        return {"wall_s": 0.0, "optimizer_steps": 0, "teacher_evals": 0}


def register_method(cls: type[MethodAdapter]) -> type[MethodAdapter]:
    """Class decorator: validate the metadata and add the adapter to the method registry."""
    for attr in ("name", "family", "training", "paper", "applies_to"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define {attr}")
    if cls.training not in TRAINING_CLASSES:
        raise TypeError(f"{cls.__name__}.training must be one of {TRAINING_CLASSES}")
    if cls.family not in FAMILIES:
        raise TypeError(f"{cls.__name__}.family must be one of {FAMILIES}")
    METHODS.add(cls.name, cls, **cls.metadata())
    return cls
