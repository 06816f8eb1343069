"""``bench train NAME``: train the embedded digits networks, seeded and resumable.

Checkpoints (model, EMA, optimiser, RNG, step) go to $BENCH_HOME/train/NAME/ckpt.pt every
``ckpt_every`` steps and are loaded with ``weights_only=True``; the final EMA weights are written
to ``bench/assets/NAME.safetensors`` with a JSON record of the command, seed, steps, wall time
and final loss.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.data import NUM_CLASSES, digits
from bench.denoiser import VPSchedule
from bench.io import atomic_write, save_weights, write_json
from bench.models.digits_nets import NULL_CLASS, DigitsClassifier, DigitsDiT, DigitsUNet
from bench.paths import ASSETS, bench_home


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    ckpt_every: int = 250


CONFIGS: dict[str, TrainConfig] = {
    "digits-unet": TrainConfig(steps=3000),
    "digits-dit": TrainConfig(steps=3000),
    "digits-features": TrainConfig(steps=1500, lr=1e-3, ema_decay=0.0),
}
NETS = {"digits-unet": DigitsUNet, "digits-dit": DigitsDiT, "digits-features": DigitsClassifier}


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (classifier augmentation only)."""
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    return torch.roll(F.pad(x, (2, 2, 2, 2), value=-1), (dy, dx), (2, 3))[..., 2:-2, 2:-2]


def loss_fn(
    name: str, net: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, g: torch.Generator
) -> torch.Tensor:
    b = x0.shape[0]
    if name == "digits-features":
        x = _shift(x0, g) + 0.05 * torch.randn(x0.shape, generator=g)
        return F.cross_entropy(net(x), y)
    drop = torch.rand(b, generator=g) < cfg.label_dropout
    y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
    eps = torch.randn(x0.shape, generator=g)
    if name == "digits-unet":  # DDPM eps-prediction loss, t uniform over the 1000 steps
        ab = torch.as_tensor(VPSchedule.linear().alphas_cumprod, dtype=torch.float32)
        t = torch.randint(0, len(ab), (b,), generator=g)
        a = ab[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        return F.mse_loss(net(a * x0 + s * eps, t, y), eps)
    # rectified flow: x_s = (1-s) x0 + s eps, target velocity eps - x0; s logit-normal (SD3)
    s = torch.sigmoid(torch.randn(b, generator=g)).view(-1, 1, 1, 1)
    return F.mse_loss(net((1 - s) * x0 + s * eps, s.flatten() * 1000, y), eps - x0)


@torch.no_grad()
def classifier_accuracy(net: torch.nn.Module, split: str = "heldout") -> float:
    x, y = digits(split)
    net.eval()
    return float((net(x).argmax(1) == y).float().mean())


def train(name: str, steps: int | None = None, seed: int = 0, resume: bool = True, out_dir: Path = ASSETS) -> dict:
    """Train ``name`` and write its weights and record; returns the record."""
    if name not in NETS:
        raise SystemExit(f"bench train: unknown network {name!r}; choose one of {', '.join(NETS)}")
    cfg = CONFIGS[name]
    steps = steps or cfg.steps
    torch.manual_seed(seed)
    net = NETS[name]()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = digits("train")
    ckpt = bench_home() / "train" / name / "ckpt.pt"
    step, wall, losses = 0, 0.0, []
    if resume and ckpt.is_file():
        st = torch.load(ckpt, weights_only=True)
        if st["seed"] != seed:
            raise SystemExit(f"checkpoint {ckpt} was made with seed {st['seed']}; delete it or pass --seed {st['seed']}")
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["rng"])
        step, wall, losses = int(st["step"]), float(st["wall"]), st["losses"].tolist()
        print(f"resuming {name} from step {step} ({ckpt})", file=sys.stderr)

    def lr_at(i: int) -> float:  # linear warm-up, cosine decay
        if i < cfg.warmup:
            return cfg.lr * (i + 1) / cfg.warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (i - cfg.warmup) / max(1, steps - cfg.warmup)))

    net.train()
    bar = tqdm(total=steps, initial=step, desc=f"train {name}", unit="step", file=sys.stderr)
    t0 = time.perf_counter()
    while step < steps:
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(name, net, x_train[idx], y_train[idx], cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = cfg.ema_decay if step >= cfg.warmup else 0.0
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        losses.append(float(loss))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % cfg.ckpt_every == 0 or step == steps:
            state = {
                "net": net.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "rng": g.get_state(),
                "step": step,
                "seed": seed,
                "wall": wall + time.perf_counter() - t0,
                "losses": torch.tensor(losses),
            }
            atomic_write(ckpt, lambda p, s=state: torch.save(s, p))
    bar.close()
    wall += time.perf_counter() - t0
    final = ema if cfg.ema_decay > 0 else net
    record = {
        "command": f"bench train {name} --steps {steps} --seed {seed}",
        "seed": seed,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "wall_s": round(wall, 1),
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "params": sum(p.numel() for p in final.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if name == "digits-features":
        record["heldout_accuracy"] = classifier_accuracy(final)
    save_weights(out_dir / f"{name}.safetensors", final.state_dict())
    write_json(out_dir / f"{name}.json", record)
    print(f"wrote {out_dir / (name + '.safetensors')}: {record}", file=sys.stderr)
    return record


__all__ = ["train", "CONFIGS", "NUM_CLASSES"]
