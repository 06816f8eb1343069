"""``bench train NAME``: train the embedded digits networks, seeded and resumable.

The loop is the one every trained method uses (:mod:`bench.training`); what is particular to a
teacher is its loss, below. Checkpoints (model, EMA, optimiser, RNG, step) go to
$BENCH_HOME/train/NAME/ckpt.pt every ``ckpt_every`` steps and are loaded with ``weights_only=True``;
the final EMA weights are written to ``bench/assets/NAME.safetensors`` with a JSON record of the
command, seed, steps, wall time and final loss.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.data import NUM_CLASSES, digits
from bench.denoiser import VPSchedule
from bench.io import save_weights, write_json
from bench.models.digits_nets import NULL_CLASS, DigitsClassifier, DigitsDiT, DigitsUNet
from bench.models.video import MovingDigitsClassifier, MovingDigitsDiT
from bench.paths import ASSETS, bench_home
from bench.training import FileCheckpoint, TrainConfig, fit, tqdm_progress
from bench.video_data import moving_digits, sample_clips, velocity_class

LABEL_DROPOUT = 0.1  # labels replaced by the null class, for classifier-free guidance


CONFIGS: dict[str, TrainConfig] = {
    "digits-unet": TrainConfig(steps=3000),
    "digits-dit": TrainConfig(steps=3000),
    "digits-features": TrainConfig(steps=1500, lr=1e-3, ema_decay=0.0),
    # the video teacher sees fresh moving-digits clips (train digits) every step, drawn from the loop's generator
    "moving-digits-dit": TrainConfig(steps=2600, batch_size=32, warmup=200, ckpt_every=100),
    "moving-digits-features": TrainConfig(steps=4000, lr=2e-3, ema_decay=0.0),
}
NETS = {
    "digits-unet": DigitsUNet,
    "digits-dit": DigitsDiT,
    "digits-features": DigitsClassifier,
    "moving-digits-dit": MovingDigitsDiT,
    "moving-digits-features": MovingDigitsClassifier,
}
VIDEO = {
    "moving-digits-dit",
    "moving-digits-features",
}  # trained on bench.video_data's clips (B, F, C, H, W), not on still digits


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
    drop = torch.rand(b, generator=g) < LABEL_DROPOUT
    y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
    eps = torch.randn(x0.shape, generator=g)
    if name == "digits-unet":  # DDPM eps-prediction loss, t uniform over the 1000 steps
        ab = torch.as_tensor(VPSchedule.linear().alphas_cumprod, dtype=torch.float32)
        t = torch.randint(0, len(ab), (b,), generator=g)
        a = ab[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        return F.mse_loss(net(a * x0 + s * eps, t, y), eps)
    # rectified flow: x_s = (1-s) x0 + s eps, target velocity eps - x0; s logit-normal (SD3)
    s = torch.sigmoid(torch.randn(b, generator=g)).view(-1, *[1] * (x0.ndim - 1))
    return F.mse_loss(net((1 - s) * x0 + s * eps, s.flatten() * 1000, y), eps - x0)


def video_classifier_loss(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """Cross-entropy of the digit class plus that of the initial velocity, on lightly noised clips."""
    logits_y, logits_v = net(x + 0.05 * torch.randn(x.shape, generator=g))
    return F.cross_entropy(logits_y, y) + F.cross_entropy(logits_v, v)


@torch.no_grad()
def video_classifier_accuracy(net: torch.nn.Module, n: int = 1000, seed: int = 1) -> dict[str, float]:
    """Held-out (held-out digits) accuracy of the moving-digits classifier's two heads."""
    d = moving_digits("heldout", n, seed)
    net.eval()
    logits_y, logits_v = net(d.clips)
    return {
        "heldout_class_accuracy": float((logits_y.argmax(1) == d.labels).float().mean()),
        "heldout_velocity_accuracy": float((logits_v.argmax(1) == velocity_class(d.velocities)).float().mean()),
    }


@torch.no_grad()
def classifier_accuracy(net: torch.nn.Module, split: str = "heldout") -> float:
    x, y = digits(split)
    net.eval()
    return float((net(x).argmax(1) == y).float().mean())


def train(name: str, steps: int | None = None, seed: int = 0, resume: bool = True, out_dir: Path = ASSETS) -> dict:
    """Train ``name`` with the shared loop (:func:`bench.training.fit`) and write its weights and
    record; returns the record."""
    if name not in NETS:
        raise SystemExit(f"bench train: unknown network {name!r}; choose one of {', '.join(NETS)}")
    cfg = CONFIGS[name]
    steps = steps or cfg.steps
    cfg = dataclasses.replace(cfg, steps=steps)
    torch.manual_seed(seed)
    net = NETS[name]()
    if name in VIDEO:

        def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
            clips = sample_clips(cfg.batch_size, "train", g)
            if name == "moving-digits-features":
                return video_classifier_loss(net, clips.clips, clips.labels, velocity_class(clips.velocities), g)
            return loss_fn(name, net, clips.clips, clips.labels, cfg, g)

    else:
        x_train, y_train = digits("train")

        def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=g)
            return loss_fn(name, net, x_train[idx], y_train[idx], cfg, g)

    ckpt = FileCheckpoint(bench_home() / "train" / name / "ckpt.pt", seed)
    if not resume:
        ckpt.path.unlink(missing_ok=True)
    start = int(torch.load(ckpt.path, weights_only=True)["step"]) if ckpt.path.is_file() else 0
    res = fit(net, loss, cfg, seed, ckpt, tqdm_progress(f"train {name}", steps, start))
    record = {
        "command": f"bench train {name} --steps {steps} --seed {seed}",
        "seed": seed,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "wall_s": round(res.wall_s, 1),
        "final_loss": res.final_loss,
        "params": sum(p.numel() for p in res.model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if name in VIDEO:
        record["data"] = "moving-digits: fresh clips of the train digits every step (bench.video_data.sample_clips)"
    if name == "moving-digits-features":
        record.update(video_classifier_accuracy(res.model))
    if name == "digits-features":
        record["heldout_accuracy"] = classifier_accuracy(res.model)
    save_weights(out_dir / f"{name}.safetensors", res.model.state_dict())
    write_json(out_dir / f"{name}.json", record)
    print(f"wrote {out_dir / (name + '.safetensors')}: {record}", file=sys.stderr)
    return record


__all__ = ["train", "CONFIGS", "NUM_CLASSES"]
