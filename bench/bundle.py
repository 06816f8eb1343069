"""What a method and the metrics get of a model (:class:`ModelBundle`), what the model is
(:class:`Capabilities`), and which models a method applies to (:class:`Applies`).

A model's capabilities replace a single "kind" string: its network architecture (``unet``,
``dit``, ``mlp``, ``analytic``, later ``video-dit``), the data it makes (``image``, ``vector``,
``video``), what its network predicts (``eps``, ``x0``, ``v``, ``flow``), how it is conditioned
(``class``, ``text``, ``none``), its schedule (``vp``, ``flow``) and its guidance (``cfg``: one
batched cond + uncond pass, ``embedded``: a guidance-distilled network takes the scale as an
input, ``none``). A feature cache declares the architectures it hooks; a solver the predictions
it converts; a trained method the teachers it can distil.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from bench.denoiser import Denoiser, VPSchedule

CAPABILITY_FIELDS = ("arch", "data", "prediction", "conditioning", "schedule", "guidance")


@dataclass(frozen=True)
class Capabilities:
    """What a model is, for matching methods to it (see the module docstring)."""

    arch: str
    data: str
    prediction: str
    conditioning: str
    schedule: str
    guidance: str

    def describe(self) -> str:
        return ", ".join(f"{f}={getattr(self, f)}" for f in CAPABILITY_FIELDS)


@dataclass(frozen=True)
class Applies:
    """Which models a method runs on: for each capability, the allowed values (None: any).

    ``Applies(prediction=("eps", "v"))`` is a VP solver; ``Applies(arch=("dit",))`` a transformer
    cache; ``Applies(prediction=("eps", "flow"), data=("image", "vector"))`` a student that distils
    any eps or flow teacher."""

    arch: tuple[str, ...] | None = None
    data: tuple[str, ...] | None = None
    prediction: tuple[str, ...] | None = None
    conditioning: tuple[str, ...] | None = None
    schedule: tuple[str, ...] | None = None
    guidance: tuple[str, ...] | None = None

    def mismatches(self, caps: Capabilities) -> list[str]:
        """The capabilities of ``caps`` this method does not accept, as ``field=value (needs a|b)``."""
        out = []
        for f in CAPABILITY_FIELDS:
            allowed = getattr(self, f)
            if allowed is not None and getattr(caps, f) not in allowed:
                out.append(f"{f}={getattr(caps, f)} (needs {'|'.join(allowed)})")
        return out

    def matches(self, caps: Capabilities) -> bool:
        return not self.mismatches(caps)

    def describe(self) -> dict[str, list[str]]:
        """The constrained capabilities and their allowed values (unconstrained ones left out)."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    def text(self) -> str:
        d = self.describe()
        return " ".join(f"{k}={'|'.join(v)}" for k, v in d.items()) or "any model"


@dataclass
class ModelBundle:
    """What a method and the metrics need of a model."""

    name: str
    denoiser: Denoiser
    sample_shape: tuple[int, ...]
    data: str  # "image", "vector" (or "video")
    num_classes: int | None = None
    dtype: torch.dtype = torch.float32
    weights_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    arch: str = ""  # "" = read from the network: ``.unet`` -> unet, ``.transformer`` -> dit, else the net's ``arch``
    options: dict[str, Any] = field(default_factory=dict)  # the options it was built with (set by build_model)

    @property
    def kind(self) -> str:
        """What the network predicts ('eps', 'x0', 'v' or 'flow')."""
        return self.denoiser.kind

    @property
    def capabilities(self) -> Capabilities:
        net = self.denoiser.net
        arch = (
            self.arch
            or getattr(net, "arch", "")
            or ("unet" if hasattr(net, "unet") else "dit" if hasattr(net, "transformer") else "other")
        )
        if self.num_classes is None:
            conditioning = "none"
        else:
            conditioning = "text" if self.extra.get("prompts") is not None else "class"
        d = self.denoiser
        guidance = "embedded" if d.guidance_embedded else "cfg" if d.null_class is not None and self.num_classes else "none"
        return Capabilities(arch, self.data, d.prediction, conditioning, d.schedule.kind, guidance)

    @property
    def identity(self) -> dict[str, Any]:
        """Which model this is, for artifact specs: name, options (a weights path left out: the
        hash says which weights) and weights hash."""
        opts = {k: v for k, v in self.options.items() if k != "weights"}
        return {"name": self.name, "options": opts, "weights": self.weights_hash}

    @property
    def t_start(self) -> float:
        """The native time every sampler starts from (trailing spacing: the noisiest step)."""
        sch = self.denoiser.schedule
        return float(sch.num_train_timesteps - 1) if isinstance(sch, VPSchedule) else float(sch.num_train_timesteps)
