"""The one training loop: seeded, EMA, warm-up + cosine learning rate, gradient clipping,
checkpoint/resume, progress. ``bench train`` trains the embedded teachers with it and every
trained method's build trains its student with it; a method brings only its loss.

A loss is ``loss(net, g) -> scalar tensor``: it draws its own batch (data, noise, times) from the
generator ``g``, the loop's only source of randomness, so a run is a function of its seed and a
resumed run continues the same stream. Checkpoints hold the network, its EMA, the optimiser, the
generator's state, the step and the losses so far; they are written through a
:class:`Checkpointer` (a file for the teachers, the artifact's :class:`~bench.artifacts.BuildContext`
for a build, which adds its cost ledger) and read back with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from bench.io import atomic_write

LossFn = Callable[[nn.Module, torch.Generator], torch.Tensor]
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser steps and how they are taken (AdamW)."""

    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    ckpt_every: int = 250
    weight_decay: float = 0.0

    def lr_at(self, i: int) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
        if i < self.warmup:
            return self.lr * (i + 1) / self.warmup
        return self.lr * 0.5 * (1 + math.cos(math.pi * (i - self.warmup) / max(1, self.steps - self.warmup)))


class Checkpointer(Protocol):
    def resume(self) -> dict[str, Any] | None: ...

    def checkpoint(self, state: dict[str, Any], step: int) -> None: ...


@dataclass
class FileCheckpoint:
    """Checkpoints in one file (``bench train``'s), refused when made with another seed."""

    path: Path
    seed: int

    def resume(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        st = torch.load(self.path, weights_only=True)
        if int(st.get("seed", self.seed)) != self.seed:
            raise SystemExit(f"checkpoint {self.path} was made with seed {st['seed']}; delete it or pass --seed {st['seed']}")
        return st

    def checkpoint(self, state: dict[str, Any], step: int) -> None:
        atomic_write(self.path, lambda p: torch.save(state, p))


@dataclass
class TrainResult:
    """The trained network (the EMA when ``ema_decay`` > 0), every step's loss, and where it began."""

    model: nn.Module
    net: nn.Module
    losses: list[float]
    steps: int
    resumed_from: int
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-100:]
        return sum(tail) / len(tail) if tail else float("nan")


def tqdm_progress(desc: str, total: int, initial: int, enabled: bool = True) -> Progress:
    """A terminal progress bar (step, mean loss of the last 50 steps, ETA) as a progress callback."""
    bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, disable=not enabled)
    recent: list[float] = []

    def show(step: int, steps: int, loss: float) -> None:
        recent.append(loss)
        del recent[:-50]
        bar.n = step
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
        bar.refresh()
        if step >= steps:
            bar.close()

    return show


def fit(
    net: nn.Module,
    loss_fn: LossFn,
    cfg: TrainConfig,
    seed: int,
    checkpoint: Checkpointer | None = None,
    progress: Progress | None = None,
    extra_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``net`` for ``cfg.steps`` optimiser steps of ``loss_fn`` (resuming from the last
    checkpoint when there is one). ``extra_state``: tensors a loss keeps across steps (a fake-score
    network, say) saved and restored with the checkpoint, in place."""
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    step, prior_wall, losses = 0, 0.0, []
    st = checkpoint.resume() if checkpoint is not None else None
    if st is not None:
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["rng"])
        step, prior_wall, losses = int(st["step"]), float(st["wall"]), st["losses"].tolist()
        for k, v in (extra_state or {}).items():
            if k in st.get("extra", {}):
                v.load_state_dict(st["extra"][k]) if hasattr(v, "load_state_dict") else v.copy_(st["extra"][k])
        print(f"resuming from step {step}", file=sys.stderr)
    resumed_from = step
    net.train()
    t0 = time.perf_counter()
    params = [p for p in net.parameters() if p.requires_grad]
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss = loss_fn(net, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            d = cfg.ema_decay if step >= cfg.warmup else 0.0
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        losses.append(float(loss.detach()))
        step += 1
        if progress is not None:
            progress(step, cfg.steps, losses[-1])
        if checkpoint is not None and (step % cfg.ckpt_every == 0 or step == cfg.steps):
            state = {
                "net": net.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "rng": g.get_state(),
                "step": step,
                "seed": seed,
                "wall": prior_wall + time.perf_counter() - t0,
                "losses": torch.tensor(losses),
                "extra": {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in (extra_state or {}).items()},
            }
            checkpoint.checkpoint(state, step)
    net.eval()
    model = ema if cfg.ema_decay > 0 else net
    return TrainResult(
        model, net, losses, step, resumed_from, prior_wall + time.perf_counter() - t0, {"batch_size": cfg.batch_size}
    )
