"""scikit-learn's bundled digits, upsampled to 16x16 in [-1, 1], with fixed splits."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
HELD_OUT = 500  # images kept out of every training set: the real-vs-real reference
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return x[perm], y[perm]


def digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N,1,16,16) in [-1,1] and labels for ``split`` in {"train", "heldout", "all"}."""
    x, y = _all_digits()
    if split == "train":
        return x[HELD_OUT:], y[HELD_OUT:]
    if split == "heldout":
        return x[:HELD_OUT], y[:HELD_OUT]
    if split == "all":
        return x, y
    raise ValueError(f"unknown digits split {split!r}; use 'train', 'heldout' or 'all'")


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1,1] float images (N,C,H,W) -> uint8 (N,H,W,C) for saving and viewing."""
    x = torch.as_tensor(images).float()
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()
