"""The ``bench`` command line.

Nothing heavy is imported to build the parser: torch, diffusers, the methods, pandas and Ray are
imported by the command that needs them, so that ``bench --help`` and ``bench list`` (which reads
:mod:`bench.catalog`) answer in well under 2 s. The subcommands defined in modules that import
torch at their top (``calibrate`` and ``build``, in :mod:`bench.calibrate`) are added as stubs with
their help line, and for real only when one of them is the command given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.allocator import keep_freed_memory
from bench.catalog import KINDS
from bench.paths import PathEscapeError, within

# Exit codes (README, "Exit codes"): one meaning each, for every command.
EXIT_OK = 0
EXIT_REGRESSION = 1  # bench compare / report --baseline found a regression
EXIT_INPUT = 2  # bad input: a suite, an argument, a file that cannot be read (the message names it and the fix)
EXIT_FAILED_JOBS = 3  # bench run / build finished, but some jobs or builds failed (listed)

# Exceptions that mean bad input (exit 2 with one line), by module: looked up only in modules already
# imported (an exception of a module that was never imported cannot have been raised).
INPUT_ERRORS = (
    ("bench.suite", "SuiteError"),
    ("bench.registry", "UnknownNameError"),
    ("bench.io", "WeightsError"),
    ("bench.executors", "ExecutorError"),
    ("bench.models.pipelines", "PipelineError"),
    ("bench.prompts", "PromptSetError"),
    ("bench.paths", "PathEscapeError"),
    ("bench.report.data", "RunError"),
    ("bench.envs", "EnvError"),
)

# Subcommands whose module imports torch: name -> (module, its add_parser function, help line).
# The help lines are checked against the modules' own by tests/test_cli_start.py.
HEAVY_SUBCOMMANDS = {
    "calibrate": (
        "bench.calibrate",
        "add_parser",
        "build (once) a method's artifacts on a model and print where they are and their cost",
    ),
    "build": (
        "bench.calibrate",
        "add_parser",
        "build every artifact a suite needs (students, calibrations) before running it",
    ),
}


def input_errors() -> tuple[type[BaseException], ...]:
    out = [PathEscapeError]
    for mod, name in INPUT_ERRORS:
        m = sys.modules.get(mod)
        if m is not None and getattr(m, name, None) is not None:
            out.append(getattr(m, name))
    return tuple(out)


def cmd_list(args: argparse.Namespace) -> int:
    from bench.catalog import entries as catalog_entries

    entries = catalog_entries(args.what)
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    for d in entries:
        d = dict(d)
        name = d.pop("name")
        if args.what == "methods":
            applies = " ".join(f"{k}={'|'.join(v)}" for k, v in d["applies_to"].items()) or "any model"
            print(f"{name:16s} {d['family']:12s} {d['training']:11s} applies to {applies:28s} {d['paper']}")
        elif args.what == "models":
            print(f"{name:16s} {d['kind']:10s} {d['description']}")
        elif args.what == "metrics":
            arrow = "higher" if d["higher_is_better"] else "lower"
            print(f"{name:10s} {arrow:6s} better  {d['description']}")
        else:
            print(f"{name:10s} {d['path']}  {d.get('description', '')}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from bench.suite import expand, load_suite

    suite = load_suite(args.suite)
    jobs, skipped = expand(suite)
    print(f"suite {suite.name} ({suite.source}) is valid: {len(jobs)} jobs")
    for s in skipped:
        print(f"  skipped (not applicable): {s}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import RESULTS, run_suite
    from bench.suite import load_suite
    from bench.summary import write_summary

    suite = load_suite(args.suite)
    if args.resume and args.run_id and args.resume != args.run_id:
        print(f"bench run: --resume {args.resume} and --run-id {args.run_id} differ; pass one of them", file=sys.stderr)
        return EXIT_INPUT
    results = Path(args.results or RESULTS)
    if args.resume and not (within(results, suite.name, args.resume) / "run.json").is_file():
        print(
            f"bench run: no run {args.resume!r} of suite {suite.name} under {results}; check `ls {results / suite.name}`",
            file=sys.stderr,
        )
        return EXIT_INPUT
    run_dir = run_suite(
        suite,
        run_id=args.resume or args.run_id,
        results_dir=results,
        command=" ".join(sys.argv),
        progress=not args.no_progress,
        executor=args.executor,
        workers=args.workers,
        threads=args.threads,
        address=args.address,
        device=args.device,
        retries=args.retries,
        fresh=args.fresh,
        store=Path(args.store) if args.store else None,
    )
    from bench.history.cohort import write_sidecar

    write_sidecar(run_dir, suite)  # weights and metric code, for `bench history`'s cohorts
    png, md = write_summary(run_dir)
    import pandas as pd

    from bench.summary import failure_lines

    df = pd.read_parquet(run_dir / "results.parquet")
    failures = failure_lines(df)
    print(f"\nresults: {run_dir / 'results.parquet'} ({len(df)} jobs, {len(failures)} failed)")
    print(f"run record: {run_dir / 'run.json'}")
    print(f"plot: {png if png is not None else 'none (no job finished with a metric value)'}")
    print(f"table: {md}")
    for line in failures:
        print(f"  {line}")
    if failures:
        print(
            f"bench run: {len(failures)} of {len(df)} jobs failed (errors above and in {md}); fix the cause and "
            f"`bench run {args.suite} --resume {run_dir.name}` runs them again",
            file=sys.stderr,
        )
        return EXIT_FAILED_JOBS
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from bench.plan import format_plan, plan_suite
    from bench.runner import RESULTS, STORE_DIRNAME
    from bench.suite import load_suite

    suite = load_suite(args.suite)
    results = Path(args.results or RESULTS)
    store = Path(args.store) if args.store else results / STORE_DIRNAME
    executor = args.executor or suite.executor or "local"
    plan = plan_suite(suite, store, args.device, not args.no_probe, args.workers, executor, args.threads)
    print(json.dumps(plan, indent=2, default=str) if args.json else format_plan(plan))
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    import torch

    from bench.models import build_model
    from bench.registry import METHODS
    from bench.seeds import generators, noise
    from bench.summary import labelled_grid

    bundle = build_model(args.model)
    if bundle.num_classes is None:
        raise SystemExit(f"bench samples: {args.model} is not a class-conditional image model")
    sampler = METHODS.get(args.method)().prepare(bundle, args.steps, guidance=args.guidance)
    k = torch.arange(bundle.num_classes * args.per_class)
    labels = k // args.per_class  # one row per class
    gens = generators(args.seed, k.tolist())
    x = sampler(noise(gens, bundle.sample_shape), labels, args.guidance, gens)
    out = Path(args.out or f"reports/{args.model}-samples.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{args.model}: {args.method}, {args.steps} steps, guidance {args.guidance:g}, seeds {args.seed}:0..{len(k) - 1}"
    labelled_grid(x, [f"class {c}" for c in range(bundle.num_classes)], out, title, args.per_class)
    print(f"wrote {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bench.train import train

    train(args.name, steps=args.steps, seed=args.seed, resume=not args.restart)
    return 0


def _reference_specs(texts: list[str] | None) -> list:
    from bench.report import ReferenceSpec

    return [ReferenceSpec.parse(t) for t in texts or []]


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import RunError, build_report

    try:
        report = build_report(
            args.run[0] if len(args.run) == 1 else args.run,
            out=Path(args.out) if args.out else None,
            baseline=args.baseline,
            reference=_reference_specs(args.reference),
            metric=args.metric,
            quality_tol=args.match_tol,
            cost=args.cost,
            match_ci=not args.no_match_ci,
            match=args.match,
            progress=True,
        )
    except RunError as e:
        print(f"bench report: {e}", file=sys.stderr)
        return 2
    index = report.index
    print(f"report: {index}")
    for name in ("leaderboard.md", "compare.md"):
        if (index.parent / name).is_file():
            print(f"{name.split('.')[0]}: {index.parent / name}")
    if args.screenshot:
        from bench.report.browser import BrowserError, check_page

        try:
            check = check_page(index, index.parent / "screenshot.png")
        except BrowserError as e:
            print(f"bench report: browser check: {e}", file=sys.stderr)
            return 2
        print(check.summary())
        if not check.ok:
            return 1
    if report.comparison is not None:
        print(f"against the baseline: {'PASS' if report.comparison.ok else 'FAIL'}")
        return 0 if report.comparison.ok else 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.compare import compare_runs, default_output
    from bench.report import RunError, load_run

    try:
        base, cand = load_run(args.baseline), load_run(args.candidate)
        speed_tol = None if args.speed_tol.lower() in ("none", "off", "inf") else float(args.speed_tol)
        result = compare_runs(
            base, cand, args.quality_tol, speed_tol, _reference_specs(args.reference), paired=args.paired, progress=True
        )
    except (RunError, ValueError) as e:
        print(f"bench compare: {e}", file=sys.stderr)
        return 2
    md = result.markdown()
    out = Path(args.out) if args.out else default_output(base, cand)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(md)
    print(f"summary: {out}")
    return 0 if result.ok else 1


def _command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first positional argument: the top level has no other options than -h)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None, full: bool = False) -> argparse.ArgumentParser:
    """The parser; the subcommands of :data:`HEAVY_SUBCOMMANDS` only as stubs unless ``command`` is one
    of them or ``full`` (every module imported, as before: the tests compare the two)."""
    p = argparse.ArgumentParser(
        prog="bench",
        description="Benchmark accelerated samplers of diffusion and flow models: "
        "run a suite, get quality / NFE / FLOPs / latency per configuration.",
        epilog="Start with `bench run quick` (the demo suite), then look at results/quick/<run-id>/.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("list", help="list registered methods, models, metrics or suites")
    s.add_argument("what", choices=sorted(KINDS))
    s.add_argument("--json", action="store_true", help="print the entries with all metadata as JSON")
    s.set_defaults(fn=cmd_list)
    s = sub.add_parser("validate", help="check a suite and print how many jobs it expands to")
    s.add_argument("suite", help="a registered suite name (see `bench list suites`) or a YAML path")
    s.set_defaults(fn=cmd_validate)
    s = sub.add_parser("run", help="run a suite: results/<suite>/<run-id>/results.parquet, run.json, samples, plot")
    s.add_argument("suite", help="a registered suite name or a YAML path")
    s.add_argument("--run-id", help="name of the run directory (default: a timestamp)")
    s.add_argument("--resume", metavar="RUN_ID", help="continue this run, skipping its finished jobs")
    s.add_argument("--results", help="results root (default: results/)")
    s.add_argument("--executor", choices=["local", "ray"], help="where jobs run (default: the suite's executor:, else local)")
    s.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS; without either, start a local Ray)")
    s.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else one per --threads CPUs)")
    s.add_argument("--threads", type=int, help="torch threads (and Ray CPUs) per CPU worker (Ray default 1)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device of the workers (default auto)")
    s.add_argument("--retries", type=int, default=2, help="times a job whose worker died is retried before it fails (2)")
    s.add_argument("--fresh", action="store_true", help="recompute every job, ignoring finished ones in the job store")
    s.add_argument("--store", help="job store directory shared by runs (default: RESULTS/.store)")
    s.add_argument("--no-progress", action="store_true", help="no live progress display")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("plan", help="print a suite's jobs (NFE, cost estimate, cached or not) without running them")
    s.add_argument("suite", help="a registered suite name or a YAML path")
    s.add_argument("--results", help="results root whose job store marks cached jobs (default: results/)")
    s.add_argument("--store", help="job store directory (default: RESULTS/.store)")
    s.add_argument("--executor", choices=["local", "ray"], help="the executor the run will use (marks cached jobs for it)")
    s.add_argument("--workers", type=int, default=1, help="divide the time estimate among this many workers (1)")
    s.add_argument("--threads", type=int, help="torch threads per worker of the run (as bench run --threads)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device to probe and plan for")
    s.add_argument("--no-probe", action="store_true", help="skip the NFE and timing probes (no model is run)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(fn=cmd_plan)
    s = sub.add_parser("samples", help="draw a labelled sample grid (one row per class) from a digits teacher")
    s.add_argument("model", choices=["digits-unet", "digits-dit"])
    s.add_argument("--method", default="euler")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=2.0)
    s.add_argument("--per-class", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG path (default reports/MODEL-samples.png)")
    s.set_defaults(fn=cmd_samples)
    s = sub.add_parser("train", help="train an embedded network (seeded, resumable) into bench/assets/")
    s.add_argument(
        "name", choices=["digits-unet", "digits-dit", "digits-features", "moving-digits-dit", "moving-digits-features"]
    )
    s.add_argument("--steps", type=int, help="optimiser steps (default: the committed record's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("report", help="write reports/<run-id>/index.html: Pareto, speedup vs training, grids, leaderboard")
    s.add_argument(
        "run",
        nargs="+",
        help="a run directory results/<suite>/<run-id>, a run id, or a suite name (its latest run); several runs of "
        "suites that share models and seeds (e.g. distillation consistency) make one report over all their rows",
    )
    s.add_argument("--baseline", metavar="RUN", help="also compare with this run or results .parquet (bench compare)")
    s.add_argument("--out", help="output directory (default: reports/<run-id>/)")
    s.add_argument(
        "--reference",
        action="append",
        metavar="SPEC",
        help="reference configuration, e.g. method=dpmpp_2m,steps=20,guidance=2[,model=NAME] (repeatable; default: the "
        "suite's reference: entry, else the highest-NFE training-free solver at the most common guidance)",
    )
    s.add_argument("--metric", help="quality metric for matched quality (default: the suite's first metric)")
    s.add_argument("--match-tol", type=float, default=0.10, help="relative quality tolerance for matched quality (0.10)")
    s.add_argument("--no-match-ci", action="store_true", help="match on the tolerance alone, not widened by the reference's CI")
    s.add_argument(
        "--match",
        choices=["ci", "paired"],
        default="ci",
        help="matched quality: 'ci' (within the tolerance plus the reference's CI) or 'paired' (the paired 95%% CI of the "
        "difference over the same seeds excludes a loss beyond the tolerance)",
    )
    s.add_argument("--cost", default="latency_per_image_s", choices=["latency_per_image_s", "nfe", "flops"], help="speedup cost")
    s.add_argument("--screenshot", action="store_true", help="open the page in headless Chromium, check it, save screenshot.png")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("compare", help="compare two runs job by job; exit 1 on a quality, NFE/FLOPs or speed regression")
    s.add_argument("baseline", help="baseline run directory, run id, or results .parquet (e.g. results/baselines/quick.parquet)")
    s.add_argument("candidate", help="candidate run directory, run id, or results .parquet")
    s.add_argument("--quality-tol", type=float, default=0.05, help="allowed quality loss beyond the baseline CI, relative (0.05)")
    s.add_argument(
        "--speed-tol",
        default="0.5",
        help="allowed slowdown of latency normalised by the reference configuration, relative (0.5); 'off' to not gate",
    )
    s.add_argument("--reference", action="append", metavar="SPEC", help="reference configuration for latency normalisation")
    s.add_argument("--out", help="Markdown summary path (default: beside the candidate run)")
    s.add_argument(
        "--no-paired",
        dest="paired",
        action="store_false",
        help="skip the paired same-seed comparison of jobs whose samples changed (two run directories only)",
    )
    s.set_defaults(fn=cmd_compare)
    from bench.cli_metrics import add_parsers

    add_parsers(sub)  # weights, ref, mmhm
    from bench.cli_envs import add_parsers as add_env_parsers

    add_env_parsers(sub)  # env, vbench
    real = {m for n, (m, _, _) in HEAVY_SUBCOMMANDS.items() if full or command == n}
    for name, (module, fn, help_line) in HEAVY_SUBCOMMANDS.items():  # calibrate, build
        if module not in real:
            sub.add_parser(name, help=help_line, add_help=False)
        elif name not in sub.choices:  # the module adds all of its subcommands
            import importlib

            getattr(importlib.import_module(module), fn)(sub)
    from bench.history.command import add_audit_parser
    from bench.history.command import add_parser as add_history_parser

    add_history_parser(sub)  # history
    add_audit_parser(sub)  # audit
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()  # CPU sampling without page faults on every tensor (bench.allocator)
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:
        if not isinstance(e, input_errors()):
            raise
        print(f"bench: {e}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
