"""Student networks for teachers that have no weights to start from (the analytic ``gmm``).

A distilled or consistency student of a neural teacher starts as a copy of the teacher's network;
the analytic mixture has none, so its students are small MLPs with the teacher's calling
convention ``net(x, t, cond) -> prediction``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def time_features(t: torch.Tensor, n: int = 16, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of the native time t (as diffusion networks embed timesteps)."""
    half = n // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class MLPStudent(nn.Module):
    """``net(x, t, cond) -> prediction`` on vectors: x and sinusoidal time features through a SiLU MLP."""

    arch = "mlp"

    def __init__(self, dim: int, width: int = 128, depth: int = 3, time_dim: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        layers.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*layers)
        self.time_dim = time_dim
        self.dim = dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.cat([x.float(), time_features(t.expand(x.shape[0]) if t.ndim == 0 else t, self.time_dim)], dim=1)
        return self.mlp(h).to(x.dtype)
