"""What every metric is built from: the context a metric consumes (:class:`MetricContext`), the
:class:`Statistic` it is written as, the bootstrap interval of its value (:class:`MetricValue`),
and :func:`register_metric`. The metric modules import these from here, never from the package
:mod:`bench.metrics` (which imports every metric module to register it).
"""

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
    """What a metric may consume: the samples (N,C,H,W in [-1,1] for images), their labels and
    seeds, the model, the start states the sampler really began from, a seeded generator for
    bootstrap resampling, and for some metrics: the prompts the samples were conditioned on, the
    same-seed samples of the suite's baseline configuration, and the name of the reference set."""

    samples: torch.Tensor
    labels: torch.Tensor | None
    bundle: ModelBundle
    start_x: torch.Tensor | None = None
    start_t: float | None = None
    bootstrap: int = 50
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] | None = None
    baseline: torch.Tensor | None = None
    refset: str | None = None
    device: str = "cpu"

    @cached_property
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def resample_indices(self, n: int) -> list[np.ndarray]:
        """``bootstrap`` index sets drawn with replacement from range(n)."""
        return [self.rng.integers(0, n, n) for _ in range(self.bootstrap)]


@dataclass(frozen=True)
class Statistic:
    """A metric as a function of the indices of the samples it is computed on, and the range its
    values can take (a bootstrap interval is clipped to it: a centred interval of a bounded
    statistic must not promise values it cannot have, such as an Inception Score above the
    number of classes)."""

    fn: Callable[[np.ndarray], float]
    n: int
    support: tuple[float, float] = (-np.inf, np.inf)


def centred_interval(value: float, boots: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """alpha/2 quantiles of the bootstrap distribution moved so that its median sits on ``value``.

    Set-level distances (FID, KID, SWD) are biased upward on resamples with repeated points, and an
    interval that misses its own estimate would say nothing. For sample means the shift is
    negligible and this is the percentile interval. A non-finite value (PSNR of identical images)
    gets the interval (value, value).
    """
    if len(boots) == 0:
        return float("nan"), float("nan")
    if not np.isfinite(value):
        return value, value
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(boots - np.median(boots) + value, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def percentile_ci(
    stat: Callable[[np.ndarray], float],
    n: int,
    ctx: MetricContext,
    alpha: float = 0.05,
    support: tuple[float, float] = (-np.inf, np.inf),
) -> MetricValue:
    """Statistic on all samples, with a bootstrap CI over ``ctx.bootstrap`` resampled index sets
    (see :func:`centred_interval`), clipped to the statistic's ``support``."""
    value = float(stat(np.arange(n)))
    boots = np.array([float(stat(idx)) for idx in ctx.resample_indices(n)])
    lo, hi = centred_interval(value, boots, alpha)
    if np.isfinite(value):  # clipped to the support, never past the estimate (round-off can put it outside)
        lo, hi = min(float(np.clip(lo, *support)), value), max(float(np.clip(hi, *support)), value)
    return MetricValue(value, lo, hi)


class MetricFn:
    """A registered metric: ``metric(ctx) -> MetricValue``; ``metric.statistic(ctx)`` is the
    underlying :class:`Statistic` (for paired comparisons)."""

    def __init__(self, name: str, statistic: Callable[[MetricContext], Statistic]) -> None:
        self.name = name
        self.statistic = statistic
        self.__doc__ = statistic.__doc__
        self.__wrapped__ = statistic

    def __call__(self, ctx: MetricContext) -> MetricValue:
        s = self.statistic(ctx)
        return percentile_ci(s.fn, s.n, ctx, support=s.support)

    def __repr__(self) -> str:
        return f"<metric {self.name}>"


def register_metric(
    name: str,
    *,
    higher_is_better: bool,
    data: str,
    consumes: tuple[str, ...],
    weights: str,
    description: str,
    requires: tuple[str, ...] = (),
    needs_baseline: bool = False,
):
    """Register a function ``ctx -> Statistic`` as metric ``name``.

    ``weights`` says in words what network the metric runs; ``requires`` names the entries of
    :mod:`bench.weights` it loads (``bench weights fetch NAME``); ``needs_baseline`` makes the
    runner sample the suite's baseline configuration on the same seeds.
    """

    def deco(statistic: Callable[[MetricContext], Statistic]) -> MetricFn:
        fn = MetricFn(name, statistic)
        METRICS.add(
            name,
            fn,
            higher_is_better=higher_is_better,
            data=data,
            consumes=list(consumes),
            weights=weights,
            requires=list(requires),
            needs_baseline=needs_baseline,
            description=description,
        )
        return fn

    return deco


def images_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1,1] float images (N,C,H,W) -> uint8-valued float (N,3,H,W) in [0,255], as saved to PNG;
    one-channel images are repeated to RGB."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
