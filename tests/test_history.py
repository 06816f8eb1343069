"""``bench history``: synthetic histories over fake commits (acceptance 1 of issue 17).

14 runs of two configurations: ``ddim`` with one injected step in quality (FID +0.6 from commit
6) and one in latency (x1.5 from commit 9), amid noise; ``euler`` the control (noise and one slow
outlier only). The detector must name commits 6 and 9 and nothing in the control; a 15th run
whose torch version changed gives CALIBRATION_NEEDED for both, not a regression, though its
numbers are worse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from history_helpers import VERSIONS, fake_commit, make_run

from bench.cli import main
from bench.history.db import open_db, suite_history
from bench.history.steps import detect_steps
from bench.history.track import CALIBRATION_NEEDED, PASS, REGRESSION, build_history

N = 14
Q_STEP, L_STEP = 6, 9
COLS = ["model", "method", "knobs", "steps", "guidance", "status", "error", "latency_per_image_s", "latency_per_image_iqr_s",
        "fid", "fid_ci_low", "fid_ci_high"]  # fmt: skip


def _rows(i: int, rng: np.random.Generator, fid_shift: float = 0.0, lat_scale: float = 1.0) -> list[dict]:
    out = []
    for method in ("ddim", "euler"):
        fid = 2.0 + rng.normal(0, 0.03) + fid_shift + (0.6 if method == "ddim" and i >= Q_STEP else 0.0)
        lat = 0.040 * (1 + rng.normal(0, 0.02)) * lat_scale
        if method == "ddim" and i >= L_STEP:
            lat *= 1.5
        if method == "euler" and i == 4:
            lat *= 1.3  # one slow run: an outlier, not a step
        out.append({"method": method, "steps": 10, "fid": fid, "fid_ci_low": fid - 0.1, "fid_ci_high": fid + 0.1,
                    "latency_per_image_s": lat})  # fmt: skip
    return out


def build(results: Path, n: int = N) -> None:
    rng = np.random.default_rng(17)
    for i in range(n):
        make_run(results, f"run{i:02d}", fake_commit(i), f"2026-01-{i + 1:02d}T00:00:00", _rows(i, rng))


def history(results: Path):
    db = open_db(results)
    try:
        return build_history(suite_history(db, "synth", COLS), "synth", "fid")
    finally:
        db.close()


def test_detector_names_the_injected_commits_and_nothing_in_the_control(tmp_path: Path):
    build(tmp_path)
    h = history(tmp_path)
    assert h.commits == [fake_commit(i) for i in range(N)]
    by = {c.label.split()[0]: c for c in h.configs}
    ddim, euler = by["ddim"], by["euler"]
    assert [(s.axis, s.commit, s.worse) for s in ddim.steps] == [
        ("fid", fake_commit(Q_STEP), True),
        ("latency", fake_commit(L_STEP), True),
    ]
    assert euler.steps == []
    # the last 5 runs are all past both steps: the rolling baseline has absorbed them
    assert ddim.status == PASS and euler.status == PASS and h.ok
    assert ddim.n_baseline == 5 and abs(ddim.baseline_latency - 0.060) < 0.003


def test_a_regression_in_the_latest_run_fails_and_exits_1(tmp_path: Path, capsys):
    build(tmp_path)
    rng = np.random.default_rng(0)
    make_run(tmp_path, "run14", fake_commit(14), "2026-01-15T00:00:00", _rows(N, rng, lat_scale=1.6))
    h = history(tmp_path)
    assert {c.status for c in h.configs} == {REGRESSION}
    assert all("latency" in c.reasons[0] for c in h.configs)
    assert main(["history", "synth", "--results", str(tmp_path), "--out", str(tmp_path / "page"), "--no-page"]) == 1
    assert "**FAIL**: 0 PASS, 2 REGRESSION" in capsys.readouterr().out


def test_cohort_change_is_calibration_needed_not_a_regression(tmp_path: Path, capsys):
    build(tmp_path)
    rng = np.random.default_rng(1)
    worse = _rows(N, rng, fid_shift=1.0, lat_scale=2.0)  # far worse numbers, on a new torch
    new = VERSIONS | {"torch": "2.15.0"}
    make_run(tmp_path, "run14", fake_commit(14), "2026-01-15T00:00:00", worse, versions=new)
    h = history(tmp_path)
    assert {c.status for c in h.configs} == {CALIBRATION_NEEDED}
    changed = f"cohort changed at commit {fake_commit(14)[:10]}: versions.torch: 2.14.1 -> 2.15.0"
    assert all(c.reasons[1] == changed for c in h.configs)
    # steps are looked for within a cohort: the new cohort's one run adds none
    assert [s.commit for c in h.configs for s in c.steps] == [fake_commit(Q_STEP), fake_commit(L_STEP)]
    assert main(["history", "synth", "--results", str(tmp_path), "--out", str(tmp_path / "page")]) == 0
    out = capsys.readouterr().out
    assert "2 CALIBRATION_NEEDED" in out and (tmp_path / "page" / "index.html").is_file()
    # a second run of the new cohort is still calibrating (2 earlier runs needed), a third is compared with them
    for i in (15, 16):
        make_run(
            tmp_path,
            f"run{i}",
            fake_commit(i),
            f"2026-01-{i + 1}T00:00:00",
            _rows(N, rng, fid_shift=1.0, lat_scale=2.0),
            versions=new,
        )
        h = history(tmp_path)
        assert {c.status for c in h.configs} == ({CALIBRATION_NEEDED} if i == 15 else {PASS}), i
    assert all(c.n_baseline == 2 for c in h.configs)


def test_database_is_queryable_with_sql(tmp_path: Path, capsys):
    build(tmp_path, 3)
    q = "SELECT method, count(*) AS n, count(DISTINCT commit) AS commits FROM history GROUP BY method ORDER BY method"
    assert main(["history", "synth", "--results", str(tmp_path), "--sql", q]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[1].split() == ["ddim", "3", "3"] and lines[2].split() == ["euler", "3", "3"]
    assert (tmp_path / "history.duckdb").is_file()


def test_unknown_suite_is_bad_input(tmp_path: Path, capsys):
    build(tmp_path, 2)
    assert main(["history", "nosuch", "--results", str(tmp_path)]) == 2
    assert "no run of suite 'nosuch'" in capsys.readouterr().err
    assert main(["history", "synth", "--results", str(tmp_path), "--sql", "SELEC 1"]) == 2
    assert "ParserException" in capsys.readouterr().err
    assert main(["history", "synth", "--results", str(tmp_path), "--k", "0", "--no-page"]) == 2


def test_false_step_rate_on_control_series_is_below_one_percent():
    """200 noise-only series of 14 runs (3% Gaussian noise): at most 1% report a step; the same
    series with a 5-sigma step at run 7 find it there in at least 90%."""
    false, found = 0, 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        y = 10 + rng.normal(0, 0.3, 14)
        false += bool(detect_steps(y))
        y[7:] += 1.5
        found += [s.index for s in detect_steps(y)] == [7]
    assert false <= 2 and found >= 180, (false, found)


def test_single_outlier_is_not_a_step():
    y = [1.0, 1.01, 0.99, 1.0, 1.02, 1.0, 3.0, 1.0, 0.99, 1.01, 1.0, 1.0]
    assert detect_steps(y) == []
    y2 = y[:6] + [1.5] * 6
    assert [s.index for s in detect_steps(y2)] == [6]


def test_inert_cache_in_the_latest_run_is_flagged_on_the_page(tmp_path: Path, capsys):
    build(tmp_path, 3)
    rng = np.random.default_rng(2)
    rows = _rows(3, rng)
    rows += [
        r | {"method": "fora", "family": "caching", "units_fraction": f} for r, f in zip(_rows(3, rng), (1.0, 0.5), strict=True)
    ]
    rows[2]["knobs"] = '{"interval": 1}'
    make_run(tmp_path, "run03", fake_commit(3), "2026-01-04T00:00:00", rows)
    assert main(["history", "synth", "--results", str(tmp_path), "--out", str(tmp_path / "page")]) == 0
    out = capsys.readouterr().out
    assert "## Inert caches in the latest run" in out and out.count("units_fraction = 1") == 1
    page = (tmp_path / "page" / "index.html").read_text()
    assert "fora[interval=1] 10 steps w=1" in page and "skips nothing" in page
