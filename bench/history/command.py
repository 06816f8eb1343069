"""``bench history SUITE``: the suite's runs over commits (see :mod:`bench.history.track`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.history.defaults import DEFAULT_K, DEFAULT_MIN_RUNS, DEFAULT_QUALITY_TOL, DEFAULT_SPEED_TOL, LATENCY

# pandas, duckdb and the report are imported by the commands, not here: `bench --help` builds this parser

ROW_COLUMNS = ["model", "method", "knobs", "steps", "guidance", "status", "error", LATENCY, "latency_per_image_iqr_s"]


def default_metric(db, suite: str) -> str:
    """The suite's first metric with values in its latest run (a benchmark's value for imported benchmarks)."""
    from bench.history.benchmarks import BENCH_METRIC, BENCH_SUITE

    if suite == BENCH_SUITE:
        return BENCH_METRIC
    from bench.registry import METRICS
    from bench.report.data import RunError, load_run

    runs = db.sql("SELECT path FROM runs WHERE suite = ? ORDER BY started DESC, run_id DESC LIMIT 1", [suite])
    metrics = load_run(Path(runs["path"].iloc[0])).metrics
    if not metrics:
        raise RunError(f"the latest run of {suite} has no metric values; pass --metric (one of {', '.join(METRICS.names())})")
    return metrics[0]


def cmd_history(args: argparse.Namespace) -> int:
    import duckdb
    import pandas as pd

    from bench.history.audit import inert_caches
    from bench.history.db import open_db, suite_history
    from bench.history.track import build_history, markdown
    from bench.paths import REPO
    from bench.report.data import RESULTS, RunError, load_run

    results = Path(args.results or RESULTS)
    if args.import_benchmarks:
        from bench.history.benchmarks import BenchmarkFileError, import_benchmarks

        try:
            new = import_benchmarks([Path(p) for p in args.import_benchmarks], results)
        except BenchmarkFileError as e:
            print(f"bench history: {e}", file=sys.stderr)
            return 2
        print(f"imported {len(new)} benchmark run(s) into {results / 'benchmarks'}")
    try:
        db = open_db(results)
    except duckdb.Error as e:  # e.g. another process holds the database file
        print(f"bench history: cannot open the database under {results}: {e}", file=sys.stderr)
        return 2
    try:
        if args.sql:
            with pd.option_context("display.max_rows", 200, "display.max_columns", 50, "display.width", 200):
                print(db.sql(args.sql).to_string(index=False))
            return 0
        suites = db.sql("SELECT DISTINCT suite FROM runs ORDER BY suite")["suite"].tolist()
        if args.suite not in suites:
            raise RunError(
                f"no run of suite {args.suite!r} under {results} (suites with runs: {', '.join(suites) or 'none'}); "
                f"`bench run {args.suite}` first"
            )
        metric = args.metric or default_metric(db, args.suite)
        cols = ROW_COLUMNS + [metric, f"{metric}_ci_low", f"{metric}_ci_high"]
        rows = suite_history(db, args.suite, cols)
        if rows[metric].isna().all():
            raise RunError(f"no run of {args.suite} has values of {metric!r}; pass --metric")
        hist = build_history(rows, args.suite, metric, args.k, args.quality_tol, args.speed_tol, min_runs=args.min_runs)
        latest = db.sql("SELECT path FROM runs WHERE suite = ? ORDER BY started DESC, run_id DESC LIMIT 1", [args.suite])
        inert = inert_caches(load_run(Path(latest["path"].iloc[0])).df)
    except duckdb.Error as e:  # a bad --sql query, a Parquet file that cannot be read
        print(f"bench history: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad --k or tolerances
        if isinstance(e, RunError):
            raise
        print(f"bench history: {e}", file=sys.stderr)
        return 2
    finally:
        db.close()
    md = markdown(hist)
    if inert:
        md += "\n## Inert caches in the latest run\n\n" + "\n".join(f"- {f.label}: {f.detail}" for f in inert) + "\n"
    print(md)
    out = Path(args.out) if args.out else REPO / "reports" / f"history-{args.suite}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.md").write_text(md)
    print(f"summary: {out / 'history.md'}")
    if not args.no_page:
        from bench.history.page import write_page

        index = write_page(hist, out, db.path, inert)
        print(f"page: {index}")
        if args.screenshot:
            from bench.report.browser import BrowserError, check_page

            try:
                check = check_page(index, out / "screenshot.png")
            except BrowserError as e:
                print(f"bench history: browser check: {e}", file=sys.stderr)
                return 2
            print(check.summary())
            if not check.ok:
                return 1
    print(f"database: {db.path}")
    return 0 if hist.ok else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "history",
        help="a suite's runs over commits: rolling baseline per cohort, steps, PASS/REGRESSION/IMPROVEMENT/CALIBRATION_NEEDED; "
        "exit 1 on a regression",
    )
    s.add_argument("suite", help="the suite's name (its runs are results/<suite>/*/)")
    s.add_argument("--results", help="results root (default: results/)")
    s.add_argument("--metric", help="quality metric (default: the suite's first metric)")
    s.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"rolling baseline: median of the last k runs of the cohort ({DEFAULT_K})"
    )
    s.add_argument(
        "--min-runs",
        type=int,
        default=DEFAULT_MIN_RUNS,
        help=f"earlier runs of a cohort needed for a baseline; fewer: CALIBRATION_NEEDED ({DEFAULT_MIN_RUNS})",
    )
    s.add_argument(
        "--quality-tol", type=float, default=DEFAULT_QUALITY_TOL, help="allowed quality loss beyond the CI, relative (0.05)"
    )
    s.add_argument("--speed-tol", type=float, default=DEFAULT_SPEED_TOL, help="allowed latency increase, relative (0.2)")
    s.add_argument("--out", help="output directory of the page and summary (default: reports/history-SUITE/)")
    s.add_argument("--no-page", action="store_true", help="print the summary only")
    s.add_argument("--screenshot", action="store_true", help="open the page in headless Chromium, check it, save screenshot.png")
    s.add_argument(
        "--import",
        dest="import_benchmarks",
        action="append",
        metavar="PATH",
        help="first import pytest-benchmark's saved JSON (a file, or a directory such as .benchmarks/) as runs of the suite "
        "'benchmarks' (repeatable): `bench history benchmarks --import FILE`",
    )
    s.add_argument("--sql", metavar="QUERY", help="run a SQL query over the database (tables runs, cohorts; views rows, history)")
    s.set_defaults(fn=cmd_history)


def cmd_audit(args: argparse.Namespace) -> int:
    from bench.history.audit import audit_run

    rep = audit_run(args.run, args.method, args.max_jobs, args.speed_tol, args.quality_tol, args.device)
    md = rep.markdown()
    print(md)
    if rep.run.run_dir is not None:
        (rep.run.run_dir / "audit.md").write_text(md)
        print(f"summary: {rep.run.run_dir / 'audit.md'}")
    return 0 if rep.ok else 1


def add_audit_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "audit",
        help="audit a run: fresh never-seen seeds vs the run's (speed from repeated inputs?), scored samples = timed samples, "
        "inert caches; exit 1 on a failed audit",
    )
    s.add_argument("run", help="a run directory results/<suite>/<run-id>, or a run id")
    s.add_argument("--method", action="append", help="audit only this method's jobs (repeatable; default: every finished job)")
    s.add_argument("--max-jobs", type=int, help="audit at most this many jobs (each is run twice)")
    s.add_argument(
        "--speed-tol", type=float, default=0.5, help="fail when fresh seeds are slower than (1 + this) x the run's seeds (0.5)"
    )
    s.add_argument(
        "--quality-tol", type=float, default=0.05, help="quality loss on fresh seeds allowed beyond both CIs, relative (0.05)"
    )
    s.add_argument("--device", default="cpu", help="device to rerun the jobs on (cpu)")
    s.set_defaults(fn=cmd_audit)
