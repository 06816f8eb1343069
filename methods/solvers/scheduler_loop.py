"""The one sampling loop shared by every solver that wraps a diffusers scheduler."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from bench.adapter import MethodAdapter, Sampler
from bench.denoiser import FlowSchedule, VPSchedule
from bench.models import ModelBundle

PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "flow": "flow_prediction"}


class SchedulerSolver(MethodAdapter):
    """A solver that is a diffusers scheduler stepped over the denoiser.

    VP models get the model's own betas and trailing timestep spacing (every solver starts at
    the noisiest training step, so all share one exact ODE target on ``gmm``); flow models get
    ``flow_scheduler_cls`` (or the VP class with flow sigmas, see ``flow_kwargs``).
    """

    family = "solver"
    training = "free"
    vp_scheduler_cls: ClassVar[type | None] = None
    flow_scheduler_cls: ClassVar[type | None] = None

    def scheduler_kwargs(self, bundle: ModelBundle) -> dict[str, Any]:
        """Method-specific scheduler settings from the knobs."""
        return {}

    def step_kwargs(self) -> dict[str, Any]:
        return {}

    def make_scheduler(self, bundle: ModelBundle) -> Any:
        sch = bundle.denoiser.schedule
        kw = self.scheduler_kwargs(bundle)
        if isinstance(sch, VPSchedule):
            cls = self.vp_scheduler_cls
            kw = {
                "num_train_timesteps": sch.num_train_timesteps,
                "trained_betas": list(sch.betas),
                "prediction_type": PREDICTION_TYPE[bundle.kind],
                "timestep_spacing": "trailing",
                **kw,
            }
        elif isinstance(sch, FlowSchedule):
            cls = self.flow_scheduler_cls
            kw = {"num_train_timesteps": sch.num_train_timesteps, **kw}
        else:  # pragma: no cover - schedules are a closed set
            raise TypeError(f"unsupported schedule {sch!r}")
        assert cls is not None, f"{self.name} declares {bundle.kind} support without a scheduler"
        return cls(**kw)

    @torch.no_grad()
    def prepare(self, bundle: ModelBundle, steps: int) -> Sampler:
        self.check(bundle)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        denoiser = bundle.denoiser
        step_kw = self.step_kwargs()

        @torch.no_grad()
        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            sched = self.make_scheduler(bundle)  # fresh per call: multistep solvers keep history
            sched.set_timesteps(steps, device=noise.device)
            takes_gen = "generator" in inspect.signature(sched.step).parameters
            x = noise * getattr(sched, "init_noise_sigma", 1.0)
            scale = getattr(sched, "scale_model_input", lambda x, t: x)
            for t in sched.timesteps:
                out = denoiser(scale(x, t), t, cond, guidance)
                kw = dict(step_kw)
                if takes_gen:
                    kw["generator"] = generators
                x = sched.step(out, t, x, **kw, return_dict=False)[0]
            return x

        return sampler
