"""Registered metrics. Each takes a :class:`MetricContext` and returns a :class:`MetricValue`
(a value with a bootstrap confidence interval). Importing this package registers them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.registry import METRICS

if TYPE_CHECKING:
    from bench.models import ModelBundle


@dataclass(frozen=True)
class MetricValue:
    value: float
    ci_low: float
    ci_high: float


@dataclass
class MetricContext:
    """What a metric may consume: the samples, their labels and seeds, the model, the start
    states the sampler really began from, and a seeded generator for bootstrap resampling."""

    samples: torch.Tensor
    labels: torch.Tensor | None
    bundle: ModelBundle
    start_x: torch.Tensor | None = None
    start_t: float | None = None
    bootstrap: int = 50
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def resample_indices(self, n: int) -> list[np.ndarray]:
        """``bootstrap`` index sets drawn with replacement from range(n)."""
        return [self.rng.integers(0, n, n) for _ in range(self.bootstrap)]


def percentile_ci(stat: Callable[[np.ndarray], float], n: int, ctx: MetricContext, alpha: float = 0.05) -> MetricValue:
    """Statistic on all samples, with a bootstrap CI over ``ctx.bootstrap`` resampled index sets.

    The bootstrap distribution is centred on the point estimate (its median moved onto the
    value) before taking the alpha/2 quantiles: set-level distances (FID, KID, SWD) are biased
    upward on resamples with repeated points, and an interval that misses its own estimate
    would say nothing. For sample means the shift is negligible and this is the percentile CI.
    """
    value = float(stat(np.arange(n)))
    boots = np.array([float(stat(idx)) for idx in ctx.resample_indices(n)])
    if len(boots) == 0:
        return MetricValue(value, float("nan"), float("nan"))
    lo, hi = np.quantile(boots - np.median(boots) + value, [alpha / 2, 1 - alpha / 2])
    return MetricValue(value, float(lo), float(hi))


def register_metric(name: str, *, higher_is_better: bool, data: str, consumes: tuple[str, ...], weights: str, description: str):
    return METRICS.register(
        name, higher_is_better=higher_is_better, data=data, consumes=list(consumes), weights=weights, description=description
    )


from bench.metrics import digits, oracle  # noqa: E402,F401  (registration)
