"""``bench calibrate METHOD --model MODEL``: build (once) and report a method's calibration artifact.

A method of training class ``calibration`` (TeaCache, MagCache, Block Caching, ...) implements
``calibrate(bundle, steps)``: it gets or builds its calibration in the artifact store
(``$BENCH_HOME/artifacts``) under a spec of (method, model, weights, solver, steps, calibration
knobs) and keeps it; its ``prepare`` does the same, so a suite run needs no separate calibrate
call and every job of the same spec shares one calibration. This command runs that step alone and
prints where the artifact is and what it cost (``train_cost()``: wall seconds, teacher evaluations).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from bench.adapter import MethodAdapter
from bench.registry import METHODS


def calibrated_methods() -> list[str]:
    """Registered methods that have a calibration step."""
    return sorted(e.name for e in METHODS if e.meta.get("training") == "calibration" and hasattr(e.obj, "calibrate"))


def parse_knobs(items: list[str] | None) -> dict[str, Any]:
    """``["name=value", ...]`` -> knobs, values read as YAML scalars (``0.2`` is a float, ``euler`` a string)."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--knob {item!r}: write it as NAME=VALUE, e.g. --knob calib_samples=16")
        out[name.strip()] = yaml.safe_load(value)
    return out


def artifact_location(result: Any) -> tuple[Path | None, bool | None]:
    """Where a ``calibrate`` result's artifact lies, and whether this call built it."""
    art = getattr(result, "artifact", result)
    if isinstance(art, dict):
        return (Path(art["path"]) if "path" in art else None), art.get("built")
    return getattr(art, "path", None), getattr(art, "built", None)


def calibrate(
    method: str, model: str, steps: int = 20, solver: str | None = None, knobs: dict[str, Any] | None = None
) -> tuple[MethodAdapter, Any]:
    """Get or build ``method``'s calibration on ``model`` for ``steps`` steps; returns the adapter and the result."""
    from bench.models import build_model

    names = calibrated_methods()
    if method not in names:
        METHODS.get(method)  # an unknown name fails here with the closest valid ones
        raise ValueError(f"method {method!r} has no calibration step; methods that calibrate: {', '.join(names) or 'none'}")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    knobs = dict(knobs or {})
    if solver is not None:
        knobs["solver"] = solver
    adapter = METHODS.get(method)(**knobs)
    bundle = build_model(model)
    return adapter, adapter.calibrate(bundle, steps)


def cmd_calibrate(args: argparse.Namespace) -> int:
    try:
        adapter, result = calibrate(args.method, args.model, args.steps, args.solver, parse_knobs(args.knob))
    except ValueError as e:
        raise SystemExit(f"bench calibrate: {e}") from None
    path, built = artifact_location(result)
    cost = adapter.train_cost()
    if args.json:
        print(json.dumps({"method": args.method, "path": str(path), "built": built, "train_cost": cost}, default=str))
        return 0
    state = "built" if built else "found (already built)"
    print(f"{args.method} calibration on {args.model}, {args.steps} steps, solver {adapter.config.get('solver')}: {state}")
    print(f"  artifact: {path}")
    print(f"  cost: {cost['wall_s']:.2f} s wall, {cost['teacher_evals']} teacher evaluations")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``bench calibrate`` to the CLI's subparsers."""
    s = sub.add_parser("calibrate", help="build (once) a calibrated method's artifact and print where it is and its cost")
    s.add_argument("method", help="a method of training class calibration (teacache, magcache, ...)")
    s.add_argument("--model", required=True, help="a registered generative model (see `bench list models`)")
    s.add_argument("--steps", type=int, default=20, help="sampler steps the calibration is for (20)")
    s.add_argument("--solver", help="solver the cache runs under (default: the method's solver knob)")
    s.add_argument("--knob", action="append", metavar="NAME=VALUE", help="a calibration knob, e.g. calib_samples=16 (repeatable)")
    s.add_argument("--json", action="store_true", help="print the artifact path and cost as JSON")
    s.set_defaults(fn=cmd_calibrate)
