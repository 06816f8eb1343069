"""The metric-side commands of ``bench``: ``weights list|fetch|verify``, ``ref build|import|list``, ``prompts`` and ``mmhm``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_weights(args: argparse.Namespace) -> int:
    from bench import weights

    names = args.names or list(weights.CATALOGUE)
    if args.action == "list":
        rows = [weights.status(n, check=False) for n in names]
        if args.json:
            out = [
                {**weights.spec(r.name).__dict__, "env": weights.spec(r.name).env, "present": r.present, "location": r.path}
                for r in rows
            ]
            print(json.dumps(out, indent=2, default=list))
            return 0
        print(f"weights directory: {weights.weights_dir()} (set $BENCH_HOME to move it)\n")
        for r in rows:
            s = weights.spec(r.name)
            print(f"{r.name:26s} {'present' if r.present else 'absent':8s} {s.description}")
            print(f"{'':26s} used by: {', '.join(s.used_by)}")
            print(f"{'':26s} source:  {s.source}")
            print(f"{'':26s} sha256:  {s.sha256 or '-'} ({s.checksum_from})")
            print(f"{'':26s} path:    {r.path}   (override: ${s.env})")
        return 0
    if args.action == "fetch":
        if not args.names and not args.all:
            print("bench weights fetch: name the weights to fetch (see `bench weights list`), or pass --all", file=sys.stderr)
            return 2
        for n in names:
            p = weights.fetch(n, force=args.force, pin=args.pin)
            print(f"{n}: {p}")
        return 0
    bad = 0
    for n in names:
        r = weights.status(n)
        ok = "ok" if r.ok else ("ABSENT" if not r.present else "FAILED")
        print(f"{n:26s} {ok:7s} {r.path}: {r.detail}")
        bad += int(r.present and not r.ok) + int(args.strict and not r.present)
    return 1 if bad else 0


def cmd_ref(args: argparse.Namespace) -> int:
    from bench.metrics import refs  # the package: importing it registers every feature space

    if args.action == "list":
        for m in refs.listing():
            n = m.get("n")
            what = "statistics only" if m.get("stats_only") else "" if n is None else f"{n} images"
            res = f"{m['resolution']}px" if m.get("resolution") else ""
            src = str(m.get("source_sha256") or "")[:12]
            print(f"{m['refset']:20s} {m['space']:22s} {what:16s} {res:7s} {src:12s} {m['path']}")
        return 0
    if not args.refset:
        print(f"bench ref {args.action}: name the reference set (digits-train, digits-heldout, or a new name with --images DIR)")
        return 2
    if args.images and args.npz:
        print("bench ref build: give --images DIR or --npz FILE, not both", file=sys.stderr)
        return 2
    if args.action == "import" and not args.stats:
        print("bench ref import: give --stats FILE (an .npz with mu and sigma)", file=sys.stderr)
        return 2
    default = ["digits"] if args.refset in refs.BUILTIN else ["inception"]
    spaces = args.features.split(",") if args.features else default
    for space in spaces:
        try:
            if args.action == "import":
                path = refs.import_stats(args.refset, space, Path(args.stats))
            else:
                path = refs.build(args.refset, space, Path(args.images) if args.images else None, args.limit, args.device,
                                  Path(args.npz) if args.npz else None, args.resolution)  # fmt: skip
        except ValueError as e:
            print(f"bench ref {args.action}: {e}", file=sys.stderr)
            return 2
        meta = json.loads(path.with_suffix(".json").read_text())
        what = "statistics only" if meta.get("stats_only") else f"{meta['n']} images"
        res = f" at {meta['resolution']}px" if meta.get("resolution") else ""
        print(
            f"{args.refset} [{space}]: {what}{res}, {meta['dim']}-d, source sha256 {str(meta.get('source_sha256'))[:12]} -> {path}"
        )
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from bench import prompts

    names = args.names or list(prompts.PROMPT_SETS)
    if args.action == "fetch":
        if not args.names:
            print(f"bench prompts fetch: name the sets to fetch ({', '.join(prompts.PROMPT_SETS)})", file=sys.stderr)
            return 2
        for n in names:
            print(f"{n}: {prompts.fetch(n, force=args.force)}")
        return 0
    bad = 0
    for m in prompts.listing():
        if m["name"] not in names:
            continue
        print(f"{m['name']:16s} {m['status']}\n{'':16s} path:   {m['path']}\n{'':16s} source: {m['source']}")
        bad += m["status"].startswith("BAD")
    return 1 if bad and args.action == "verify" else 0


def cmd_mmhm(args: argparse.Namespace) -> int:
    from bench.metrics.mmhm import mmhm_run

    comps = tuple(args.components.split(",")) if args.components else None
    try:
        table, clipped = mmhm_run(
            Path(args.run),
            comps,
            Path(args.bounds) if args.bounds else None,
            Path(args.save_bounds) if args.save_bounds else None,
            args.by,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"bench mmhm: {e}", file=sys.stderr)
        return 2
    cols = [c for c in table.columns if c not in ("knobs",)]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nwritten: {Path(args.run) / 'mmhm.csv'}" + (f"; {clipped} value(s) clipped to the reused bounds" if clipped else ""))
    if args.save_bounds:
        print(f"bounds saved: {args.save_bounds} (reuse with --bounds)")
    return 0


def cmd_paired(args: argparse.Namespace) -> int:
    from bench.metrics.paired import paired_between

    try:
        rows, diffs = paired_between(Path(args.run), args.a, args.b, args.metric, args.bootstrap)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"bench paired: {e}", file=sys.stderr)
        return 2
    for tag, r in zip("AB", rows, strict=True):
        print(f"{tag}: {r['job_id']}  {r['model']} {r['method']} {r['knobs']} {r['steps']} steps w={r['guidance']:g}")
    print(f"paired over {diffs[0].n} shared seeds, {args.bootstrap} bootstrap draws (95% intervals):")
    for d in diffs:
        verdict = ("A better" if d.a_better else "B better") if d.significant else "no significant difference"
        print(
            f"  {d.metric:<12} A {d.a:.4g}  B {d.b:.4g}  A-B {d.diff.value:+.4g} [{d.diff.ci_low:+.4g}, {d.diff.ci_high:+.4g}]  {verdict}"
        )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``weights``, ``ref``, ``mmhm`` and ``paired`` to the ``bench`` command line."""
    s = sub.add_parser("weights", help="the metrics' weights: list them, fetch them into $BENCH_HOME, verify checksums")
    s.add_argument("action", choices=["list", "fetch", "verify"])
    s.add_argument("names", nargs="*", help="catalogue names (default: all for list/verify)")
    s.add_argument("--force", action="store_true", help="fetch again even if present")
    s.add_argument("--pin", action="store_true", help="pin the sha256 of a present copy that has no published checksum")
    s.add_argument("--all", action="store_true", help="fetch every entry")
    s.add_argument("--strict", action="store_true", help="verify: absent weights count as failures")
    s.add_argument("--json", action="store_true", help="list: the full catalogue as JSON")
    s.set_defaults(fn=cmd_weights)
    s = sub.add_parser("ref", help="reference statistics: build (once per reference set and feature space), import or list them")
    s.add_argument("action", choices=["build", "import", "list"])
    s.add_argument("refset", nargs="?", help="digits-train, digits-heldout, or a name for a folder of images (--images)")
    s.add_argument("--images", help="folder of real images (png/jpg/webp/bmp) for a new reference set")
    s.add_argument("--npz", help="dataset file of images (.npz: arr_0 uint8 NxHxWx3, labels arr_1; ADM's reference batches)")
    s.add_argument("--resolution", type=int, help="centre-crop and resize the images to RxR first (clean-fid's resize)")
    s.add_argument("--stats", help="import: an .npz of precomputed mu and sigma (MLPerf's val2014.npz)")
    s.add_argument("--features", help="comma-separated feature spaces: digits, inception, inception-pytorch-fid, clip-l14-336")
    s.add_argument("--limit", type=int, help="use at most this many images (sorted by path)")
    s.add_argument("--device", default="cpu", help="where the feature network runs (cpu, cuda)")
    s.set_defaults(fn=cmd_ref)
    s = sub.add_parser("prompts", help="prompt sets (PartiPrompts, DrawBench, COCO-2014 captions, GenEval): list, fetch, verify")
    s.add_argument("action", choices=["list", "fetch", "verify"])
    s.add_argument("names", nargs="*", help="prompt sets (default: all for list/verify)")
    s.add_argument("--force", action="store_true", help="fetch again even if present")
    s.set_defaults(fn=cmd_prompts)
    s = sub.add_parser("mmhm", help="MMHM (min-max harmonic mean of FID, IS, CLIP, PickScore) across a run's configurations")
    s.add_argument("run", help="a run directory (results/<suite>/<run-id>)")
    s.add_argument(
        "--components", help="comma-separated metric columns (default: the paper's four, else fid,inception_score,class_acc)"
    )
    s.add_argument("--bounds", help="reuse the min/max bounds saved from another run (JSON)")
    s.add_argument("--save-bounds", help="save this run's bounds (JSON) for later runs")
    s.add_argument("--by", help="normalise within groups of this column (e.g. model) instead of across the run")
    s.set_defaults(fn=cmd_mmhm)
    s = sub.add_parser("paired", help="paired difference of two jobs of a run that share seeds (bootstrap over the same draws)")
    s.add_argument("run", help="a run directory (results/<suite>/<run-id>) with the jobs' samples")
    s.add_argument("a", help="job A: a job id, or a spec such as model=digits-unet,method=dpmpp_2m,steps=10,guidance=1")
    s.add_argument("b", help="job B: a job id or a spec")
    s.add_argument("--metric", action="append", help="metric (repeatable; default: the run's metrics that need no reference)")
    s.add_argument("--bootstrap", type=int, default=200, help="bootstrap draws (200)")
    s.set_defaults(fn=cmd_paired)
