"""Pareto dominance (mixed directions, ties, CIs) and speedup at matched quality on hand-made tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bench.report.data import RunError
from bench.report.matched import (
    ReferenceSpec,
    choose_references,
    matched_speedups,
    specs_from,
    within_tolerance,
)
from bench.report.pareto import dominates, pareto_front, surely_dominates

# ---- dominance -------------------------------------------------------------------------------


def test_dominates_reads_each_direction():
    # objectives: (latency: lower better, accuracy: higher better)
    hib = [False, True]
    assert dominates([1.0, 0.9], [2.0, 0.8], hib)
    assert not dominates([2.0, 0.8], [1.0, 0.9], hib)
    # faster but worse: neither dominates
    assert not dominates([1.0, 0.7], [2.0, 0.8], hib)
    assert not dominates([2.0, 0.8], [1.0, 0.7], hib)
    # the same numbers under the opposite direction of the quality axis flip the answer
    assert dominates([1.0, 0.7], [2.0, 0.8], [False, False])
    assert not dominates([1.0, 0.9], [2.0, 0.8], [False, False])


def test_ties_do_not_dominate():
    hib = [False, False]
    assert not dominates([1.0, 5.0], [1.0, 5.0], hib)
    # equal on one objective, better on the other: dominates
    assert dominates([1.0, 4.0], [1.0, 5.0], hib)
    front = pareto_front(np.array([[1.0, 5.0], [1.0, 5.0], [2.0, 6.0]]), hib)
    assert front.on_front.tolist() == [True, True, False]


def test_front_mixed_directions_and_nan():
    # cost (lower better), fid (lower better), acc (higher better)
    v = np.array(
        [
            [1.0, 10.0, 0.90],  # cheapest
            [2.0, 8.0, 0.95],  # better quality, costs more: on the front
            [3.0, 9.0, 0.94],  # dominated by row 1
            [3.0, 7.0, 0.80],  # best fid, worst acc: on the front
            [np.nan, 1.0, 1.0],  # no cost: neither on the front nor plausible
        ]
    )
    front = pareto_front(v, [False, False, True])
    assert front.on_front.tolist() == [True, True, False, True, False]
    assert front.plausible.tolist() == front.on_front.tolist()  # without CIs the two agree
    assert front.order(v[:, 0]).tolist() == [0, 1, 3]


def test_confidence_intervals_decide_sure_dominance():
    hib = [False, False]  # cost, fid
    # a is cheaper and its fid point estimate is better, but the CIs overlap: not sure
    assert dominates([1.0, 5.0], [2.0, 6.0], hib)
    assert not surely_dominates([1.0, 4.0], [1.0, 6.5], [2.0, 5.5], [2.0, 7.0], hib)
    # separated CIs: sure
    assert surely_dominates([1.0, 4.0], [1.0, 5.0], [2.0, 5.5], [2.0, 7.0], hib)
    # touching CIs, cost strictly better: sure (worst of a = best of b on fid, better cost)
    assert surely_dominates([1.0, 4.0], [1.0, 5.5], [2.0, 5.5], [2.0, 7.0], hib)
    # higher-is-better metric: a's lower end must clear b's upper end
    assert surely_dominates([1.0, 0.90], [1.0, 0.95], [2.0, 0.80], [2.0, 0.89], [False, True])
    assert not surely_dominates([1.0, 0.88], [1.0, 0.95], [2.0, 0.80], [2.0, 0.89], [False, True])


def test_front_with_cis_marks_plausible_points():
    v = np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 9.0]])
    low = np.array([[np.nan, 4.0], [np.nan, 4.5], [np.nan, 8.5]])
    high = np.array([[np.nan, 6.5], [np.nan, 7.0], [np.nan, 9.5]])
    front = pareto_front(v, [False, False], low, high)
    assert front.on_front.tolist() == [True, False, False]
    # row 1 is dominated by its estimate but its CI overlaps row 0's: still plausible;
    # row 2's CI lies wholly above row 0's: surely dominated
    assert front.plausible.tolist() == [True, True, False]


def test_front_rejects_wrong_shape():
    with pytest.raises(ValueError, match="one column per objective"):
        pareto_front(np.zeros((3, 2)), [True])


# ---- speedup at matched quality ---------------------------------------------------------------


def table(rows):
    """Hand-made finished jobs: (model, method, family, training, steps, guidance, nfe, latency, flops, fid[, knobs])."""
    out = []
    for r in rows:
        model, method, family, training, steps, g, nfe, lat, flops, fid = r[:10]
        knobs = r[10] if len(r) > 10 else {}
        out.append(
            {
                "status": "ok",
                "model": model,
                "method": method,
                "family": family,
                "training": training,
                "knobs": json.dumps(knobs, sort_keys=True),
                "steps": steps,
                "guidance": g,
                "nfe": nfe,
                "latency_per_image_s": lat,
                "flops": flops,
                "fid": fid,
                "fid_ci_low": fid * 0.9,
                "fid_ci_high": fid * 1.1,
                "class_acc": 0.9,
                "class_acc_ci_low": 0.85,
                "class_acc_ci_high": 0.95,
                "train_cost_s": 120.0 if training != "free" else 0.0,
            }
        )
    return pd.DataFrame(out)


ROWS = [
    # model, method, family, training, steps, w, nfe, latency, flops, fid
    ("m", "ddim", "solver", "free", 50, 2.0, 50, 0.050, 5e9, 10.0),
    ("m", "ddim", "solver", "free", 20, 2.0, 20, 0.020, 2e9, 10.8),  # within 10%
    ("m", "ddim", "solver", "free", 10, 2.0, 10, 0.010, 1e9, 14.0),  # outside
    ("m", "dpmpp_2m", "solver", "free", 50, 2.0, 50, 0.052, 5e9, 9.5),  # same NFE, better: the reference
    ("m", "dpmpp_2m", "solver", "free", 10, 2.0, 10, 0.011, 1e9, 10.4),
    ("m", "dpmpp_2m", "solver", "free", 10, 1.0, 10, 0.006, 5e8, 10.9),  # w=1 cheaper, within 15%
    ("m", "lcm", "consistency", "finetune", 2, 2.0, 2, 0.003, 2e8, 10.2),
    ("m", "deepcache", "caching", "free", 20, 2.0, 20, 0.008, 8e8, 30.0, {"interval": 3}),  # never matches
    ("m", "ddim", "solver", "free", 100, 1.0, 100, 0.100, 5e9, 9.0),  # most NFE but the rarer guidance
]


def test_default_reference_is_highest_nfe_free_solver_at_common_guidance():
    ok = table(ROWS)
    refs = choose_references(ok, "fid")
    ref = ok.loc[refs["m"].index]
    # guidance 2 is the most common; at it the solvers' most NFE is 50 (ddim and dpmpp_2m tie),
    # and the tie goes to the better fid: dpmpp_2m (not the 100-step ddim at w=1)
    assert (ref["method"], ref["steps"], ref["guidance"]) == ("dpmpp_2m", 50, 2.0)
    assert refs["m"].rule.startswith("rule:")


def test_scores_a_rounding_apart_tie_and_the_method_name_decides():
    """Two solvers that are one algorithm on a model score alike up to the last bits, which differ
    from machine to machine: within 1e-9 of each other the reference goes by method name."""
    q = 0.018702981500862664
    rows = [
        ("m", "euler", "solver", "free", 8, 1.0, 8, 0.010, 1e9, q),
        ("m", "ddim", "solver", "free", 8, 1.0, 8, 0.011, 1e9, q * (1 + 1e-12)),  # worse by a rounding
    ]
    ok = table(rows)
    assert ok.loc[choose_references(ok, "fid")["m"].index, "method"] == "ddim"
    ok.loc[ok["method"] == "ddim", "fid"] = q * (1 + 1e-6)  # worse by more than rounding: quality decides
    assert ok.loc[choose_references(ok, "fid")["m"].index, "method"] == "euler"


def test_tied_guidance_scales_go_to_the_better_quality():
    rows = [
        ("m", "ddim", "solver", "free", 20, 1.0, 20, 0.02, 2e9, 0.3),
        ("m", "ddim", "solver", "free", 5, 1.0, 5, 0.005, 5e8, 0.5),
        ("m", "ddim", "solver", "free", 20, 2.0, 20, 0.04, 4e9, 1.5),
        ("m", "ddim", "solver", "free", 5, 2.0, 5, 0.01, 1e9, 1.7),
    ]
    ok = table(rows)
    ref = ok.loc[choose_references(ok, "fid")["m"].index]
    assert (ref["steps"], ref["guidance"]) == (20, 1.0)
    # flip the quality: now guidance 2 is better at the most NFE and becomes the reference
    ok["fid"] = [1.5, 1.7, 0.3, 0.5]
    ref = ok.loc[choose_references(ok, "fid")["m"].index]
    assert (ref["steps"], ref["guidance"]) == (20, 2.0)


def test_speedup_at_matched_quality_by_hand():
    ok = table(ROWS)
    refs = choose_references(ok, "fid")
    sp = matched_speedups(ok, "fid", refs, tol=0.15, match_ci=False).table.set_index("method")
    # reference fid 9.5, tolerance 15%: anything with fid <= 10.925 matches
    # ddim: 50 steps (10.0) and 20 steps (10.8) match, 10 steps (14.0) does not -> fastest is 20 steps
    assert sp.loc["ddim", "matched"]
    assert ok.loc[sp.loc["ddim", "row"], "steps"] == 20
    assert sp.loc["ddim", "speedup"] == pytest.approx(0.052 / 0.020)
    assert sp.loc["ddim", "speedup_nfe"] == pytest.approx(50 / 20)
    assert sp.loc["ddim", "speedup_flops"] == pytest.approx(5e9 / 2e9)
    # dpmpp_2m: the w=1, 10-step configuration (10.9) matches and is the cheapest
    assert ok.loc[sp.loc["dpmpp_2m", "row"], "guidance"] == 1.0
    assert sp.loc["dpmpp_2m", "speedup"] == pytest.approx(0.052 / 0.006)
    assert sp.loc["dpmpp_2m", "is_reference_method"]
    # lcm: one configuration, matches, carries its training cost
    assert sp.loc["lcm", "speedup"] == pytest.approx(0.052 / 0.003)
    assert sp.loc["lcm", "train_cost_s"] == 120.0
    # deepcache never comes within tolerance: unmatched, no speedup, its best row kept
    assert not sp.loc["deepcache", "matched"]
    assert np.isnan(sp.loc["deepcache", "speedup"])
    # ranked: matched by speedup, unmatched last
    assert list(sp.index) == ["lcm", "dpmpp_2m", "ddim", "deepcache"]


def test_tolerance_changes_the_match():
    ok = table(ROWS)
    refs = choose_references(ok, "fid")
    tight = matched_speedups(ok, "fid", refs, tol=0.0, match_ci=False).table.set_index("method")
    # at zero tolerance only configurations at least as good as the reference (9.5) match:
    # ddim at 100 steps, w=1 (9.0); dpmpp_2m only at its reference configuration
    assert ok.loc[tight.loc["ddim", "row"], "steps"] == 100
    assert tight.loc["dpmpp_2m", "speedup"] == pytest.approx(1.0)
    assert not tight.loc["lcm", "matched"]


def test_reference_ci_widens_the_match():
    ok = table(ROWS)  # fid CIs are +-10% of the value: the reference's (9.5) upper half-width is 0.95
    refs = choose_references(ok, "fid")
    wide = matched_speedups(ok, "fid", refs, tol=0.15).table.set_index("method")
    # margin = 0.95 + 0.15 * 9.5 = 2.375: fid <= 11.875 matches, still not ddim's 10 steps (14.0)
    assert ok.loc[wide.loc["ddim", "row"], "steps"] == 20
    # at zero tolerance the CI alone still admits lcm (10.2 <= 10.45)
    ci_only = matched_speedups(ok, "fid", refs, tol=0.0).table.set_index("method")
    assert ci_only.loc["lcm", "matched"]
    assert not matched_speedups(ok, "fid", refs, tol=0.0, match_ci=False).table.set_index("method").loc["lcm", "matched"]
    assert within_tolerance(10.45, 9.5, False, 0.0, 8.55, 10.45)
    assert not within_tolerance(10.46, 9.5, False, 0.0, 8.55, 10.45)
    # higher is better: the lower half-width counts
    assert within_tolerance(0.85, 0.9, True, 0.0, 0.85, 0.99) and not within_tolerance(0.84, 0.9, True, 0.0, 0.85, 0.99)


def test_higher_is_better_metric_matches_downwards():
    assert within_tolerance(0.95, 1.0, True, 0.05)
    assert not within_tolerance(0.94, 1.0, True, 0.05)
    assert within_tolerance(2.0, 1.0, True, 0.0)  # better always matches
    assert within_tolerance(1.05, 1.0, False, 0.05)
    assert not within_tolerance(1.06, 1.0, False, 0.05)
    ok = table(ROWS)
    refs = choose_references(ok, "class_acc")
    sp = matched_speedups(ok, "class_acc", refs, tol=0.0).table
    assert sp["matched"].all()  # every row has the same class_acc


def test_explicit_reference_and_errors():
    ok = table(ROWS)
    refs = choose_references(ok, "fid", [ReferenceSpec.parse("method=ddim,steps=50,guidance=2")])
    ref = ok.loc[refs["m"].index]
    assert (ref["method"], ref["steps"]) == ("ddim", 50)
    assert refs["m"].rule == "given: method=ddim,steps=50,guidance=2"
    # open fields: the rule picks among the jobs it selects (ddim's most NFE: 100 steps)
    refs = choose_references(ok, "fid", specs_from({"method": "ddim"}))
    assert ok.loc[refs["m"].index, "steps"] == 100
    # knobs are matched too
    refs = choose_references(ok, "fid", [ReferenceSpec.parse("method=deepcache,interval=3")])
    assert ok.loc[refs["m"].index, "method"] == "deepcache"
    with pytest.raises(RunError, match="matches no finished job of m"):
        choose_references(ok, "fid", [ReferenceSpec.parse("model=m,method=ddim,steps=7")])
    with pytest.raises(RunError, match="model 'other' is not in this run; its models: m"):
        choose_references(ok, "fid", [ReferenceSpec.parse("model=other,method=ddim")])
    # model labels carry commas inside brackets
    assert ReferenceSpec.parse("model=gmm[dim=2,prediction=eps],steps=5").model == "gmm[dim=2,prediction=eps]"
    with pytest.raises(RunError, match="not key=value"):
        ReferenceSpec.parse("ddim")
    with pytest.raises(RunError, match="unknown key"):
        specs_from({"methd": "ddim"})


def test_no_free_solver_falls_back_to_all_jobs():
    ok = table([r for r in ROWS if r[1] in ("lcm", "deepcache")])
    refs = choose_references(ok, "fid")
    assert "no training-free solver ran" in refs["m"].rule
