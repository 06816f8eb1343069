"""The sampling loop for a diffusers scheduler stepped over a denoiser.

No registered solver uses it any more (they are plain functions in this package, see ``core.py``
for why); it is the reference the tests compare those functions with, and the way to wrap a
diffusers scheduler that has no counterpart here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from bench.adapter import MethodAdapter, Sampler
from bench.bundle import ModelBundle
from bench.denoiser import Denoiser, FlowSchedule, VPSchedule

PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "flow": "flow_prediction"}


def vp_scheduler_config(denoiser: Denoiser) -> dict[str, Any]:
    """The settings that make a diffusers VP scheduler use this model's betas and trailing spacing."""
    sch = denoiser.schedule
    assert isinstance(sch, VPSchedule)
    return {
        "num_train_timesteps": sch.num_train_timesteps,
        "trained_betas": list(sch.betas),
        "prediction_type": PREDICTION_TYPE[denoiser.kind],
        "timestep_spacing": "trailing",
    }


@torch.no_grad()
def run_scheduler(
    sched: Any,
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Step a scheduler (``set_timesteps`` already called) from ``noise`` to the data."""
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    x = noise * getattr(sched, "init_noise_sigma", 1.0)
    scale = getattr(sched, "scale_model_input", lambda x, t: x)
    for t in sched.timesteps:
        out = denoiser(scale(x, t), t, cond, guidance)
        kw = {"generator": generators} if takes_gen else {}
        x = sched.step(out, t, x, **kw, return_dict=False)[0]
    return x


class SchedulerSolver(MethodAdapter):
    """A solver that is a diffusers scheduler stepped over the denoiser (VP: the model's betas and
    trailing spacing; flow: ``flow_scheduler_cls``)."""

    family = "solver"
    training = "free"
    vp_scheduler_cls: ClassVar[type | None] = None
    flow_scheduler_cls: ClassVar[type | None] = None

    def scheduler_kwargs(self, bundle: ModelBundle) -> dict[str, Any]:
        """Method-specific scheduler settings from the knobs."""
        return {}

    def make_scheduler(self, bundle: ModelBundle) -> Any:
        sch = bundle.denoiser.schedule
        if isinstance(sch, VPSchedule):
            cls, kw = self.vp_scheduler_cls, {**vp_scheduler_config(bundle.denoiser), **self.scheduler_kwargs(bundle)}
        elif isinstance(sch, FlowSchedule):
            cls, kw = self.flow_scheduler_cls, {"num_train_timesteps": sch.num_train_timesteps, **self.scheduler_kwargs(bundle)}
        else:  # pragma: no cover - schedules are a closed set
            raise TypeError(f"unsupported schedule {sch!r}")
        assert cls is not None, f"{self.name} declares {bundle.kind} support without a scheduler"
        return cls(**kw)

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Any]) -> Sampler:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            sched = self.make_scheduler(bundle)  # fresh per call: multistep solvers keep history
            sched.set_timesteps(steps, device=noise.device)
            return run_scheduler(sched, bundle.denoiser, noise, cond, guidance, generators)

        return sampler
