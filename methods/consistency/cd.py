"""Consistency distillation (Song et al. 2023, arXiv 2303.01469, Algorithm 2): a consistency student,
initialised from the teacher, made self-consistent along the teacher's probability-flow ODE.

One training example (Algorithm 2, in the frame of :mod:`methods.consistency.cm_common`):

- x ~ data (the training digits with their labels; mixture samples on ``gmm``), n ~ U{1, ..., N-1}
  on the N-level Karras discretisation eps = sigma_1 < ... < sigma_N = sigma_max (rho = 7),
  z ~ N(0, I), x_{t_{n+1}} = x + sigma_{n+1} z (natively alpha (x + sigma_bar z));
- the teacher's one-step ODE solver from t_{n+1} to t_n (``teacher_solver``: Heun, the paper's
  choice, or Euler = DDIM), at the job's classifier-free guidance scale w:
  x_hat_{t_n} = Phi(x_{t_{n+1}}, t_{n+1} -> t_n);
- the loss lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x_hat_{t_n}, t_n)) with lambda = 1;
- after the optimiser step, the target network theta- <- stopgrad(mu theta- + (1 - mu) theta).

f is the skip parametrisation f = c_skip y + c_out F with c_skip(eps) = 1, c_out(eps) = 0, F read
from the teacher's own output so the fresh student is the teacher's denoiser (on ``gmm``, whose
analytic teacher has no weights, an MLP from scratch gives F). Sampling is the paper's multistep
Algorithm 1 (jump to the data, re-noise to the next level): NFE = steps, one row per sample.

Departures: the distance d is the squared L2 averaged over the entries (LPIPS needs ImageNet-trained
VGG weights, not available offline); the shared training loop's AdamW with warm-up and cosine decay
(the paper: RAdam at a fixed rate) and its EMA of the weights for sampling (the paper samples the
target network, itself an EMA); eps and sigma_max are the teacher schedule's least and most noisy
training levels (VP 0.01 .. 157, flow 0.001 .. 999) rather than EDM's 0.002 .. 80; budgets of
hundreds of steps (the paper: 800k iterations at batch 512 on CIFAR-10). The student is distilled at
one guidance scale (the job's, in its artifact; one network row per sample) and refuses another.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from bench.adapter import Knob, register_method
from bench.bundle import ModelBundle
from bench.denoiser import Denoiser
from methods.consistency.cm_common import (
    READ_KNOB,
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
    teacher_step,
    time_of,
)


@torch.no_grad()
def cd_pair(
    teacher: Denoiser,
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    z: torch.Tensor,
    t_hi: torch.Tensor,
    t_lo: torch.Tensor,
    guidance: float,
    solver: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_{t_{n+1}}, x_hat_{t_n}): the data perturbed to t_{n+1}, and the teacher's ODE step from it to t_n."""
    x_hi = perturb(teacher.schedule, x0, t_hi, z)
    return x_hi, teacher_step(teacher, x_hi, t_hi, t_lo, cond, guidance, solver)


def cd_loss(
    teacher: Denoiser,
    net: ConsistencyNet,
    data: Data,
    guidance: float,
    n_levels: int,
    mu: float,
    solver: str,
    batch_size: int,
) -> tuple[LossFn, dict[str, Any]]:
    """Algorithm 2's loss for the shared loop, and its state: the target network theta- (updated
    with rate ``mu`` before every step but the first: after each optimiser step, as in the paper)
    and the count of steps taken."""
    sch = teacher.schedule
    levels = karras_levels(*noise_range(sch), n_levels)
    times = time_of(sch, levels)
    target = copy.deepcopy(net).requires_grad_(False)
    count = torch.zeros((), dtype=torch.int64)

    def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        if int(count) > 0:
            ema_update(target, net, mu)
        count.add_(1)
        x0, cond = data(batch_size, g)
        n = torch.randint(0, n_levels - 1, (batch_size,), generator=g)
        z = gaussian_like(x0, g)
        t_hi, t_lo = times[n + 1].to(x0.device), times[n].to(x0.device)
        x_hi, x_lo = cd_pair(teacher, x0, cond, z, t_hi, t_lo, guidance, solver)
        with torch.no_grad():
            y = target(x_lo, t_lo, cond)
        return squared_l2(net(x_hi, t_hi, cond), y).mean()

    return loss, {"target": target, "count": count}


@register_method
class ConsistencyDistillation(ConsistencyAdapter):
    name = "cd"
    training = "finetune"
    paper = "Song, Dhariwal, Chen & Sutskever 2023, Consistency Models, arXiv 2303.01469 (Algorithm 2)"
    description = (
        "consistency distillation: skip-parametrised student from the teacher, matched to an EMA target at the "
        "teacher's one-step ODE solution; multistep sampling with re-noising"
    )
    from_teacher = True
    distils_guidance = True
    knobs = (
        Knob("teacher_solver", str, "heun", "the teacher's one-step ODE solver Phi (heun: 2 NFE, euler = DDIM: 1)",
             choices=("heun", "euler"), trains=True),
        Knob("levels", int, 18, "N, levels of the Karras discretisation (the paper: 18 on CIFAR-10)", low=2, high=10_000,
             trains=True),
        Knob("mu", float, 0.95, "EMA rate of the target network theta- (the paper: 0.95 with LPIPS on CIFAR-10)",
             low=0.0, high=0.99999, trains=True),
        Knob("train_steps", int, 600, "optimiser steps", low=1, high=10_000_000, trains=True),
        *budget_knobs(lr=2e-4),
        READ_KNOB,
        SAMPLING_KNOB,
    )  # fmt: skip

    def teacher_rows_per_step(self, bundle: ModelBundle, guidance: float) -> int:
        per = 2 if self.config["teacher_solver"] == "heun" else 1
        return self.config["batch_size"] * per * (2 if guidance != 1.0 and bundle.num_classes else 1)

    def make_loss(self, bundle, net, data, guidance):
        c = self.config
        return cd_loss(bundle.denoiser, net, data, guidance, c["levels"], c["mu"], c["teacher_solver"], c["batch_size"])
