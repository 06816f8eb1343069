"""LD3 (Tong et al. 2024, "Learning to Discretize Denoising Diffusion ODEs", arXiv 2405.15506):
the timesteps of a solver learned from a small set of teacher samples with the soft surrogate loss.

The solver is DPM-Solver++(2M) (:func:`methods.learned_solvers.gs.sample_generalized` with no
coefficients) on N + 1 times parametrised as LD3's code does in its ``time`` mode: the steps are the
softmax of xi in R^N, so t_k = t_start - (t_start - t_end) sum_{m<k} softmax(xi)_m, initialised at
the base schedule's gaps (xi = log of the base steps).

The loss (the paper's relaxed objective) lets the student start from a point x' in a small ball
around the teacher's noise instead of the noise itself:

    L_soft(xi) = E_{x_T} min_{x' in B(x_T, r)} d(Psi_xi(x'), Psi_teacher(x_T)),

d the squared error per dimension, r = ``slack`` * D / N^2 (LD3's ``prior_bound``: 0.001 D / N^2 in
units of the standard-normal noise). As in LD3's trainer the min is taken by alternating updates:
each optimiser step moves xi on the batch's loss at the current slack points x', then moves each x'
one gradient step (``slack_lr``, LD3's shift_lr = 12 / N), projects it back onto the ball and keeps
the move only where it lowered that sample's loss (so the surrogate never exceeds the hard loss
d(Psi_xi(x_T), Psi_teacher(x_T)) it relaxes). The teacher pairs are the first ``train_samples``
of the shared pairs artifact (:mod:`methods.learned_solvers.gs`: seeds ``PAIR_SEED``, disjoint from
every evaluation seed); the next ``valid_samples`` are LD3's validation set, on which the best xi
seen (checked ``val_checks`` times) is kept.

Differences from the paper's code, for one training loop across bench (:func:`bench.training.fit`):
Adam with warm-up and cosine decay instead of RMSprop with patience-based decay; a fixed number of
optimiser steps instead of rounds until the learning rate bottoms out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from bench.adapter import Knob, register_method
from bench.artifacts import BuildContext
from bench.students import device_of
from bench.training import TrainConfig, fit
from methods.learned_solvers.gs import COMMON_KNOBS, GeneralizedSolver, LearnedSolverBase, sample_generalized


class LD3Solver(GeneralizedSolver):
    """DPM-Solver++(2M) whose only learned parameters are LD3's step logits ``xi``."""

    def __init__(self, t_base: np.ndarray) -> None:
        super().__init__(t_base, learn_times=False, learn_coeffs=False, learn_shift=False)
        gaps = -np.diff(np.asarray(t_base, dtype=np.float64))
        self.xi = nn.Parameter(torch.log(torch.as_tensor(gaps / gaps.sum())), requires_grad=len(gaps) > 1)
        self.trained = ("xi",) if len(gaps) > 1 else ()

    def times(self) -> torch.Tensor:
        t = self.t_base
        if self.n == 1:
            return t.clone()
        t0, t1 = float(t[0]), float(t[-1])
        frac = torch.cumsum(torch.softmax(self.xi, 0), 0)[:-1]
        return torch.cat([t[:1], t0 - (t0 - t1) * frac, t[-1:]])


def per_sample_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d(out, target) per sample: the squared error per dimension (LD3's L2 distance)."""
    return (out.double() - target.double()).square().flatten(1).mean(1)


def slack_radius(coef: float, dim: int, steps: int) -> float:
    """The radius r of the ball the slack points live in: LD3's prior_bound = coef * D / N^2."""
    return coef * dim / steps**2


def project_ball(x: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """Each sample of ``x`` moved onto the L2 ball of ``radius`` around its ``center`` when outside it."""
    d = (x - center).flatten(1)
    norm = d.norm(dim=1, keepdim=True)
    scale = torch.where(norm > radius, radius / norm.clamp_min(1e-300), torch.ones_like(norm))
    return center + (d * scale).view_as(x)


def slack_update(
    x: torch.Tensor,
    grad: torch.Tensor,
    center: torch.Tensor,
    radius: float,
    lr: float,
    loss_old: torch.Tensor,
    loss_fn: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD3's update of the slack points: a gradient step of size ``lr``, projected onto the ball, kept
    per sample only where ``loss_fn`` (per-sample losses at the moved points) is below ``loss_old``.
    Returns (the new points, the per-sample surrogate losses)."""
    cand = project_ball(x - lr * grad, center, radius)
    loss_new = loss_fn(cand)
    keep = loss_new < loss_old
    shape = (-1,) + (1,) * (x.ndim - 1)
    return torch.where(keep.view(shape), cand, x), torch.where(keep, loss_new, loss_old)


@register_method
class LD3(LearnedSolverBase):
    name = "ld3"
    paper = "Tong et al. 2024, Learning to Discretize Denoising Diffusion ODEs, arXiv 2405.15506"
    description = "learned timesteps of DPM-Solver++(2M) from a few teacher samples with the soft (slack-ball) surrogate loss"
    knobs = (
        *COMMON_KNOBS,
        Knob("train_samples", int, 100, "teacher pairs trained on (the first of the pairs)", low=1, high=1_000_000, trains=True),
        Knob(
            "valid_samples",
            int,
            50,
            "teacher pairs the best timesteps are chosen on (the next ones)",
            low=0,
            high=1_000_000,
            trains=True,
        ),  # fmt: skip
        Knob("train_steps", int, 100, "optimiser steps", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 8, "pairs per optimiser step", low=1, high=65536, trains=True),
        Knob(
            "lr",
            float,
            2e-2,
            "Adam learning rate of the step logits (warm-up, then cosine decay)",
            low=1e-7,
            high=10.0,
            trains=True,
        ),  # fmt: skip
        Knob(
            "slack",
            float,
            1e-3,
            "ball radius coefficient: r = slack * D / N^2 (0: the hard loss)",
            low=0.0,
            high=100.0,
            trains=True,
        ),  # fmt: skip
        Knob("slack_lr", float, 0.0, "step size of the slack points (0: LD3's 12 / N)", low=0.0, high=1e4, trains=True),
        Knob(
            "val_checks", int, 10, "validations over the run (the best timesteps are kept)", low=1, high=10_000, trains=True
        ),  # fmt: skip
    )

    def new_solver(self, t_base: np.ndarray) -> GeneralizedSolver:
        return LD3Solver(t_base)

    def train(
        self, ctx: BuildContext, pairs: dict[str, torch.Tensor], t_base: np.ndarray, guidance: float
    ) -> tuple[GeneralizedSolver, dict[str, Any]]:
        c = self.config
        bundle = ctx.bundle
        dev = device_of(bundle.denoiser.net)
        den = bundle.denoiser
        n_tr = min(c["train_samples"], len(pairs["noise"]))
        n_va = min(c["valid_samples"], len(pairs["noise"]) - n_tr)
        z, target = pairs["noise"].to(dev), pairs["x0"].to(dev)
        labels = pairs["labels"].to(dev) if bundle.num_classes else None
        tr, va = slice(0, n_tr), slice(n_tr, n_tr + n_va)
        steps = len(t_base) - 1
        if steps < 2:
            raise ValueError("ld3 learns the interior timesteps: give it at least 2 steps")
        radius = slack_radius(c["slack"], int(np.prod(bundle.sample_shape)), steps)
        slack_lr = c["slack_lr"] or 12.0 / steps
        solver = self.new_solver(t_base).to(dev)
        slack = z[tr].clone()  # x' of every training sample, starting at its noise
        bs = min(c["batch_size"], n_tr)
        every = max(1, c["train_steps"] // c["val_checks"])

        def labels_of(idx: torch.Tensor | slice) -> torch.Tensor | None:
            return labels[idx] if labels is not None else None

        @torch.no_grad()
        def valid_loss(net: nn.Module) -> float:
            if n_va == 0:
                return float("nan")
            out = sample_generalized(den, z[va], net, labels_of(va), guidance)
            return float(per_sample_error(out, target[va]).mean())

        state: dict[str, Any] = {"pending": None, "calls": 0, "best": None, "best_loss": float("inf")}
        state["init_valid"] = valid_loss(solver)

        def finish_pending(net: nn.Module) -> None:
            """The slack half of the previous step: move, project, keep where better (with the new xi)."""
            if state["pending"] is None:
                return
            idx, xb, ref = state["pending"]
            state["pending"] = None
            if radius <= 0 or xb.grad is None:
                return

            @torch.no_grad()
            def losses(x: torch.Tensor) -> torch.Tensor:
                return per_sample_error(sample_generalized(den, x, net, labels_of(idx), guidance), target[idx])

            new, _ = slack_update(xb.detach(), xb.grad, z[idx], radius, slack_lr, ref, losses)
            slack[idx] = new

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            finish_pending(net)
            if state["calls"] % every == 0 and n_va:
                v = valid_loss(net)
                if v < state["best_loss"]:
                    state["best_loss"], state["best"] = v, net.xi.detach().clone()
            state["calls"] += 1
            idx = torch.randint(0, n_tr, (bs,), generator=g)
            xb = slack[idx].clone().requires_grad_(True)
            per = per_sample_error(sample_generalized(den, xb, net, labels_of(idx), guidance), target[idx])
            state["pending"] = (idx, xb, per.detach())
            return per.mean().to(torch.float64)

        cfg = TrainConfig(c["train_steps"], bs, c["lr"], min(10, c["train_steps"] // 10), 0.0,
                          ckpt_every=max(1, c["train_steps"] // 10))  # fmt: skip
        res = fit(solver, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), extra_state={"slack": slack})
        ctx.note_training(res)
        model = res.model
        final = valid_loss(model)
        if n_va and state["best"] is not None and state["best_loss"] < final:
            with torch.no_grad():
                model.xi.copy_(state["best"])
            final = state["best_loss"]
        moved = (slack - z[tr]).flatten(1).norm(dim=1)
        info = {
            "valid_loss_init": state["init_valid"],
            "valid_loss_final": final,
            "slack_radius": radius,
            "slack_moved_mean": float(moved.mean()),
            "train_samples": n_tr,
            "valid_samples": n_va,
        }
        ctx.note(**info)
        return model.requires_grad_(False), info
