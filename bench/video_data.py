"""``moving-digits``: scikit-learn's bundled 8x8 digits moving and bouncing inside a 16x16 canvas.

Each clip is one digit (its label is the class) placed at a random integer position and moved by
a constant integer velocity ``(vx, vy)`` pixels per frame, each component in {-2, -1, 1, 2}: every
clip moves on both axes (a sprite that starts against a wall moves away from it, so the velocity
is always the one the clip shows). The digit bounces off the canvas edges (its position is reflected, its
velocity component flips), so the motion of every frame is known exactly. Clips are
(F, C, H, W) = (8, 1, 16, 16) in [-1, 1] (background -1), as the image teachers' digits.

The splits follow :mod:`bench.data`: ``train`` clips are made from the 1297 training digits,
``heldout`` clips from the 500 held-out digits (the same images, at their native 8x8), so a
held-out clip never shows a digit the video teacher was trained on. Everything is a function of
a seed (or of a ``torch.Generator``, for the training loop's endless stream of clips).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from bench.data import HELD_OUT, NUM_CLASSES, SPLIT_SEED

FRAMES = 8
CANVAS = 16
SPRITE = 8  # the native size of scikit-learn's digits
SPEEDS = (-2, -1, 1, 2)  # per-axis velocities, pixels per frame
MAX_POS = CANVAS - SPRITE  # top-left corner in [0, MAX_POS]
VIDEO_SHAPE = (FRAMES, 1, CANVAS, CANVAS)

__all__ = [
    "FRAMES",
    "CANVAS",
    "SPEEDS",
    "VIDEO_SHAPE",
    "NUM_CLASSES",
    "MovingDigits",
    "sprites",
    "trajectory",
    "render",
    "sample_clips",
    "moving_digits",
    "velocity_class",
    "to_uint8_frames",
]


@lru_cache(maxsize=1)
def _all_sprites() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits at 8x8 in [0, 1], in :mod:`bench.data`'s split order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return x[perm], y[perm]


def sprites(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 digit sprites (N, 8, 8) in [0, 1] and labels of ``split`` ("train" or "heldout"):
    the same digits, in the same order, as :func:`bench.data.digits`'s split."""
    x, y = _all_sprites()
    if split == "train":
        return x[HELD_OUT:], y[HELD_OUT:]
    if split == "heldout":
        return x[:HELD_OUT], y[:HELD_OUT]
    raise ValueError(f"unknown moving-digits split {split!r}; use 'train' or 'heldout'")


def trajectory(start: torch.Tensor, velocity: torch.Tensor, frames: int = FRAMES) -> torch.Tensor:
    """Top-left positions (N, frames, 2) of sprites starting at ``start`` (N, 2) with integer
    ``velocity`` (N, 2) (x, y), reflected off the walls at 0 and ``MAX_POS``."""
    pos, vel = start.clone().long(), velocity.clone().long()
    out = [pos.clone()]
    for _ in range(frames - 1):
        pos = pos + vel
        low, high = pos < 0, pos > MAX_POS
        pos = torch.where(low, -pos, torch.where(high, 2 * MAX_POS - pos, pos))
        vel = torch.where(low | high, -vel, vel)
        out.append(pos.clone())
    return torch.stack(out, 1)


def render(images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Clips (N, F, 1, H, W) in [-1, 1]: sprite ``images`` (N, 8, 8) in [0, 1] pasted at the
    top-left ``positions`` (N, F, 2) (x, y) of a black canvas."""
    n, f = positions.shape[:2]
    grid = torch.arange(CANVAS)
    rows = grid.view(1, 1, CANVAS) - positions[..., 1:2].long()  # (N, F, H): sprite row under each canvas row
    cols = grid.view(1, 1, CANVAS) - positions[..., 0:1].long()
    inside = ((rows >= 0) & (rows < SPRITE))[..., :, None] & ((cols >= 0) & (cols < SPRITE))[..., None, :]
    r = rows.clamp(0, SPRITE - 1)[..., :, None].expand(n, f, CANVAS, CANVAS)
    c = cols.clamp(0, SPRITE - 1)[..., None, :].expand(n, f, CANVAS, CANVAS)
    i = torch.arange(n).view(n, 1, 1, 1).expand(n, f, CANVAS, CANVAS)
    clips = torch.where(inside, images[i, r, c], torch.zeros(()))
    return (clips * 2 - 1)[:, :, None]


@dataclass
class MovingDigits:
    """A batch of clips: ``clips`` (N, F, 1, H, W) in [-1, 1], ``labels`` (N,) the digit,
    ``velocities`` (N, 2) the initial (vx, vy) in pixels per frame, ``positions`` (N, F, 2)
    the sprite's top-left (x, y) in every frame (the exact motion, bounces included)."""

    clips: torch.Tensor
    labels: torch.Tensor
    velocities: torch.Tensor
    positions: torch.Tensor

    def __len__(self) -> int:
        return len(self.clips)


def sample_clips(n: int, split: str, g: torch.Generator) -> MovingDigits:
    """``n`` random clips of ``split``'s digits, every choice (digit, start, velocity) drawn from
    ``g``."""
    if n < 1:
        raise ValueError(f"moving-digits needs n >= 1 clips, got {n}")
    images, labels = sprites(split)
    idx = torch.randint(0, len(images), (n,), generator=g)
    start = torch.randint(0, MAX_POS + 1, (n, 2), generator=g)
    speeds = torch.tensor(SPEEDS)
    velocity = speeds[torch.randint(0, len(SPEEDS), (n, 2), generator=g)]
    # a sprite starting against a wall moves away from it: +v and -v would draw the same clip, and
    # the velocity a clip is labelled with must be the one it shows
    velocity = torch.where(start == 0, velocity.abs(), torch.where(start == MAX_POS, -velocity.abs(), velocity))
    positions = trajectory(start, velocity)
    return MovingDigits(render(images[idx], positions), labels[idx], velocity, positions)


def velocity_class(velocities: torch.Tensor) -> torch.Tensor:
    """The class (0..15) of initial velocities (N, 2): the index of vx in SPEEDS times 4 plus that of vy."""
    lookup = {v: i for i, v in enumerate(SPEEDS)}
    idx = torch.tensor([[lookup[int(c)] for c in row] for row in velocities.tolist()], dtype=torch.long)
    return idx[:, 0] * len(SPEEDS) + idx[:, 1]


def moving_digits(split: str, n: int = 500, seed: int = 0) -> MovingDigits:
    """A fixed set of ``n`` clips of ``split`` ("train" or "heldout"), a function of ``seed``."""
    return sample_clips(n, split, torch.Generator().manual_seed(int(seed)))


def to_uint8_frames(clips: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] clips (N, F, C, H, W) -> uint8 (N, F, H, W, C) for saving and viewing."""
    x = torch.as_tensor(clips).float()
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).numpy()
