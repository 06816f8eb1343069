"""Consistency training (Song et al. 2023, arXiv 2303.01469, Algorithm 3): a consistency model
trained from data alone, from scratch, the teacher's ODE step replaced by the shared-noise estimate.

One training example (Algorithm 3, in the frame of :mod:`methods.consistency.cm_common`), at
optimiser step k of K:

- the curriculum (Appendix C): N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 levels of
  the Karras discretisation (rho = 7) and the target's EMA rate mu(k) = exp(s0 log(mu0) / N(k));
- x ~ data, n ~ U{1, ..., N(k) - 1}, z ~ N(0, I), and the pair sharing that noise:
  x_{t_{n+1}} = x + sigma_{n+1} z and x_{t_n} = x + sigma_n z;
- the loss d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x_{t_n}, t_n)) (lambda = 1), then
  theta- <- stopgrad(mu(k) theta- + (1 - mu(k)) theta).

The network has the teacher's architecture with fresh weights (training class ``full``; its F is the
network's raw output, EDM-preconditioned by the skip parametrisation); the teacher is not run. On
``gmm`` the network is an MLP. Sampling: the paper's multistep Algorithm 1 (NFE = steps). A CT
model is trained on the class-conditional data without label dropout: it runs at guidance 1 only.

Departures: d is the squared L2 averaged over the entries (LPIPS is unavailable offline); the shared
loop's AdamW with warm-up and cosine decay and an EMA of the weights for sampling; eps and sigma_max
are the teacher schedule's (VP 0.01 .. 157, flow 0.001 .. 999); budgets of hundreds of steps where
the paper trains 800k iterations, so s1 is lowered with it (knob ``s1``; the paper: s0 = 2,
s1 = 150, mu0 = 0.9 on CIFAR-10).
"""

from __future__ import annotations

import copy
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
    ema_update,
    gaussian_like,
    karras_levels,
    noise_range,
    perturb,
    squared_l2,
    time_of,
)


def ct_levels(k: int, total: int, s0: int, s1: int) -> int:
    """N(k) of Song et al. 2023 (Appendix C, CT's adaptive schedule)."""
    return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_mu(n_levels: int, s0: int, mu0: float) -> float:
    """mu(k) = exp(s0 log(mu0) / N(k)) (Appendix C)."""
    return math.exp(s0 * math.log(mu0) / n_levels)


def shared_noise_pair(
    schedule: Any, x0: torch.Tensor, z: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + sigma_{n+1} z, x + sigma_n z) with the same z (natively, each times its alpha)."""
    return perturb(schedule, x0, t_hi, z), perturb(schedule, x0, t_lo, z)


def ct_loss(
    den: Denoiser, net: ConsistencyNet, data: Data, total: int, s0: int, s1: int, mu0: float, batch_size: int
) -> tuple[LossFn, dict[str, Any]]:
    """Algorithm 3's loss for the shared loop and its state (the target network, the step count)."""
    sch = den.schedule
    eps, smax = noise_range(sch)
    target = copy.deepcopy(net).requires_grad_(False)
    count = torch.zeros((), dtype=torch.int64)

    def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        k = int(count)
        if k > 0:  # the update after step k - 1, at that step's rate
            ema_update(target, net, ct_mu(ct_levels(k - 1, total, s0, s1), s0, mu0))
        count.add_(1)
        n_levels = ct_levels(k, total, s0, s1)
        times = time_of(sch, karras_levels(eps, smax, n_levels))
        x0, cond = data(batch_size, g)
        n = torch.randint(0, n_levels - 1, (batch_size,), generator=g)
        z = gaussian_like(x0, g)
        t_hi, t_lo = times[n + 1].to(x0.device), times[n].to(x0.device)
        x_hi, x_lo = shared_noise_pair(sch, x0, z, t_hi, t_lo)
        with torch.no_grad():
            y = target(x_lo, t_lo, cond)
        return squared_l2(net(x_hi, t_hi, cond), y).mean()

    return loss, {"target": target, "count": count}


@register_method
class ConsistencyTraining(ConsistencyAdapter):
    name = "ct"
    training = "full"
    paper = "Song, Dhariwal, Chen & Sutskever 2023, Consistency Models, arXiv 2303.01469 (Algorithm 3)"
    description = (
        "consistency training from data, from scratch: shared-noise pairs on an N(k) curriculum, EMA target mu(k); "
        "multistep sampling with re-noising"
    )
    from_teacher = False
    knobs = (
        Knob("s0", int, 2, "initial discretisation steps s0 (the paper: 2)", low=2, high=10_000, trains=True),
        Knob("s1", int, 50, "final discretisation steps s1 (the paper: 150 over 800k iterations)", low=2, high=100_000,
             trains=True),
        Knob("mu0", float, 0.9, "the target's initial EMA rate mu0 (the paper: 0.9)", low=0.0, high=0.99999, trains=True),
        Knob("train_steps", int, 400, "optimiser steps", low=1, high=10_000_000, trains=True),
        *budget_knobs(lr=5e-4),
        SAMPLING_KNOB,
    )  # fmt: skip

    def make_loss(self, bundle, net, data, guidance):
        c = self.config
        return ct_loss(bundle.denoiser, net, data, c["train_steps"], c["s0"], c["s1"], c["mu0"], c["batch_size"])
