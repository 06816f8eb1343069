"""The method adapter interface: metadata, typed knobs, artifacts, and ``prepare -> Prepared``.

A method turns (model bundle, knobs, steps) into a :class:`Prepared` method: the sampler
``x0 = sampler(noise, cond, guidance, generators)`` and the :class:`~bench.denoiser.Denoiser` that
sampler calls (the teacher's for a training-free method, a student's for a trained one). It never
counts its own NFE or times itself: the harness counts forwards, FLOPs and units on the prepared
denoiser's network and times the sampler call from outside.

A trained or calibrated method declares the artifacts it needs (:meth:`MethodAdapter.artifacts`,
specs from :mod:`bench.artifacts`) and builds one when asked (:meth:`MethodAdapter.build`); the
harness builds each once, before the jobs that need it, and hands the finished ones to ``prepare``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from bench.registry import METHODS

if TYPE_CHECKING:
    from bench.artifacts import Artifact, ArtifactSpec, BuildContext

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
    trains: bool = False  # the value changes what is trained or calibrated (it is in the artifact spec)

    def validate(self, value: Any) -> Any:
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise KnobError(f"knob {self.name!r} must be {self.type.__name__}, got {type(value).__name__} {value!r}")
        if self.type is float and not math.isfinite(value):
            raise KnobError(f"knob {self.name!r} must be a finite number, got {value!r}")
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
        if self.trains:
            d["trains"] = True
        return d


class Sampler(Protocol):
    def __call__(
        self, noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
    ) -> torch.Tensor: ...


@dataclass
class Prepared:
    """What a job runs: ``sampler`` and the ``denoiser`` it calls (the harness counts NFE, FLOPs,
    units and guidance rows on ``denoiser.net``), and the artifacts it was made from (their
    recorded training cost is the method's). Calling it calls the sampler."""

    sampler: Sampler
    denoiser: Denoiser
    artifacts: tuple[Artifact, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self, noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
    ) -> torch.Tensor:
        return self.sampler(noise, cond, guidance, generators)


class MethodNotApplicable(ValueError):
    """A method asked to run on a model (or step count) it does not support."""


class MethodAdapter:
    """Base class: subclasses set the metadata class attributes and implement :meth:`make`
    (and, when they train or calibrate, :meth:`artifacts` and :meth:`build`)."""

    name: ClassVar[str]
    family: ClassVar[str]
    training: ClassVar[str]
    paper: ClassVar[str]
    applies_to: ClassVar[Applies]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    description: ClassVar[str] = ""
    steps_supported: ClassVar[tuple[int, ...] | None] = None  # None: any step count

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
            "applies_to": cls.applies_to.describe(),
            "steps_supported": list(cls.steps_supported) if cls.steps_supported is not None else None,
            "description": cls.description,
            "knobs": {k.name: k.describe() for k in cls.knobs},
        }

    def training_knobs(self) -> dict[str, Any]:
        """The knob values that change what is trained (marked ``trains``): part of every artifact spec."""
        return {k.name: self.config[k.name] for k in self.knobs if k.trains}

    def check(self, bundle: ModelBundle, steps: int | None = None) -> None:
        bad = self.applies_to.mismatches(bundle.capabilities)
        if bad:
            raise MethodNotApplicable(
                f"method {self.name!r} applies to {self.applies_to.text()} models, but {bundle.name!r} has "
                f"{'; '.join(bad)}; choose a method that applies to it (`bench list methods`)"
            )
        if steps is not None and self.steps_supported is not None and steps not in self.steps_supported:
            raise MethodNotApplicable(
                f"method {self.name!r} runs at {'/'.join(map(str, self.steps_supported))} steps, not {steps}; "
                f"give it its own steps in the suite (methods: [{{name: {self.name}, steps: "
                f"[{', '.join(map(str, self.steps_supported))}]}}])"
            )

    # --- artifacts: what a trained or calibrated method needs built ------------------------

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        """The artifacts a job of this method on ``bundle`` at ``steps`` and ``guidance`` needs
        (their parents are in each spec); [] for a training-free method. Cheap: nothing is built.
        ``guidance`` is None when the caller does not know it (a method whose artifact depends on
        the job's guidance then raises)."""
        return []

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        """Train or calibrate the artifact ``spec`` on the teacher ``ctx.bundle``, writing its files
        into ``ctx.out`` and checkpoints into ``ctx.work`` (see :class:`bench.artifacts.BuildContext`)."""
        raise NotImplementedError(f"{self.name} declares artifacts but does not build them")

    # --- preparing a job -------------------------------------------------------------------

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Sampler | Prepared:
        """The sampler for ``steps`` steps on ``bundle`` (a plain sampler runs the model's own
        denoiser), or a :class:`Prepared` with the student denoiser it calls."""
        raise NotImplementedError

    def prepare(
        self,
        bundle: ModelBundle,
        steps: int,
        artifacts: Mapping[str, Artifact] | None = None,
        guidance: float | None = None,
    ) -> Prepared:
        """What a job of this method runs. ``artifacts`` (by spec key) are the finished artifacts
        the harness built for it; without them they are looked up, or built here and now, in the
        default artifact store (for tools and tests; a suite run builds them first, as tasks)."""
        self.check(bundle, steps)
        if artifacts is None:
            from bench.artifacts import ensure_all

            artifacts = ensure_all(self, bundle, steps, guidance)
        used = tuple(artifacts[s.key] for s in self.artifacts(bundle, steps, guidance) if s.key in artifacts)
        out = self.make(bundle, steps, artifacts)
        if not isinstance(out, Prepared):
            return Prepared(out, bundle.denoiser, used)
        if not out.artifacts:
            out.artifacts = used
        return out


def register_method(cls: type[MethodAdapter]) -> type[MethodAdapter]:
    """Class decorator: validate the metadata and add the adapter to the method registry."""
    for attr in ("name", "family", "training", "paper", "applies_to"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define {attr}")
    if not isinstance(cls.applies_to, Applies):
        raise TypeError(f"{cls.__name__}.applies_to must be an Applies(...) (capabilities it runs on)")
    if cls.training not in TRAINING_CLASSES:
        raise TypeError(f"{cls.__name__}.training must be one of {TRAINING_CLASSES}")
    if cls.family not in FAMILIES:
        raise TypeError(f"{cls.__name__}.family must be one of {FAMILIES}")
    METHODS.add(cls.name, cls, **cls.metadata())
    return cls
