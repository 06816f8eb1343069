"""The denoiser: one schedule-aware interface over eps / x0 / v / flow-velocity networks.

Every model reaches a method as a :class:`Denoiser`. A method asks for the raw prediction at
the model's native timestep (what diffusers schedulers step with), with classifier-free
guidance in one batched cond+uncond pass, and converts between parametrisations through the
schedule. Notation: ``x_t = alpha_t * x0 + sigma_t * eps``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

Prediction = Literal["eps", "x0", "v", "flow"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "flow")


def ddpm_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The linear beta schedule of Ho et al. 2020 (diffusers' ``beta_schedule="linear"``)."""
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


@dataclass(frozen=True)
class VPSchedule:
    """Discrete variance-preserving (DDPM) schedule; native time t in [-1, T-1] (float allowed).

    Between integer steps sigma/alpha is interpolated linearly in t, as diffusers'
    EulerDiscreteScheduler does, so a fractional timestep means the same noise level to the
    model and to the scheduler. t = -1 is clean data (alpha_cumprod = 1, DDIM's final step), so
    t in [-1, 0] reaches sigma = 0 continuously (solver grids that refine down to sigma = 0).
    """

    betas: tuple[float, ...]
    kind: str = "vp"

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000) -> VPSchedule:
        return cls(tuple(ddpm_betas(num_train_timesteps).tolist()))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - np.asarray(self.betas, dtype=np.float64))

    @functools.cached_property
    def _sigma_ve(self) -> torch.Tensor:
        """sigma/alpha at t = -1, 0, ..., T-1 (index 0 is t = -1), computed once."""
        ab = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)
        return torch.cat([ab.new_zeros(1), ((1 - ab) / ab).sqrt()])

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma_ve = self._sigma_ve.to(t.device)
        T = len(self.betas)
        tt = t.to(torch.float64).clamp(-1, T - 1) + 1
        lo = tt.floor().long()
        hi = (lo + 1).clamp(max=T)
        frac = tt - lo
        s = sigma_ve[lo] * (1 - frac) + sigma_ve[hi] * frac
        alpha = 1 / (1 + s**2).sqrt()
        return alpha, s * alpha


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: x_s = (1 - s) x0 + s eps, s in [0, 1]; native time t = 1000 s (diffusers)."""

    num_train_timesteps: int = 1000
    kind: str = "flow"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = t.to(torch.float64) / self.num_train_timesteps
        return 1 - s, s


Schedule = VPSchedule | FlowSchedule


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser:
    """A network plus its schedule and parametrisation, with classifier-free guidance.

    ``net(x, t, cond)`` returns the raw prediction; ``cond`` is a LongTensor of class labels
    (or None for an unconditional model) and ``null_class`` the label trained as "no class".
    Guidance follows Ho & Salimans: ``u + w (c - u)``; ``w == 1`` (or no cond) is one plain pass.
    The harness counts network forwards on ``self.net``; a guided evaluation is one forward of
    a doubled batch. A guidance-distilled network (``guidance_embedded``) instead takes the scale
    as a fourth input, ``net(x, t, cond, guidance)``, in one plain pass.

    A flow-map network (``second_time``: consistency-trajectory models, MeanFlow, shortcut
    models, students that jump) also takes the time it jumps to, ``net(x, t, cond, s=s)``; its
    prediction at (x, t, s) is read in the network's parametrisation, and :meth:`jump` moves x from
    t to s with it (a DDIM step: exact when the prediction is the average over [s, t]).
    """

    def __init__(
        self,
        net: nn.Module,
        prediction: Prediction,
        schedule: Schedule,
        null_class: int | None = None,
        guidance_embedded: bool = False,
        second_time: bool = False,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if prediction == "flow" and not isinstance(schedule, FlowSchedule):
            raise ValueError("a flow-velocity network needs a FlowSchedule")
        self.net = net
        self.prediction = prediction
        self.schedule = schedule
        self.null_class = null_class
        self.guidance_embedded = guidance_embedded
        self.second_time = second_time

    @property
    def kind(self) -> str:
        """What the network predicts: 'eps', 'x0', 'v' or 'flow'."""
        return self.prediction

    @property
    def t_data(self) -> float:
        """The native time of clean data (sigma = 0): -1 on a VP schedule, 0 on a flow."""
        return -1.0 if isinstance(self.schedule, VPSchedule) else 0.0

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        cond: torch.Tensor | None = None,
        guidance: float = 1.0,
        s: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        extra: dict[str, torch.Tensor] = {}
        if s is not None or self.second_time:
            if s is None or not self.second_time:
                raise ValueError("a second time s is given to, and only to, a flow-map network (second_time=True)")
            s = torch.as_tensor(s, device=x.device)
            extra["s"] = s.expand(x.shape[0]) if s.ndim == 0 else s
        if self.guidance_embedded:  # a guidance-distilled network (FLUX.1-dev) takes the scale as an input
            return self.net(x, t, cond, guidance, **extra)
        if cond is None or guidance == 1.0 or self.null_class is None:
            return self.net(x, t, cond, **extra)
        null = torch.full_like(cond, self.null_class)
        doubled = {k: torch.cat([v, v]) for k, v in extra.items()}
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]), **doubled)
        c, u = out.chunk(2)
        return u + guidance * (c - u)

    def jump(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        s: torch.Tensor | float,
        cond: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """x moved from time t to time s by the network's prediction at t (and s, for a flow-map
        network): x_s = alpha_s x0 + sigma_s eps with (x0, eps) read from the prediction (to the
        data end, s = ``t_data``, it is x0)."""
        pred = self(x, t, cond, guidance, s=s if self.second_time else None)
        x0, eps = self.x0_eps(x, t, pred)
        a, sg = self.alpha_sigma(s, x)
        return a * x0 + sg * eps

    def rows_per_sample(self, guidance: float, conditional: bool) -> int:
        """Network rows one evaluation spends per sample: 2 for a classifier-free-guided call (the
        cond and uncond halves of one batch), else 1 (no guidance, or guidance embedded)."""
        return 2 if conditional and guidance != 1.0 and not self.guidance_embedded and self.null_class is not None else 1

    def alpha_sigma(self, t: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        a, s = self.schedule.alpha_sigma(t)
        return _bcast(a, like), _bcast(s, like)

    def x0_eps(self, x: torch.Tensor, t: torch.Tensor | float, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a raw prediction to (x0, eps) at time t."""
        a, s = self.alpha_sigma(t, x)
        if self.prediction == "eps":
            return (x - s * pred) / a, pred
        if self.prediction == "x0":
            return pred, (x - a * pred) / s
        if self.prediction == "v":  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
            return a * x - s * pred, s * x + a * pred
        # flow: v = eps - x0 with alpha = 1 - s, sigma = s
        return x - s * pred, x + a * pred
