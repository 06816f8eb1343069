"""``bench env`` and ``bench vbench``: the isolated environments of the metrics whose packages clash
with bench's own (:mod:`bench.envs`). Nothing heavy is imported to build the parsers."""

from __future__ import annotations

import argparse
import json
import sys


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _summary(manifest: dict) -> str:
    return (
        f"{manifest['name']}: ready (python {manifest['python']}, {len(manifest['freeze'])} packages, "
        f"made {manifest['created_utc']} in {manifest['setup_seconds']:.0f} s)"
    )


def cmd_env_setup(args: argparse.Namespace) -> int:
    from bench import envs

    m = envs.setup(args.name, force=args.force, log=_log)
    print(_summary(m))
    print(f"  at {envs.env_path(args.name)}; manifest {envs.env_path(args.name) / envs.MANIFEST}")
    return 0


def cmd_env_status(args: argparse.Namespace) -> int:
    from bench import envs

    names = [args.name] if args.name else list(envs.ENVS)
    out = []
    for n in names:
        st = envs.status(n)
        row = {"name": n, "state": st.state, "path": str(st.path), "setup": envs.spec(n).command}
        if st.manifest:
            row.update(created_utc=st.manifest["created_utc"], setup_seconds=st.manifest["setup_seconds"])
        out.append(row)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out:
            extra = (
                f" (made {r['created_utc']} in {r['setup_seconds']:.0f} s)"
                if "created_utc" in r
                else f"; make it: `{r['setup']}`"
            )
            print(f"{r['name']:<12} {r['state']:<10} {r['path']}{extra}")
    return 0


def cmd_env_fetch(args: argparse.Namespace) -> int:
    from bench.metrics import preference

    still = preference.fetch(args.name)
    if still:
        print("still missing: " + "; ".join(still), file=sys.stderr)
        return 1
    print(f"{args.name}: weights present")
    return 0


def cmd_vbench_setup(args: argparse.Namespace) -> int:
    args.name = "vbench"
    return cmd_env_setup(args)


def cmd_vbench_fetch(args: argparse.Namespace) -> int:
    from bench.metrics import vbench

    print(f"vbench weights in {vbench.fetch(args.dimensions)}")
    return 0


def cmd_vbench_status(args: argparse.Namespace) -> int:
    from bench.metrics import vbench

    dims = args.dimensions or list(vbench.DIMENSIONS)
    missing = vbench.missing_weights(dims)
    for d in dims:
        print(f"{d:<24} " + ("missing: " + "; ".join(missing[d]) if d in missing else "ready"))
    if missing:
        print(f"fetch: `{vbench.FETCH_COMMAND} {' '.join(missing)}`")
    return 0


def add_parsers(sub) -> None:
    from bench.envs import ENVS

    env = sub.add_parser("env", help="isolated environments of metrics whose packages clash with bench's (setup, status, fetch)")
    es = env.add_subparsers(dest="env_cmd", required=True)
    s = es.add_parser("setup", help="make (or resume, or check) an isolated environment with its package's own pins")
    s.add_argument("name", choices=list(ENVS))
    s.add_argument("--force", action="store_true", help="remove and make it again")
    s.set_defaults(fn=cmd_env_setup)
    s = es.add_parser("status", help="ready / absent / incomplete / stale, per environment")
    s.add_argument("name", nargs="?", choices=list(ENVS))
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_env_status)
    s = es.add_parser(
        "fetch",
        help="download a preference metric's weights with its package's own downloader (network; vbench: `bench vbench fetch`)",
    )
    s.add_argument("name", choices=[n for n in ENVS if n != "vbench"])
    s.set_defaults(fn=cmd_env_fetch)

    vb = sub.add_parser("vbench", help="VBench in its own environment (setup, fetch, status)")
    vs = vb.add_subparsers(dest="vbench_cmd", required=True)
    s = vs.add_parser("setup", help="make the vbench environment (vbench 0.1.5 and its pins), or check it")
    s.add_argument("--force", action="store_true", help="remove and make it again")
    s.set_defaults(fn=cmd_vbench_setup)
    s = vs.add_parser("fetch", help="download dimensions' weights with vbench's own downloader (network)")
    s.add_argument("dimensions", nargs="+")
    s.set_defaults(fn=cmd_vbench_fetch)
    s = vs.add_parser("status", help="which dimensions have their weights in vbench's cache")
    s.add_argument("dimensions", nargs="*")
    s.set_defaults(fn=cmd_vbench_status)
