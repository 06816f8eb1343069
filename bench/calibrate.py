"""``bench calibrate METHOD --model MODEL`` and ``bench build SUITE``: build artifacts ahead of a run.

Every trained or calibrated method declares its artifacts (:mod:`bench.artifacts`); a suite run
builds the missing ones itself, before the jobs that need them. These commands build them ahead:
``bench calibrate`` the artifacts of one method on one model (TeaCache's calibration, a GITS
schedule, a distilled student, ...), ``bench build`` every artifact a suite needs (on the suite's
executor: with Ray, several at once). Each prints where the artifacts are and what they cost.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from bench.adapter import MethodAdapter
from bench.artifacts import Artifact, ensure
from bench.registry import METHODS


def methods_with_artifacts() -> list[str]:
    """Registered methods that train or calibrate (a training class other than ``free``, or GITS)."""
    return sorted(e.name for e in METHODS if e.meta.get("training") != "free")


def parse_knobs(items: list[str] | None) -> dict[str, Any]:
    """``["name=value", ...]`` -> knobs, values read as YAML scalars (``0.2`` is a float, ``euler`` a string)."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--knob {item!r}: write it as NAME=VALUE, e.g. --knob calib_samples=16")
        out[name.strip()] = yaml.safe_load(value)
    return out


def calibrate(
    method: str,
    model: str,
    steps: int = 20,
    solver: str | None = None,
    knobs: dict[str, Any] | None = None,
    guidance: float | None = None,
    progress: bool = False,
) -> tuple[MethodAdapter, list[Artifact]]:
    """Get or build ``method``'s artifacts on ``model`` for ``steps`` steps (and ``guidance``, for a
    method whose artifact depends on it); returns the adapter and the artifacts."""
    from bench.models import build_model

    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    knobs = dict(knobs or {})
    if solver is not None:
        knobs["solver"] = solver
    adapter = METHODS.get(method)(**knobs)
    bundle = build_model(model)
    adapter.check(bundle, steps)
    specs = adapter.artifacts(bundle, steps, guidance)
    if not specs:
        raise ValueError(
            f"method {method!r} builds no artifact with these knobs; methods that train or calibrate: "
            f"{', '.join(methods_with_artifacts())} (and any solver with --knob schedule=gits)"
        )
    return adapter, [ensure(s, bundle, method=adapter, progress=progress) for s in specs]


def describe(a: Artifact) -> str:
    c = a.chain_cost
    state = "built" if a.built else "found (already built)"
    return (
        f"  {a.record.get('method')}:{a.record.get('name')} {a.key}: {state}\n    path: {a.path}\n"
        f"    cost (with its parents): {c.get('wall_s', 0):.2f} s wall on {c.get('device') or '?'}, "
        f"{c.get('optimizer_steps', 0)} optimiser steps, {c.get('teacher_rows', 0):,} teacher network rows, "
        f"{c.get('samples_drawn', 0):,} samples drawn"
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    try:
        adapter, arts = calibrate(args.method, args.model, args.steps, args.solver, parse_knobs(args.knob), args.guidance, True)
    except ValueError as e:
        raise SystemExit(f"bench calibrate: {e}") from None
    if args.json:
        out = [{"key": a.key, "path": str(a.path), "built": a.built, "cost": a.cost, "chain_cost": a.chain_cost} for a in arts]
        print(json.dumps({"method": args.method, "artifacts": out}, default=str))
        return 0
    print(f"{args.method} on {args.model}, {args.steps} steps:")
    for a in arts:
        print(describe(a))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from bench.runner import build_suite
    from bench.suite import load_suite

    suite = load_suite(args.suite)
    res = build_suite(
        suite, progress=not args.no_progress, executor=args.executor, workers=args.workers, threads=args.threads,
        address=args.address, device=args.device, retries=args.retries,
    )  # fmt: skip
    arts = res.get("artifacts", {})
    print(f"suite {suite.name}: {len(arts)} artifact(s) in {res.get('total_s', 0):.1f} s")
    for key, v in arts.items():
        cost = v.get("cost") or {}
        extra = f" ({cost.get('wall_s', 0):.1f} s, {cost.get('optimizer_steps', 0)} steps)" if cost else ""
        print(f"  {v.get('status'):10s} {key[:12]}  {v.get('label')}{extra}{'  ' + v['error'] if v.get('error') else ''}")
    return 3 if res.get("failed") else 0


def add_parser(sub: Any) -> None:
    """Add ``bench calibrate`` and ``bench build`` to the CLI's subparsers."""
    s = sub.add_parser("calibrate", help="build (once) a method's artifacts on a model and print where they are and their cost")
    s.add_argument("method", help="a method that trains or calibrates (teacache, magcache, block_caching, kd, ...)")
    s.add_argument("--model", required=True, help="a registered generative model (see `bench list models`)")
    s.add_argument("--steps", type=int, default=20, help="sampler steps the artifact is for (20)")
    s.add_argument("--guidance", type=float, help="the jobs' guidance scale, for a method whose artifact depends on it")
    s.add_argument("--solver", help="solver a cache runs under (default: the method's solver knob)")
    s.add_argument("--knob", action="append", metavar="NAME=VALUE", help="a knob, e.g. calib_samples=16 (repeatable)")
    s.add_argument("--json", action="store_true", help="print the artifacts' paths and costs as JSON")
    s.set_defaults(fn=cmd_calibrate)
    s = sub.add_parser("build", help="build every artifact a suite needs (students, calibrations) before running it")
    s.add_argument("suite", help="a registered suite name or a YAML path")
    s.add_argument("--executor", choices=["local", "ray"], help="where builds run (default: the suite's executor:, else local)")
    s.add_argument("--address", help="join this Ray cluster")
    s.add_argument("--workers", type=int, help="Ray actors")
    s.add_argument("--threads", type=int, help="torch threads per CPU worker")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--retries", type=int, default=2, help="times a build whose worker died is retried (it resumes) (2)")
    s.add_argument("--no-progress", action="store_true", help="no live progress display")
    s.set_defaults(fn=cmd_build)
