"""What AMED, BOSS and AutoDiffusion share: their training noise (own seeds, disjoint from every
evaluation seed), the guidance they are trained at, a differentiable map from a noise level to the
model's native time, and the count of learned parameters.

Training noise is drawn from ``LEARNED_SEED``: sample k of a training set is seeded
``sample_seed(LEARNED_SEED, k)``. An evaluation job seeded s draws sample j from
``sample_seed(s, j) = s * 1_000_003 + j`` (:mod:`bench.seeds`), with j < 1_000_000 (the schema's
``n_samples`` limit) and training sets below 1_000_003 draws, so the two coincide only if s equals
``LEARNED_SEED`` (for every suite seed below 2**63 / 1_000_003, where the modulus never wraps);
``tests/test_learned_seeds.py`` proves it and that no committed suite uses that seed.
"""

from __future__ import annotations

import torch
from torch import nn

from bench import schedules as S
from bench.bundle import ModelBundle
from bench.denoiser import FlowSchedule, Schedule
from bench.seeds import generators, noise

LEARNED_SEED = 2**31 - 307  # training noise of the learned solvers (GITS: 2**31 - 7, KD pairs: 2**31 - 101)
MAX_TRAIN_DRAWS = 1_000_000  # the most training draws a learned solver may take (keeps the seeds disjoint)


def training_noise(
    bundle: ModelBundle, n: int, start: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training draws ``start .. start + n - 1`` (seeds ``LEARNED_SEED``) and their class labels
    (cycling over the classes; None for an unconditional model)."""
    if start + n > MAX_TRAIN_DRAWS:
        raise ValueError(f"a learned solver draws at most {MAX_TRAIN_DRAWS} training samples, asked {start + n}")
    gens = generators(LEARNED_SEED, range(start, start + n), device)
    z = noise(gens, bundle.sample_shape, bundle.dtype, device)
    cond = (torch.arange(start, start + n) % bundle.num_classes).to(device) if bundle.num_classes else None
    return z, cond


def train_guidance(bundle: ModelBundle, guidance: float | None, method: str) -> float:
    """The guidance scale a learned solver is trained at: the job's on a conditional model, 1 otherwise."""
    if bundle.num_classes is None:
        return 1.0
    if guidance is None:
        raise ValueError(f"{method} is trained at one guidance scale: give the job's guidance")
    return float(guidance)


def n_params(module: nn.Module) -> int:
    """Number of learned (trainable) parameters."""
    return sum(p.numel() for p in module.parameters())


def time_of_sigma_bar_torch(schedule: Schedule, sb: torch.Tensor) -> torch.Tensor:
    """Native time of the noise level sigma_bar = sigma / alpha, differentiable in ``sb`` (the torch
    twin of :func:`bench.schedules.time_of_sigma_bar`: linear interpolation of the VP table, or
    t = T sb / (1 + sb) on a flow)."""
    if isinstance(schedule, FlowSchedule):
        return schedule.num_train_timesteps * sb / (1 + sb)
    t_knots, sb_knots = (torch.as_tensor(v, dtype=torch.float64, device=sb.device) for v in S._vp_table(schedule))
    s = sb.to(torch.float64).clamp(0.0, float(sb_knots[-1]))
    hi = torch.searchsorted(sb_knots, s.detach()).clamp(1, len(sb_knots) - 1)
    lo = hi - 1
    w = (s - sb_knots[lo]) / (sb_knots[hi] - sb_knots[lo])
    return (t_knots[lo] + w * (t_knots[hi] - t_knots[lo])).to(sb.dtype)


def alpha_of_sigma_bar(schedule: Schedule, sb: torch.Tensor | float) -> torch.Tensor | float:
    """alpha at the noise level sigma_bar: 1 / sqrt(1 + sb^2) on VP, 1 / (1 + sb) on a flow."""
    if isinstance(schedule, FlowSchedule):
        return 1.0 / (1.0 + sb)
    return (1.0 + sb * sb) ** -0.5
