"""The command line starts without importing torch, diffusers, the methods or Ray: `bench --help`
shows every subcommand from stubs equal to the real parsers, and `bench list` answers from
bench.catalog with exactly what the real registries print. (The start time itself is measured in
benchmarks/test_bench_cli.py, not timed here.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import catalog
from bench.cli import HEAVY_SUBCOMMANDS, build_parser, main
from bench.paths import REPO

HEAVY = ("torch", "diffusers", "methods", "ray", "pandas", "duckdb", "transformers", "matplotlib")
LISTINGS = [[k] + j for k in catalog.KINDS for j in ([], ["--json"])]


def _python(code: str, home: Path) -> dict:
    """Run ``code`` in a fresh interpreter (HEAVY and LISTINGS defined); its last line of output as JSON."""
    env = {**os.environ, "BENCH_HOME": str(home)}
    code = f"HEAVY = {HEAVY!r}\nLISTINGS = {LISTINGS!r}\n" + code
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


CAPTURE = """
import contextlib, io, json, sys
from bench.cli import main
outs = {}
for argv in LISTINGS:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["list", *argv]) == 0
    outs[" ".join(argv)] = buf.getvalue()
"""


def test_help_imports_nothing_heavy(tmp_path):
    code = """
import contextlib, io, json, sys
from bench.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        main(["--help"])
    except SystemExit:
        pass
print(json.dumps({"help": buf.getvalue(), "heavy": [m for m in HEAVY if m in sys.modules]}))
"""
    got = _python(code, tmp_path)
    assert got["heavy"] == []
    for name in build_parser(full=True)._subparsers._group_actions[0].choices:
        assert f"\n    {name} " in got["help"], name


def test_lazy_parser_equals_the_full_one(capsys):
    assert build_parser().format_help() == build_parser(full=True).format_help()
    full = build_parser(full=True)._subparsers._group_actions[0]
    helps = {a.dest: a.help for a in full._choices_actions}
    for name, (_, _, help_line) in HEAVY_SUBCOMMANDS.items():
        assert helps[name] == help_line
        # the command itself gets its real parser
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out == full.choices[name].format_help()


@pytest.mark.slow
def test_list_from_the_catalogue_equals_the_registry(tmp_path):
    # the real registries, imported first (so `bench list` reads them), and the catalogues written
    full = _python(
        "from bench.registry import METHODS, MODELS, METRICS, SUITES\n"
        "for r in (METHODS, MODELS, METRICS, SUITES): r.names()\n"
        + CAPTURE
        + "import bench.catalog\nwith contextlib.redirect_stdout(io.StringIO()): bench.catalog.main()\n"
        "print(json.dumps(outs))",
        tmp_path,
    )
    fast = _python(
        CAPTURE + "print(json.dumps({'outs': outs, 'heavy': [m for m in HEAVY if m in sys.modules]}))",
        tmp_path,
    )
    assert fast["heavy"] == []
    assert fast["outs"] == full
    names = [d["name"] for d in json.loads(full["methods --json"])]
    assert "ddim" in names and "teacache" in names and len(names) > 40
    assert all(f"{n} " in full["methods"] for n in names)


def _copy_sources(root: Path) -> None:
    for pkg in ("bench", "methods"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copytree(REPO / "suites", root / "suites")


def test_catalogue_goes_cold_on_an_edit(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    root = tmp_path / "repo"
    _copy_sources(root)
    for kind, edit in (("methods", "methods/solvers/euler.py"), ("models", "bench/denoiser.py"), ("suites", "suites/quick.yaml")):
        srcs = catalog.sources(kind, root)
        assert edit in srcs
        entries = [{"name": "x", "description": kind}]
        catalog.write_catalog(kind, entries, srcs, root)
        assert catalog.read_catalog(kind, root) == entries
        f = root / edit
        f.write_text(f.read_text() + "\n# an edit\n")
        assert catalog.read_catalog(kind, root) is None  # cold: the next listing imports the registry
        assert catalog.read_catalog(kind, REPO) is None  # written for another checkout
    # a suite added
    srcs = catalog.sources("suites", root)
    catalog.write_catalog("suites", [{"name": "quick"}], srcs, root)
    assert catalog.read_catalog("suites", root) is not None
    (root / "suites" / "new.yaml").write_text("description: new\n")
    assert catalog.read_catalog("suites", root) is None
    # the methods' files are those the registry's code version covers, not the unrelated ones
    assert "bench/report/build.py" not in catalog.sources("methods", root)
