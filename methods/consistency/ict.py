"""Improved consistency training (Song & Dhariwal 2023, arXiv 2310.14189): consistency training from
data, from scratch, with the paper's four changes to Algorithm 3 of Song et al. 2023.

One training example at optimiser step k of K (frame and parametrisation of
:mod:`methods.consistency.cm_common`):

- the discretisation curriculum (Section 3.4, Eq. 9): N(k) = min(s0 2^floor(k / K'), s1) + 1 Karras
  levels (rho = 7), K' = floor(K / (log2 floor(s1 / s0) + 1)): N doubles at K' step intervals;
- the lognormal noise schedule (Section 3.5, Eq. 10): n in {1, ..., N - 1} drawn with
  p(n) proportional to erf((log sigma_{n+1} - P_mean) / (sqrt(2) P_std)) - erf((log sigma_n - P_mean) /
  (sqrt(2) P_std)), P_mean = -1.1, P_std = 2.0;
- x ~ data, z ~ N(0, I), the shared-noise pair x + sigma_{n+1} z, x + sigma_n z (as CT);
- no EMA target (Section 3.2): the target is the student itself under stop-gradient, theta- = theta;
- the weighting lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n) (Section 3.3) and the pseudo-Huber
  distance d(x, y) = sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d), d the data dimension
  (Section 3.3, Eq. 8; ``huber_scale`` is the 0.00054).

The network has the teacher's architecture with fresh weights (training class ``full``; F its raw
output); the teacher is not run; on ``gmm`` an MLP. Sampling: multistep Algorithm 1 of Song et al.
2023 (NFE = steps). Trained on the class-conditional data without label dropout: guidance 1 only.

Departures: the shared loop's AdamW with warm-up and cosine decay (the paper: RAdam, fixed rate) and
an EMA of the weights for sampling (the paper: EMA 0.99993); no dropout (the digits networks have
none); eps and sigma_max are the teacher schedule's (VP 0.01 .. 157, flow 0.001 .. 999); budgets of
hundreds of steps where the paper trains 400k iterations, so the default s1 is lower (the paper:
s0 = 10, s1 = 1280).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bench.adapter import Knob, register_method
from bench.denoiser import Denoiser
from methods.consistency.cm_common import (
    SAMPLING_KNOB,
    ConsistencyAdapter,
    ConsistencyNet,
    Data,
    LossFn,
    budget_knobs,
    gaussian_like,
    karras_levels,
    lognormal_weights,
    noise_range,
    pseudo_huber,
    time_of,
)
from methods.consistency.ct import shared_noise_pair


def ict_levels(k: int, total: int, s0: int, s1: int) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)) (Eq. 9)."""
    k_prime = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def huber_c(scale: float, dim: int) -> float:
    """The pseudo-Huber constant c = scale sqrt(d) (the paper: 0.00054 sqrt(d))."""
    return scale * math.sqrt(dim)


def ict_loss(
    den: Denoiser,
    net: ConsistencyNet,
    data: Data,
    total: int,
    s0: int,
    s1: int,
    p_mean: float,
    p_std: float,
    c: float,
    batch_size: int,
) -> tuple[LossFn, dict[str, Any]]:
    """iCT's loss for the shared loop and its state (the step count, which drives the curriculum)."""
    sch = den.schedule
    eps, smax = noise_range(sch)
    count = torch.zeros((), dtype=torch.int64)

    def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        n_levels = ict_levels(int(count), total, s0, s1)
        count.add_(1)
        levels = karras_levels(eps, smax, n_levels)
        times = time_of(sch, levels)
        x0, cond = data(batch_size, g)
        n = torch.multinomial(lognormal_weights(levels, p_mean, p_std), batch_size, replacement=True, generator=g)
        z = gaussian_like(x0, g)
        t_hi, t_lo = times[n + 1].to(x0.device), times[n].to(x0.device)
        x_hi, x_lo = shared_noise_pair(sch, x0, z, t_hi, t_lo)
        with torch.no_grad():  # theta- = stopgrad(theta)
            y = net(x_lo, t_lo, cond)
        weight = (1.0 / (levels[n + 1] - levels[n])).to(x0.device, x0.dtype)
        return (weight * pseudo_huber(net(x_hi, t_hi, cond), y, c)).mean()

    return loss, {"count": count}


@register_method
class ImprovedConsistencyTraining(ConsistencyAdapter):
    name = "ict"
    training = "full"
    paper = "Song & Dhariwal 2023, Improved Techniques for Training Consistency Models, arXiv 2310.14189"
    description = (
        "improved consistency training from scratch: pseudo-Huber loss, lognormal levels, doubling N curriculum, "
        "1/(sigma_{n+1} - sigma_n) weighting, no EMA target; multistep sampling with re-noising"
    )
    from_teacher = False
    knobs = (
        Knob("s0", int, 10, "initial discretisation steps s0 (the paper: 10)", low=1, high=100_000, trains=True),
        Knob("s1", int, 160, "final discretisation steps s1 (the paper: 1280 over 400k iterations)", low=1, high=100_000,
             trains=True),
        Knob("p_mean", float, -1.1, "mean of log sigma in the lognormal level schedule", low=-10.0, high=10.0, trains=True),
        Knob("p_std", float, 2.0, "std of log sigma in the lognormal level schedule", low=0.01, high=10.0, trains=True),
        Knob("huber_scale", float, 0.00054, "pseudo-Huber c = huber_scale sqrt(d)", low=0.0, high=10.0, trains=True),
        Knob("train_steps", int, 400, "optimiser steps", low=1, high=10_000_000, trains=True),
        *budget_knobs(lr=5e-4),
        SAMPLING_KNOB,
    )  # fmt: skip

    def make_loss(self, bundle, net, data, guidance):
        c = self.config
        cst = huber_c(c["huber_scale"], math.prod(bundle.sample_shape))
        return ict_loss(bundle.denoiser, net, data, c["train_steps"], c["s0"], c["s1"], c["p_mean"], c["p_std"], cst,
                        c["batch_size"])  # fmt: skip
