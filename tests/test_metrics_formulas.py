"""The metric formulas against values worked out by hand or in closed form (acceptance 1)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import linalg

from bench.metrics import MetricContext, centred_interval
from bench.metrics.formulas import (
    FrechetToReference,
    KernelToReference,
    clip_score_from_embeddings,
    cmmd_from_embeddings,
    fid_from_features,
    inception_score,
    kid_from_features,
    knn_radii,
    pickscore_from_embeddings,
    precision_recall,
    psnr,
)
from bench.metrics.mmhm import Bounds, harmonic_mean, mmhm, normalise
from bench.metrics.paired import paired_difference


def closed_form_fid(m1, s1, m2, s2) -> float:
    root = linalg.sqrtm(linalg.sqrtm(s1) @ s2 @ linalg.sqrtm(s1)).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 6))
    assert abs(fid_from_features(x, x)) < 1e-8


def test_fid_of_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng(1)
    m1, m2 = np.zeros(3), np.array([1.0, -0.5, 0.25])
    s1 = np.diag([1.0, 2.0, 0.5])
    a = rng.normal(size=(3, 3))
    s2 = a @ a.T + 0.5 * np.eye(3)
    exact = closed_form_fid(m1, s1, m2, s2)
    n = 40_000
    x = rng.multivariate_normal(m1, s1, n)
    y = rng.multivariate_normal(m2, s2, n)
    est = fid_from_features(x, y)
    # sampling error of the plug-in estimate at n = 40k is ~1% here; a wrong formula (no sqrt, or
    # the trace without the cross term) is off by far more
    assert est == pytest.approx(exact, rel=0.03), (est, exact)
    wrong = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * (s1 @ s2)))
    assert abs(wrong - exact) > 0.2 * exact


def test_fid_to_reference_equals_clean_fids_formula():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))
    gen = rng.normal(size=(150, 20)) * 1.3 + 0.2
    fast = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
    assert fast(gen) == pytest.approx(fid_from_features(gen, ref), rel=1e-8)
    assert abs(fast(ref)) < 1e-7
    few = gen[:10]  # fewer samples than dimensions: a singular covariance
    assert fast(few) == pytest.approx(fid_from_features(few, ref), rel=1e-4)


def test_kid_is_unbiased_on_equal_distributions():
    rng = np.random.default_rng(2)
    kids = [kid_from_features(rng.normal(size=(100, 4)), rng.normal(size=(100, 4)), seed=i, num_subsets=5) for i in range(40)]
    mean, se = np.mean(kids), np.std(kids, ddof=1) / math.sqrt(len(kids))
    assert abs(mean) < 3 * se, (mean, se)
    assert min(kids) < 0 < max(kids)  # an unbiased estimate of 0 goes both ways
    # and it does see a real difference
    assert kid_from_features(rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 1.0, num_subsets=5) > 10 * se


def test_kid_to_a_reference_equals_clean_fid_on_every_resample():
    """The kernel-sum form gives clean-fid's number (same subset draws) on bootstrap resamples with
    repeated rows, on the full set, where clean-fid subsamples the generated set (more samples
    than reference rows: its own path), and where the matrices would be too large (its own path)."""
    rng = np.random.default_rng(3)
    ref, gen = rng.normal(size=(130, 6)), rng.normal(size=(50, 6)) + 0.3
    k = KernelToReference(gen, ref, num_subsets=7)
    for i, idx in enumerate([np.arange(50), rng.integers(0, 50, 50), rng.integers(0, 50, 50), np.zeros(50, int) + 4]):
        assert k(idx, seed=i) == pytest.approx(kid_from_features(gen[idx], ref, i, 7), rel=1e-9, abs=1e-15)
    assert k(np.arange(50), seed=1) != k(np.arange(50), seed=2)  # the seed picks the reference subsets
    big = rng.normal(size=(200, 6))  # more samples than reference rows
    assert KernelToReference(big, ref, 7)(np.arange(200), 5) == kid_from_features(big, ref, 5, 7)
    small = KernelToReference(gen, ref, 7, max_points=100)  # over the size limit: no matrices kept
    assert not small.fast and small(np.arange(50), 1) == kid_from_features(gen, ref, 1, 7)


def test_knn_radii_excludes_the_point_itself():
    x = np.array([[0.0], [1.0], [3.0], [6.0]])
    # neighbours of 0: 1 (d=1), 3 (d=3), 6 (d=6) -> k=2 radius 3
    np.testing.assert_allclose(knn_radii(x, k=2), [3.0, 2.0, 3.0, 5.0])


def test_precision_recall_are_one_on_identical_sets_and_fall_as_sets_separate():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(400, 8))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    gen = rng.normal(size=(400, 8))
    shifts = [0.0, 1.0, 2.0, 4.0, 8.0]
    pr = np.array([precision_recall(real, gen + s * np.eye(8)[0], k=3) for s in shifts])
    assert pr[0].min() > 0.6
    assert (np.diff(pr, axis=0) <= 0.02).all(), pr
    assert pr[-1].max() < 0.05, pr


def test_inception_score_by_hand():
    assert inception_score(np.eye(2)) == pytest.approx(2.0)
    assert inception_score(np.full((5, 4), 0.25)) == pytest.approx(1.0)
    # p(y) = (0.7, 0.3); KL rows 0.116322 and 0.087177 nats; exp(mean) = 1.107106
    assert inception_score(np.array([[0.9, 0.1], [0.5, 0.5]])) == pytest.approx(1.107106, abs=1e-5)


def test_clip_score_and_pickscore_by_hand():
    img = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    txt = np.array([[4.0, 3.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # cos = 24/25, -1, 1/sqrt(2)
    np.testing.assert_allclose(clip_score_from_embeddings(img, txt), [96.0, 0.0, 70.710678], atol=1e-5)
    np.testing.assert_allclose(pickscore_from_embeddings(img, txt, math.log(100.0)), [96.0, -100.0, 70.710678], atol=1e-5)
    np.testing.assert_allclose(pickscore_from_embeddings(img[:1], txt[:1], 0.0), [0.96])


def test_cmmd_by_hand():
    # one point each, |x - y|^2 = 25: 1000 * (1 + 1 - 2 exp(-25 / 200)) = 235.0059
    assert cmmd_from_embeddings(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])) == pytest.approx(235.0059, abs=1e-3)
    x = np.random.default_rng(4).normal(size=(50, 5))
    assert cmmd_from_embeddings(x, x) == pytest.approx(0.0, abs=1e-9)


def test_psnr_by_hand():
    x, y = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    assert psnr(x, y) == pytest.approx(10 * math.log10(16), abs=1e-9)  # MSE 0.25 on a range of 2
    assert psnr(x, x) == math.inf


def test_centred_interval_keeps_infinite_values_and_contains_the_estimate():
    assert centred_interval(math.inf, np.array([math.inf, 3.0])) == (math.inf, math.inf)
    lo, hi = centred_interval(1.0, np.array([2.0, 2.1, 2.2, 1.9, 2.05]))
    assert lo <= 1.0 <= hi


# --- MMHM: the worked example ------------------------------------------------------------------


def example_run() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "config": ["A", "B", "C", "D"],
            "fid_inception": [10.0, 20.0, 15.0, 12.0],
            "is_inception": [30.0, 40.0, 35.0, 38.0],
            "clip_score": [30.0, 32.0, 31.0, 31.5],
            "pickscore": [20.0, 22.0, 21.0, 21.5],
        }
    )


def test_mmhm_reproduces_the_hand_worked_example():
    # bounds: FID [10, 20] (lower is better), IS [30, 40], CLIP [30, 32], PickScore [20, 22]
    # A = (1, 0, 0, 0) -> 0;  B = (0, 1, 1, 1) -> 0;  C = (.5, .5, .5, .5) -> 0.5
    # D = (.8, .8, .75, .75) -> 4 / (5/4 + 5/4 + 4/3 + 4/3) = 24/31
    table, bounds, clipped = mmhm(example_run())
    np.testing.assert_allclose(table["mmhm"], [0.0, 0.0, 0.5, 24 / 31])
    np.testing.assert_allclose(table["mmhm_fid_inception"], [1.0, 0.0, 0.5, 0.8])
    assert bounds.components["pickscore"] == (20.0, 22.0) and clipped == 0


def test_mmhm_interval_from_component_intervals():
    df = example_run()
    for c in ("fid_inception", "is_inception", "clip_score", "pickscore"):
        df[f"{c}_ci_low"], df[f"{c}_ci_high"] = df[c], df[c]
    df.loc[2, ["fid_inception_ci_low", "fid_inception_ci_high"]] = [14.0, 16.0]  # C's FID: normalised 0.6 .. 0.4
    table, _, _ = mmhm(df)
    # pessimistic: 4 / (1/0.4 + 3/0.5) = 8/17; optimistic: 4 / (1/0.6 + 3/0.5) = 12/23
    assert table.loc[2, "mmhm_ci_low"] == pytest.approx(8 / 17)
    assert table.loc[2, "mmhm_ci_high"] == pytest.approx(12 / 23)
    assert table.loc[2, "mmhm_ci_low"] <= table.loc[2, "mmhm"] <= table.loc[2, "mmhm_ci_high"]


def test_mmhm_bounds_are_saved_and_reused(tmp_path):
    _, bounds, _ = mmhm(example_run())
    bounds.save(tmp_path / "b.json")
    again = Bounds.load(tmp_path / "b.json")
    assert again.components == bounds.components
    later = pd.DataFrame(
        {"fid_inception": [8.0, 15.0], "is_inception": [35.0, 35.0], "clip_score": [31.0, 31.0], "pickscore": [21.0, 21.0]}
    )
    table, used, clipped = mmhm(later, bounds=again)
    # FID 8 is better than the saved best (10): clipped to 1; the second row is C of the first run
    np.testing.assert_allclose(table["mmhm_fid_inception"], [1.0, 0.5])
    assert table["mmhm"].iloc[1] == pytest.approx(0.5) and clipped == 1
    assert used is again


def test_normalise_and_harmonic_mean_edge_cases():
    np.testing.assert_allclose(normalise(np.array([3.0, 3.0]), 3.0, 3.0, True), [1.0, 1.0])
    np.testing.assert_allclose(harmonic_mean(np.array([[1.0, 0.25], [0.0, 1.0]])), [0.4, 0.0])
    assert np.isnan(harmonic_mean(np.array([[np.nan, 1.0]]))[0])


def test_mmhm_without_its_components_says_which():
    with pytest.raises(ValueError, match="fid_inception, is_inception, clip_score, pickscore"):
        mmhm(pd.DataFrame({"swd": [1.0, 2.0]}))


# --- paired comparisons ------------------------------------------------------------------------


def test_paired_difference_is_narrower_than_unpaired_intervals():
    from bench.registry import METRICS

    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, 1, 4, 4, generator=g) * 0.8 - 0.4
    level = torch.rand(200, 1, 1, 1, generator=g) * 0.5  # per-seed difficulty both methods share
    shared = torch.rand(200, 1, 4, 4, generator=g) * 2 - 1  # stays inside [-1, 1]: no clamping
    a = base + level * shared
    b = base + 1.1 * level * shared  # method b: 10% more error on every seed
    ctx = [MetricContext(x, None, None, bootstrap=200, seed=0, baseline=base) for x in (a, b)]
    res = paired_difference("psnr", *ctx)
    assert res.diff.value == pytest.approx(20 * math.log10(1.1), rel=1e-6)  # psnr(a) - psnr(b) = 20 log10(1.1)
    assert res.significant and res.a_better
    ua = METRICS.get("psnr")(MetricContext(a, None, None, bootstrap=200, seed=1, baseline=base))
    ub = METRICS.get("psnr")(MetricContext(b, None, None, bootstrap=200, seed=2, baseline=base))
    unpaired = math.hypot(ua.ci_high - ua.ci_low, ub.ci_high - ub.ci_low)
    assert res.diff.ci_high - res.diff.ci_low < 0.1 * unpaired


def test_bootstrap_interval_stays_inside_the_statistics_support():
    from bench.metrics import MetricFn
    from bench.metrics.digits import inception_score_statistic

    probs = np.eye(10)[np.arange(100) % 10]  # IS exactly 10, the most 10 classes allow
    metric = MetricFn("is_test", lambda ctx: inception_score_statistic(probs))
    v = metric(MetricContext(torch.zeros(100), None, None, bootstrap=50, seed=0))
    assert v.value == pytest.approx(10.0) and v.ci_high <= 10.0 and v.ci_low < 10.0


def test_digits_features_do_not_depend_on_the_callers_thread_count():
    """The digits feature space computes on one thread whatever the caller set: at two threads the
    CPU convolutions sum in another order (features about 1e-5 apart), and the per-process
    reference statistics made a driver and a Ray worker score the same samples differently."""
    from bench.data import digits
    from bench.metrics.digits import features_and_probs

    x = digits("heldout")[0][:600]
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = features_and_probs(x)
        assert torch.get_num_threads() == 2  # the caller's setting is restored
        torch.set_num_threads(1)
        b = features_and_probs(x)
    finally:
        torch.set_num_threads(saved)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
