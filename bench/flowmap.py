"""The shared multistep sampler of consistency and flow-map students.

A student that maps a noisy x_t straight to an earlier time (a flow map G(x_t, t, s); a consistency
model, which maps to the data end; a one-step distilled generator) is sampled the same way
whatever trained it: over descending native times t_0 > t_1 > ... > t_N = data, each step jumps
from t_i with the student (:meth:`bench.denoiser.Denoiser.jump`) and, with ``gamma`` > 0, re-noises:

- the jump goes to the time u whose noise level is sigma_bar_u = sqrt(1 - gamma^2) sigma_bar_{i+1}
  (sigma_bar = sigma / alpha, the schedule-free noise level);
- fresh noise then brings x back up to t_{i+1}, in the variance-exploding frame x / alpha:
  x_{i+1} = alpha_{i+1} (x_u / alpha_u + sqrt(sigma_bar_{i+1}^2 - sigma_bar_u^2) z).

``gamma = 0`` is a deterministic flow-map (or one-step) sampler; ``gamma = 1`` is the multistep
sampling of consistency models (Song et al. 2023, Algorithm 1: denoise to the data, re-noise to
the next level); values between are CTM's gamma-sampling (Kim et al. 2023). Noise is drawn from
each sample's own generator, so the samples do not depend on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from bench import schedules as S
from bench.denoiser import Denoiser
from bench.seeds import noise_like


def student_times(denoiser: Denoiser, steps: int, t_start: float) -> list[float]:
    """``steps + 1`` descending native times from ``t_start`` to the data end, uniform in native
    time (the trailing spacing bench's solvers use): the default grid of a multistep student."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t_data = denoiser.t_data
    return [float(t) for t in np.linspace(t_start, t_data, steps + 1)]


@torch.no_grad()
def sample_flow_map(
    denoiser: Denoiser,
    x: torch.Tensor,
    times: Sequence[float],
    cond: torch.Tensor | None,
    guidance: float,
    generators: list[torch.Generator] | None,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Sample a flow-map or consistency student over ``times`` (see the module docstring)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    times = [float(t) for t in times]
    if any(b >= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(f"times must descend, got {times}")
    t_data = denoiser.t_data
    sch = denoiser.schedule
    for t, t_next in zip(times, times[1:], strict=False):
        sb_next = float(S.sigma_bar(sch, t_next))
        sb_u = math.sqrt(1.0 - gamma**2) * sb_next
        if t_next == t_data or gamma == 0.0:
            u = t_next
        else:
            u = t_data if sb_u == 0.0 else float(S.time_of_sigma_bar(sch, sb_u))
        x = denoiser.jump(x, t, u, cond, guidance)
        if u != t_next:  # re-noise from u up to t_next
            a_u = float(S.alpha_sigma(sch, u)[0])
            a_next = float(S.alpha_sigma(sch, t_next)[0])
            x = a_next * (x / a_u + math.sqrt(max(sb_next**2 - sb_u**2, 0.0)) * noise_like(x, generators))
    return x
