"""Easy consistency tuning (Geng et al. 2024, arXiv 2406.14548): consistency training initialised
from the pretrained diffusion model, the gap between the paired noise levels shrinking over training.

One training example at optimiser step k of K (frame and parametrisation of
:mod:`methods.consistency.cm_common`; ECT's own levels are continuous):

- t ~ lognormal(P_mean = -1.1, P_std = 2.0) in sigma_bar (clipped to the schedule's [eps, sigma_max]);
- the mapping function (the paper's continuous-time curriculum, its sigmoid form): in stage
  s = floor(k stages / K), r = t (1 - q^-(s+1) n(t)) with n(t) = 1 + k_n sigmoid(-b t), clamped at 0:
  dt = t - r starts at about t (stage 0 is close to denoising training) and shrinks by q per stage;
- x ~ data, z ~ N(0, I), the shared-noise pair x + t z, x + r z;
- the target f_theta-(x + r z, r) with theta- = stopgrad(theta) (no EMA target); where r falls below
  eps the target is the clean x (the boundary, as the reference code does);
- the loss w(t, r) d(f_theta(x + t z, t), target) with the weighting w = 1 / (t - r) and
  d = the pseudo-Huber distance with ``huber_c`` (0: the L2 norm ||.||, the reference default).

The student is the teacher's network (training class ``finetune``), its output read in the teacher's
parametrisation, so training starts from the teacher's denoiser; the teacher is not run during
training (its cost is its weights). On ``gmm`` (no weights) an MLP from scratch. Sampling: multistep
Algorithm 1 of Song et al. 2023 (NFE = steps). Trained without label dropout: guidance 1 only.

Departures: the skip parametrisation with the boundary at eps throughout (the reference code trains
with EDM's c_skip/c_out and uses the consistency ones at sampling); the shared loop's AdamW with
warm-up and cosine decay (the reference: RAdam at 1e-4) and its EMA for sampling; no dropout;
``stages`` doublings over the short budget (the reference: a stage every 250 ticks of 12.8k images).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.adapter import Knob, register_method
from bench.denoiser import Denoiser
from methods.consistency.cm_common import (
    READ_KNOB,
    SAMPLING_KNOB,
    ConsistencyAdapter,
    ConsistencyNet,
    Data,
    LossFn,
    budget_knobs,
    gaussian_like,
    noise_range,
    pseudo_huber,
    time_of,
)
from methods.consistency.ct import shared_noise_pair


def ect_stage(k: int, total: int, stages: int) -> int:
    """The curriculum stage of optimiser step k of ``total``: ``stages`` equal stages."""
    return min(stages - 1, k * stages // total)


def ect_r(t: torch.Tensor, stage: int, q: float, k: float, b: float) -> torch.Tensor:
    """ECT's mapping r(t) = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clamped at 0."""
    n = 1 + k * torch.sigmoid(-b * t)
    return torch.clamp(t * (1 - n / q ** (stage + 1)), min=0.0)


def ect_loss(
    den: Denoiser,
    net: ConsistencyNet,
    data: Data,
    total: int,
    stages: int,
    q: float,
    k: float,
    b: float,
    p_mean: float,
    p_std: float,
    c: float,
    batch_size: int,
) -> tuple[LossFn, dict[str, Any]]:
    """ECT's loss for the shared loop and its state (the step count, which drives the stages)."""
    sch = den.schedule
    eps, smax = noise_range(sch)
    count = torch.zeros((), dtype=torch.int64)

    def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        stage = ect_stage(int(count), total, stages)
        count.add_(1)
        x0, cond = data(batch_size, g)
        t = torch.exp(p_mean + p_std * torch.randn(batch_size, generator=g, dtype=torch.float64)).clamp(eps, smax)
        r = ect_r(t, stage, q, k, b)
        boundary = r < eps
        r = torch.where(boundary, torch.zeros_like(r), r)
        z = gaussian_like(x0, g)
        tt, tr = time_of(sch, t).to(x0.device), time_of(sch, r.clamp(min=eps)).to(x0.device)
        x_t, x_r = shared_noise_pair(sch, x0, z, tt, tr)
        with torch.no_grad():  # theta- = stopgrad(theta); the clean data below eps
            y = net(x_r, tr, cond)
            mask = boundary.to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
            y = torch.where(mask, x0.to(y.dtype), y)
        weight = (1.0 / (t - r)).to(x0.device, x0.dtype)
        return (weight * pseudo_huber(net(x_t, tt, cond), y, c)).mean()

    return loss, {"count": count}


@register_method
class EasyConsistencyTuning(ConsistencyAdapter):
    name = "ect"
    training = "finetune"
    paper = "Geng, Pokle, Luo, Lin & Kolter 2024, Consistency Models Made Easy, arXiv 2406.14548"
    description = (
        "easy consistency tuning: consistency training from the pretrained teacher, dt = t - r shrinking by q per "
        "stage, 1/(t - r) weighting, no EMA target; multistep sampling with re-noising"
    )
    from_teacher = True
    knobs = (
        Knob("q", float, 2.0, "the gap shrinks by q per stage (the reference: 2)", low=1.0001, high=1e6, trains=True),
        Knob("k", float, 8.0, "n(t) = 1 + k sigmoid(-b t) (the reference: 8)", low=0.0, high=1e3, trains=True),
        Knob("b", float, 1.0, "n(t) = 1 + k sigmoid(-b t) (the reference: 1)", low=0.0, high=1e3, trains=True),
        Knob("stages", int, 4, "curriculum stages over the training budget", low=1, high=64, trains=True),
        Knob("p_mean", float, -1.1, "mean of log t in the lognormal level distribution", low=-10.0, high=10.0, trains=True),
        Knob("p_std", float, 2.0, "std of log t in the lognormal level distribution", low=0.01, high=10.0, trains=True),
        Knob("huber_c", float, 0.0, "pseudo-Huber c (0: the L2 norm)", low=0.0, high=100.0, trains=True),
        Knob("train_steps", int, 400, "optimiser steps", low=1, high=10_000_000, trains=True),
        *budget_knobs(lr=2e-4),
        READ_KNOB,
        SAMPLING_KNOB,
    )  # fmt: skip

    def make_loss(self, bundle, net, data, guidance):
        c = self.config
        return ect_loss(bundle.denoiser, net, data, c["train_steps"], c["stages"], c["q"], c["k"], c["b"], c["p_mean"],
                        c["p_std"], c["huber_c"], c["batch_size"])  # fmt: skip
