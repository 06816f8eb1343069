"""Pareto dominance over objectives with mixed directions, with and without confidence intervals.

Objectives are columns of a (n, k) array; ``higher_is_better[j]`` says which way column j
improves (quality metrics read it from the registry; costs are always lower-is-better).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _orient(values: np.ndarray, higher_is_better: Sequence[bool]) -> np.ndarray:
    """Flip lower-is-better columns so that larger is better everywhere."""
    sign = np.where(np.asarray(higher_is_better, dtype=bool), 1.0, -1.0)
    return np.asarray(values, dtype=float) * sign


def dominates(a: Sequence[float], b: Sequence[float], higher_is_better: Sequence[bool]) -> bool:
    """True if ``a`` is at least as good as ``b`` on every objective and better on one.

    Equal points do not dominate each other (ties stay on the frontier together).
    """
    oa, ob = _orient(np.asarray(a)[None], higher_is_better)[0], _orient(np.asarray(b)[None], higher_is_better)[0]
    return bool(np.all(oa >= ob) and np.any(oa > ob))


def surely_dominates(
    a_low: Sequence[float],
    a_high: Sequence[float],
    b_low: Sequence[float],
    b_high: Sequence[float],
    higher_is_better: Sequence[bool],
) -> bool:
    """Dominance that holds for every value inside the intervals: ``a``'s worst end is at least
    as good as ``b``'s best end on every objective, and strictly better on one.

    Give an objective without an interval as ``low == high == value``.
    """
    hib = np.asarray(higher_is_better, dtype=bool)
    a_low, a_high, b_low, b_high = (np.asarray(v, dtype=float) for v in (a_low, a_high, b_low, b_high))
    a_worst = np.where(hib, a_low, -a_high)  # oriented: larger is better
    b_best = np.where(hib, b_high, -b_low)
    return bool(np.all(a_worst >= b_best) and np.any(a_worst > b_best))


@dataclass(frozen=True)
class Frontier:
    """``on_front[i]``: point i is not dominated (point estimates).
    ``plausible[i]``: no point surely dominates i once CIs are taken into account, so the
    data cannot rule out that i belongs to the frontier. ``on_front`` implies ``plausible``.
    Rows with a NaN objective are neither."""

    on_front: np.ndarray
    plausible: np.ndarray

    def order(self, cost: np.ndarray) -> np.ndarray:
        """Indices of the frontier points sorted by ``cost`` (for drawing the staircase)."""
        idx = np.flatnonzero(self.on_front)
        return idx[np.argsort(np.asarray(cost, dtype=float)[idx], kind="stable")]


def pareto_front(
    values: np.ndarray,
    higher_is_better: Sequence[bool],
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
) -> Frontier:
    """The non-dominated points of ``values`` (n, k); ``low``/``high`` (n, k) are optional
    interval ends (NaN where an objective has no interval: the value itself is used)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[1] != len(higher_is_better):
        raise ValueError(f"values must be (n, {len(higher_is_better)}), one column per objective; got {v.shape}")
    lo = v.copy() if low is None else np.where(np.isnan(np.asarray(low, dtype=float)), v, np.asarray(low, dtype=float))
    hi = v.copy() if high is None else np.where(np.isnan(np.asarray(high, dtype=float)), v, np.asarray(high, dtype=float))
    valid = ~np.isnan(v).any(1)
    on_front, plausible = valid.copy(), valid.copy()
    for i in np.flatnonzero(valid):
        for j in np.flatnonzero(valid):
            if i == j:
                continue
            if on_front[i] and dominates(v[j], v[i], higher_is_better):
                on_front[i] = False
            if plausible[i] and surely_dominates(lo[j], hi[j], lo[i], hi[i], higher_is_better):
                plausible[i] = False
            if not on_front[i] and not plausible[i]:
                break
    return Frontier(on_front, plausible)
