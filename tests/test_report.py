"""`bench report` on a tiny real run: the page, its figures, leaderboard and provenance."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_helpers import edit_results, tiny_gmm_suite, tiny_run

from bench.cli import main
from bench.report import Report, build_report, fmt, load_run
from bench.report.data import RunError, higher_is_better, resolve_run
from bench.report.grids import image_strip

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return tiny_run(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Report]:
    """One report of the tiny run, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("built")
    run = tiny_run(root)
    return run, build_report(run, out=root / "rep")


def test_report_writes_page_figures_and_leaderboard(built):
    run, rep = built
    out = rep.dir
    html = rep.index.read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "speedup_vs_training.png" in pngs
    assert any(p.startswith("pareto_gmm") for p in pngs)
    assert any(p.startswith("grid_gmm") for p in pngs)
    # every figure is embedded (self-contained) and links to its file, byte for byte
    embedded = re.findall(r'<a href="([^"]+)"><img src="data:image/png;base64,([^"]+)"', html)
    assert sorted(name for name, _ in embedded) == pngs
    for name, data in embedded:
        raw = base64.b64decode(data)
        assert raw.startswith(PNG) and raw == (out / name).read_bytes()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    # provenance, read from run.json
    rec = json.loads((run / "run.json").read_text())
    for text in (rec["git_sha"][:12], rec["versions"]["torch"], rec["started"], "tiny", rec["device"]["platform"]):
        assert text in html
    assert "none is quoted" in html
    # the reference and the tolerance are stated
    ref = rep.speedups.references["gmm[dim=2,prediction=eps]"]
    assert ref.label in html and escape(rep.speedups.rule()) in html and "by more than 10% of the reference value" in html
    assert "exact_mse" in html and "lower is better" in html


def test_leaderboard_numbers_come_from_the_run(built):
    run, rep = built
    df = pd.read_parquet(run / "results.parquet")
    md = (rep.dir / "leaderboard.md").read_text()
    sp = rep.speedups.table
    assert set(sp["method"]) == {"ddim", "euler"}
    ref = df.loc[rep.speedups.references["gmm[dim=2,prediction=eps]"].index]
    ref_line = next(line for line in md.splitlines() if "(reference)" in line)
    assert fmt.ms(ref["latency_per_image_s"]) in ref_line
    assert fmt.ci(ref["exact_mse"], ref["exact_mse_ci_low"], ref["exact_mse_ci_high"]) in ref_line
    # ranks follow the speedups
    ranked = sp[sp["matched"]]
    assert list(ranked["speedup"]) == sorted(ranked["speedup"], reverse=True)
    for _, s in ranked.iterrows():
        r = df.loc[s["row"]]
        assert s["speedup"] == pytest.approx(ref["latency_per_image_s"] / r["latency_per_image_s"])


def test_reference_from_the_suite_record(run, tmp_path):
    rec = json.loads((run / "run.json").read_text())
    rec["suite"]["reference"] = [{"method": "euler", "steps": 3}]
    (run / "run.json").write_text(json.dumps(rec))
    rep = build_report(run, out=tmp_path / "rep")
    ref = rep.speedups.references["gmm[dim=2,prediction=eps]"]
    assert ref.rule == "given: method=euler,steps=3" and ref.label.startswith("euler 3 steps")
    assert "given: method=euler,steps=3" in rep.index.read_text()


def test_report_cli_with_baseline(run, tmp_path, capsys):
    assert main(["report", str(run), "--out", str(tmp_path / "a"), "--baseline", str(run)]) == 0
    assert "PASS" in (tmp_path / "a" / "compare.md").read_text()
    bad = tmp_path / "bad" / "tiny-run"
    shutil.copytree(run, bad)
    edit_results(bad, lambda df: df.assign(nfe=df["nfe"] + 1))
    assert main(["report", str(bad), "--out", str(tmp_path / "b"), "--baseline", str(run)]) == 1
    page = (tmp_path / "b" / "index.html").read_text()
    assert "FAIL" in page and "NFE up" in page
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert (
        main(
            [
                "report",
                str(run),
                "--out",
                str(tmp_path / "c"),
                "--reference",
                "method=ddim,steps=99,model=" + "gmm[dim=2,prediction=eps]",
            ]
        )
        == 2
    )
    assert "matches no finished job" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(tmp_path / "c"), "--metric", "fid"]) == 2


def test_failed_jobs_are_listed(run, tmp_path):
    def fail(df):
        m = (df["method"] == "euler") & (df["steps"] == 3)
        df.loc[m, "status"], df.loc[m, "error"] = "failed", "NonFiniteSamples: 3 of 64 samples contain NaN"
        return df

    edit_results(run, fail)
    html = build_report(run, out=tmp_path / "rep").index.read_text()
    assert "Failed jobs (1)" in html and "NonFiniteSamples: 3 of 64" in html


def test_run_resolution(run, tmp_path):
    root = tmp_path / "results"
    assert resolve_run(str(run)) == run
    assert resolve_run("tiny-run", results=root) == run
    assert resolve_run("tiny/tiny-run", results=root) == run
    assert resolve_run("tiny", results=root) == run  # a suite name: its latest run
    assert load_run(run / "results.parquet").run_id == "tiny-run"
    with pytest.raises(RunError, match="not found"):
        resolve_run("nope", results=root)


def test_directions_come_from_the_registry():
    assert higher_is_better("class_acc") and not higher_is_better("fid") and not higher_is_better("exact_mse")


def test_image_strip_keeps_seed_order():
    x = np.stack([np.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    strip = image_strip(x, 3)
    assert strip.shape == (4, 3 * 5 - 1)
    assert strip[0, 0] == 0.0 and strip[0, 5] == 0.5 and strip[0, 10] == 1.0
    assert strip[0, 4] == 0.5  # separator column


def test_paired_section_against_the_reference(tmp_path):
    """A digits run keeps its samples: the report pairs each leaderboard configuration with the
    reference over the shared seeds; the difference is the difference of the rows' values and its
    interval is narrower than either job's own CI."""
    import pandas as pd

    from bench.runner import run_suite
    from bench.suite import load_suite

    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\nn_samples: 40\nbatch_size: 40\nbootstrap: 20\nmodels: [digits-unet]\nmethods: [ddim, dpmpp_2m]\n"
        "steps: [6, 8]\nguidance: [1.0]\nmetrics: [fid]\ntiming: {warmup: 0}\n"
        "reference: {model: digits-unet, method: ddim, steps: 8, guidance: 1.0}\n"
    )
    run = run_suite(load_suite(path), "p", tmp_path / "res", progress=False)
    # every method matches; cheapest by NFE (deterministic, unlike latency): ddim 6 and dpmpp_2m 6
    rep = build_report(run, out=tmp_path / "rep", match_ci=False, quality_tol=10.0, cost="nfe")
    assert "Paired against the reference" in rep.index.read_text()
    lines = [ln for ln in (rep.dir / "paired.md").read_text().splitlines() if ln.startswith("| digits-unet")]
    df = pd.read_parquet(run / "results.parquet")
    ref = df[(df["method"] == "ddim") & (df["steps"] == 8)].iloc[0]
    assert len(lines) == 2  # dpmpp_2m's matched configuration, and ddim's cheaper one (not the reference itself)
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        method, steps = cells[1].split()[0], int(cells[1].split()[1])
        row = df[(df["method"] == method) & (df["steps"] == steps)].iloc[0]
        diff, lo, hi = (float(v) for v in cells[4].replace("[", " ").replace("]", " ").replace(",", " ").split())
        assert diff == pytest.approx(row["fid"] - ref["fid"], rel=1e-3, abs=1e-3)
        assert lo <= diff <= hi and hi - lo < min(row["fid_ci_high"] - row["fid_ci_low"], ref["fid_ci_high"] - ref["fid_ci_low"])


def test_paired_matching_rule_by_hand():
    from bench.report.matched import paired_within_tolerance

    assert paired_within_tolerance((-0.1, 0.05), 1.0, higher=False, tol=0.1)  # worst case +0.05 <= 0.1
    assert not paired_within_tolerance((0.02, 0.15), 1.0, higher=False, tol=0.1)  # could be 15% worse
    assert paired_within_tolerance((-0.08, 0.3), 1.0, higher=True, tol=0.1)  # higher is better: worst loss 0.08
    assert not paired_within_tolerance((-0.2, 0.3), 1.0, higher=True, tol=0.1)
    assert not paired_within_tolerance(None, 1.0, higher=False, tol=0.1)  # no paired samples: no match


def test_matched_quality_decided_by_the_paired_difference(tmp_path):
    """--match paired: a configuration matches when its paired 95% interval against the reference
    (same seeds) stays within the tolerance; the rule is stated on the page."""
    from bench.runner import run_suite
    from bench.suite import load_suite

    path = tmp_path / "q.yaml"
    path.write_text(
        "name: q\nn_samples: 40\nbatch_size: 40\nbootstrap: 20\nmodels: [digits-unet]\nmethods: [ddim]\n"
        "steps: [2, 8]\nguidance: [1.0]\nmetrics: [fid]\ntiming: {warmup: 0}\n"
        "reference: {model: digits-unet, method: ddim, steps: 8, guidance: 1.0}\n"
    )
    run = run_suite(load_suite(path), "q", tmp_path / "res", progress=False)
    strict = build_report(run, out=tmp_path / "r1", match="paired", quality_tol=0.1, cost="nfe")
    loose = build_report(run, out=tmp_path / "r2", match="paired", quality_tol=100.0, cost="nfe")
    row = lambda rep: rep.speedups.table.iloc[0]  # noqa: E731
    assert strict.speedups.paired and "paired 95% CI" in strict.index.read_text()
    assert row(strict)["speedup_nfe"] == 1.0  # 2 steps is far worse than 8 over the same seeds: only the reference matches
    assert row(loose)["speedup_nfe"] == 4.0  # with a huge tolerance the 2-step job matches
    with pytest.raises(RunError, match="match must be"):
        build_report(run, out=tmp_path / "r3", match="both")


def test_one_report_over_two_runs_of_suites_sharing_models_and_seeds(run, tmp_path, capsys):
    from dataclasses import replace

    from bench.report.data import config_key, merge_runs
    from bench.runner import run_suite
    from bench.suite import MethodSpec

    other = replace(tiny_gmm_suite(), name="tiny2", methods=[MethodSpec("euler"), MethodSpec("dpmpp_2m")])
    run2 = run_suite(other, run_id="tiny2-run", results_dir=tmp_path / "results2", progress=False)
    a, b = load_run(run), load_run(run2)
    merged = merge_runs([a, b])
    keys = [config_key(r) for _, r in merged.df.iterrows()]
    assert len(keys) == len(set(keys)), "a configuration both runs hold appears once"
    assert set(merged.df["method"]) == {"ddim", "euler", "dpmpp_2m"} and len(merged.df) == 6
    assert merged.suite_name == "tiny+tiny2" and merged.run_id == "tiny-run+tiny2-run"
    dp = merged.df[merged.df["method"] == "dpmpp_2m"].iloc[0]
    assert merged.job_dir(dp["job_id"]).parent.parent == run2  # its samples are found in the second run
    assert np.array_equal(merged.samples(dp["job_id"]), b.samples(dp["job_id"]))
    assert main(["report", str(run), str(run2), "--out", str(tmp_path / "both")]) == 0
    lb = (tmp_path / "both" / "leaderboard.md").read_text()
    assert "dpmpp_2m" in lb and "ddim" in lb and "tiny+tiny2" in lb
    # runs that do not share seeds cannot be compared sample by sample
    edit_results(run2, lambda df: df.assign(seed=df["seed"] + 1))
    assert main(["report", str(run), str(run2), "--out", str(tmp_path / "bad")]) == 2
    assert "differ in seed" in capsys.readouterr().err


def test_inert_cache_is_flagged_in_the_report(run, tmp_path):
    """A cache whose knobs make it compute every unit (units_fraction = 1) is flagged inert on the page,
    in the caching table and on the leaderboard (bench.history.audit.inert_rows decides); the others are not."""

    def as_cache(df):
        m = df["method"] == "euler"
        df.loc[m, "method"], df.loc[m, "family"] = "fora", "caching"
        df.loc[m, "knobs"] = [json.dumps({"interval": 1 if s == 3 else 2, "solver": "ddim"}) for s in df.loc[m, "steps"]]
        df["units_fraction"] = np.nan
        df.loc[m, "units_fraction"] = [1.0 if s == 3 else 0.5 for s in df.loc[m, "steps"]]
        return df

    edit_results(run, as_cache)
    rep = build_report(run, out=tmp_path / "rep", match_ci=False, quality_tol=100.0)
    html = rep.index.read_text()
    assert "Inert caches (1)" in html and "skips nothing" in html
    assert html.count("fora[interval=1,solver=ddim] 3 steps") >= 2 and '<tr class="inert">' in html
    cache_md = (rep.dir / "cache_speedups.md").read_text()
    assert (
        "fora[interval=1,solver=ddim] 3 steps w=1 [inert]" in cache_md
        and "fora[interval=2,solver=ddim] 8 steps w=1 [inert]" not in cache_md
    )
    assert "fora[interval=2,solver=ddim] 8 steps w=1" in cache_md
    inert_md = (rep.dir / "inert_caches.md").read_text()
    assert "fora[interval=1,solver=ddim] 3 steps" in inert_md and "interval=2" not in inert_md
    # the leaderboard's fora row is marked exactly when its chosen configuration is the inert one
    df = pd.read_parquet(run / "results.parquet")
    row = rep.speedups.table.set_index("method").loc["fora", "row"]
    line = next(x for x in (rep.dir / "leaderboard.md").read_text().splitlines() if "fora" in x)
    assert ("[inert]" in line) == (df.loc[row, "units_fraction"] == 1.0)
    # a run without caches has no inert section
    clean = build_report(tiny_run(tmp_path / "other"), out=tmp_path / "rep2")
    assert "Inert caches" not in clean.index.read_text() and not (clean.dir / "inert_caches.md").exists()
