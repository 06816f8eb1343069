"""The ``bench`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.registry import METHODS, METRICS, MODELS, SUITES, UnknownNameError

REGISTRIES = {"methods": METHODS, "models": MODELS, "metrics": METRICS, "suites": SUITES}


def cmd_list(args: argparse.Namespace) -> int:
    reg = REGISTRIES[args.what]
    entries = [{"name": e.name, **{k: (str(v) if isinstance(v, Path) else v) for k, v in e.meta.items()}} for e in reg]
    if args.what == "suites":
        for d, e in zip(entries, reg, strict=True):
            d["path"] = str(e.obj)
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    for d in entries:
        name = d.pop("name")
        if args.what == "methods":
            print(f"{name:12s} {d['family']:9s} {d['training']:10s} applies to {'/'.join(d['applies_to']):14s} {d['paper']}")
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
    run_dir = run_suite(
        suite, run_id=args.resume or args.run_id, results_dir=Path(args.results or RESULTS), command=" ".join(sys.argv)
    )
    png, md = write_summary(run_dir)
    import pandas as pd

    df = pd.read_parquet(run_dir / "results.parquet")
    failed = df[df["status"] != "ok"]
    print(f"\nresults: {run_dir / 'results.parquet'} ({len(df)} jobs, {len(failed)} failed)")
    print(f"run record: {run_dir / 'run.json'}")
    print(f"plot: {png}")
    print(f"table: {md}")
    for _, r in failed.iterrows():
        print(f"  FAILED {r['model']} {r['method']} {r['steps']} steps w={r['guidance']}: {r['error']}")
    return 1 if len(failed) else 0


def cmd_train(args: argparse.Namespace) -> int:
    from bench.train import train

    train(args.name, steps=args.steps, seed=args.seed, resume=not args.restart)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench",
        description="Benchmark accelerated samplers of diffusion and flow models: "
        "run a suite, get quality / NFE / FLOPs / latency per configuration.",
        epilog="Start with `bench run quick` (the demo suite), then look at results/quick/<run-id>/.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("list", help="list registered methods, models, metrics or suites")
    s.add_argument("what", choices=sorted(REGISTRIES))
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
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("train", help="train an embedded network (seeded, resumable) into bench/assets/")
    s.add_argument("name", choices=["digits-unet", "digits-dit", "digits-features"])
    s.add_argument("--steps", type=int, help="optimiser steps (default: the committed record's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    s.set_defaults(fn=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench.io import WeightsError
    from bench.suite import SuiteError

    try:
        return args.fn(args)
    except (SuiteError, UnknownNameError, WeightsError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
