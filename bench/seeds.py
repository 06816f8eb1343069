"""Per-sample seeds: sample k of a job has its own generator, so results never depend on batching."""

from __future__ import annotations

import torch

_MIX = 1_000_003  # a prime stride keeps (seed, k) pairs distinct


def sample_seed(seed: int, k: int) -> int:
    """The seed of sample ``k`` of a job seeded ``seed``."""
    return (int(seed) * _MIX + int(k)) % (2**63 - 1)


def generators(seed: int, indices: range | list[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(sample_seed(seed, k)) for k in indices]


def noise(
    gens: list[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """One initial-noise draw per generator, stacked; each generator then continues for the
    sampler's own stochastic steps (as EDM's StackedRandomGenerator)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype, device=device) for g in gens])


def noise_like(x: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One standard-normal draw per sample from that sample's own generator (batch-size invariant):
    the noise a stochastic sampler adds after the initial draw."""
    if generators is None or len(generators) != x.shape[0]:
        raise ValueError("a stochastic sampler needs one torch.Generator per sample (the harness passes them)")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generators])
