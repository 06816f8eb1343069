"""Student networks: an MLP for teachers without weights, and extra scalar inputs for any network.

A distilled or consistency student of a neural teacher starts as a copy of the teacher's network;
the analytic mixture has none, so its students are small MLPs with the teacher's calling
convention ``net(x, t, cond) -> prediction``.

Students often need inputs their teacher never had: the guidance scale w (guidance distillation),
the time s a flow map jumps to (CTM, MeanFlow), a step size d (shortcut models).
:class:`ExtraInputs` adds them to any network with a timestep embedding (diffusers UNets and
transformers, :class:`MLPStudent`): each input is embedded like a timestep (sinusoidal features,
then a two-layer MLP) and added to the network's timestep embedding. The last layer of each
embedding starts at zero, so a fresh student computes exactly what its teacher computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EXTRA_SCALES = {"w": 100.0, "s": 1.0, "d": 1.0}  # w in [0, 10] spread like native times in [0, 1000]


def time_features(t: torch.Tensor, n: int = 16, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of the native time t (as diffusion networks embed timesteps)."""
    half = n // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class MLPStudent(nn.Module):
    """``net(x, t, cond) -> prediction`` on vectors: x projected, plus an embedding of t, through a SiLU MLP."""

    arch = "mlp"

    def __init__(self, dim: int, width: int = 128, depth: int = 3, time_dim: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.time_embed = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(width, width)]
        layers += [nn.SiLU(), nn.Linear(width, dim)]
        self.mlp = nn.Sequential(*layers)
        self.time_dim = time_dim
        self.dim = dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        h = self.inp(x.float()) + self.time_embed(time_features(t, self.time_dim))
        return self.mlp(h).to(x.dtype)


def time_embedding_module(net: nn.Module) -> nn.Module:
    """The module whose output is ``net``'s timestep embedding (where extra inputs are added)."""
    for path in ("unet.time_embedding", "transformer.time_text_embed", "time_embed"):
        mod: object = net
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(
        f"{type(net).__name__} has no timestep embedding (unet.time_embedding, transformer.time_text_embed or "
        "time_embed) to add extra inputs to"
    )


class ExtraInputs(nn.Module):
    """``net(x, t, cond, guidance=None, s=None, d=None)``: ``inner`` with the extra scalar inputs
    ``names`` (``w`` is the guidance scale; ``s`` a second time; ``d`` a step size) embedded and added
    to its timestep embedding (see the module docstring). Inputs not given add nothing."""

    def __init__(self, inner: nn.Module, names: tuple[str, ...], freq_dim: int = 64) -> None:
        super().__init__()
        bad = sorted(set(names) - set(EXTRA_SCALES))
        if bad:
            raise ValueError(f"unknown extra input {bad[0]!r}; use {', '.join(EXTRA_SCALES)}")
        self.inner = inner
        self.names = tuple(names)
        self.freq_dim = freq_dim
        target = time_embedding_module(inner)
        dim = [m.out_features for m in target.modules() if isinstance(m, nn.Linear)][-1]
        self.embeds = nn.ModuleDict()
        for n in self.names:
            last = nn.Linear(dim, dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.embeds[n] = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), last)
        self.arch = getattr(
            inner, "arch", "unet" if hasattr(inner, "unet") else "dit" if hasattr(inner, "transformer") else "other"
        )

    def extra_embedding(self, batch: int, device: torch.device, **values: object) -> torch.Tensor | None:
        out = None
        for n in self.names:
            v = values.get(n)
            if v is None:
                continue
            v = torch.as_tensor(v, dtype=torch.float32, device=device)
            v = v.expand(batch) if v.ndim == 0 else v.reshape(batch)
            e = self.embeds[n](time_features(v * EXTRA_SCALES[n], self.freq_dim))
            out = e if out is None else out + e
        return out

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        guidance: float | torch.Tensor | None = None,
        s: torch.Tensor | None = None,
        d: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = self.extra_embedding(x.shape[0], x.device, w=guidance, s=s, d=d)
        if extra is None:
            return self.inner(x, t, cond)

        def add(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + extra.to(out.dtype)

        handle = time_embedding_module(self.inner).register_forward_hook(add)
        try:
            return self.inner(x, t, cond)
        finally:
            handle.remove()
