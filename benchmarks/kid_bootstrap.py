"""KID with its bootstrap CI: clean-fid per resample against the kernel-sum form (not collected by pytest).

    .venv/bin/python benchmarks/kid_bootstrap.py [--samples 300] [--draws 50] [--subsets 20] [--repeats 3]

A digits job's KID CI evaluates KID on the full sample set and on ``--draws`` bootstrap
resamples, each over ``--subsets`` of clean-fid's subsets, against the 1297 training digits'
features. This runs both forms side by side in one process on the same features and the same
resamples, alternating them ``--repeats`` times, and reports the time of each, their ratio
(median over the repeats) and the largest relative difference of the values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.metrics.digits import reference_features  # noqa: E402
from bench.metrics.formulas import KernelToReference, kid_from_features  # noqa: E402


def compare(samples: int = 300, draws: int = 50, subsets: int = 20, repeats: int = 3) -> dict:
    """Both forms on the same features and resamples, alternated ``repeats`` times: times, ratio, largest difference."""
    ref = reference_features("train")
    rng = np.random.default_rng(0)
    gen = ref[rng.choice(len(ref), samples)] + 0.1 * rng.normal(size=(samples, ref.shape[1]))
    idx = [np.arange(samples)] + [rng.integers(0, samples, samples) for _ in range(draws)]
    slow_t, fast_t, worst = [], [], 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        slow = [kid_from_features(gen[i], ref, 7, subsets) for i in idx]
        slow_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        k = KernelToReference(gen, ref, subsets)  # its set-up counted
        fast = [k(i, 7) for i in idx]
        fast_t.append(time.perf_counter() - t)
        worst = max(worst, max(abs(x - y) / abs(x) for x, y in zip(slow, fast, strict=True)))
    ratios = [s / f for s, f in zip(slow_t, fast_t, strict=True)]
    return {"samples": samples, "evaluations": len(idx), "subsets": subsets, "repeats": repeats, "slow_s": slow_t,
            "fast_s": fast_t, "ratios": ratios, "largest_rel_diff": worst}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--subsets", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    r = compare(a.samples, a.draws, a.subsets, a.repeats)
    slow_t, fast_t, ratios = r["slow_s"], r["fast_s"], r["ratios"]
    print(f"{a.samples} samples, {r['evaluations']} KID evaluations of {a.subsets} subsets each, {a.repeats} repeats")
    print(f"clean-fid per resample: median {statistics.median(slow_t):.3f} s")
    print(f"kernel sums:            median {statistics.median(fast_t):.3f} s")
    print(f"ratio: median {statistics.median(ratios):.1f}x [min {min(ratios):.1f}x, max {max(ratios):.1f}x]")
    print(f"largest relative difference of the values: {r['largest_rel_diff']:.1e}")


if __name__ == "__main__":
    main()
