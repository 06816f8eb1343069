"""Malformed and hostile suites, generated, and a harness that runs them all in one process.

``cases()`` makes the suites: every field of the schema given values of the wrong type, out of
range, empty, non-finite or unsafe; method and model entries broken the same ways; and whole files
broken below the schema: not UTF-8, too large, nested too deep, alias bombs, recursive aliases,
duplicate keys, merge keys, tags, syntax errors, include cycles. Each case says what its one-line
error must name.

``python tests/fuzz_suites.py OUT.json`` (what tests/test_fuzz_suites.py runs, in one subprocess:
imports cost seconds, a case milliseconds) runs ``bench validate``, ``bench plan`` and ``bench run``
on every case in process, under an address-space limit of the process's size at the start plus
1 GiB and a 10 s alarm per case, and writes what each command returned and printed, the time it
took, the growth of the process's peak memory, and whether anything was written under the run's
results, store or $BENCH_HOME.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

GOOD = {
    "n_samples": 16,
    "batch_size": 8,
    "bootstrap": 5,
    "models": [{"name": "gmm", "options": {"dim": 2}}],
    "methods": ["ddim", "euler"],
    "steps": [3, 6],
    "guidance": [1.0],
    "metrics": ["exact_mse", "swd"],
}
GOOD_TEXT = yaml.safe_dump(GOOD, sort_keys=False)
LIMIT_BYTES = 1 << 30  # 1 GiB of growth per case at most
LIMIT_S = 10


@dataclass
class Case:
    name: str
    text: bytes
    expect: list[str]  # substrings the one-line error must contain
    extra: dict[str, bytes] = field(default_factory=dict)  # other files beside the suite (includes)


def _dump(doc: dict) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()


def _with(path: tuple, value, doc: dict | None = None) -> dict:
    """A deep copy of GOOD (or ``doc``) with the value at ``path`` replaced (or added)."""
    d = json.loads(json.dumps(doc or GOOD))
    cur = d
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return d


def _without(key: str) -> dict:
    d = json.loads(json.dumps(GOOD))
    d.pop(key)
    return d


NAN, INF = math.nan, math.inf


def field_cases() -> list[Case]:
    """Every field with values it must refuse (one problem per suite)."""
    out: list[Case] = []

    def add(name: str, path: tuple, value, *expect: str) -> None:
        out.append(Case(name, _dump(_with(path, value)), list(expect)))

    for i, v in enumerate([5, "", "../../escaped", "/tmp/abs", "a/b", ".hidden", "x" * 65, "naïve", "a b", None, ["x"], True]):
        add(f"name-{i}", ("name",), v, "name")
    for i, v in enumerate([5, ["x"], {"a": 1}, "x" * 20_001]):
        add(f"description-{i}", ("description",), v, "description")
    for i, v in enumerate([-1, 1.5, "0", True, 2**63, None]):
        add(f"seed-{i}", ("seed",), v, "seed")
    for i, v in enumerate([1, 0, -5, 1.5, "16", True, 10**7, None, [16]]):
        add(f"n_samples-{i}", ("n_samples",), v, "n_samples")
    for i, v in enumerate([0, -1, 2.5, "8", False, 10**9]):
        add(f"batch_size-{i}", ("batch_size",), v, "batch_size")
    for i, v in enumerate([-1, 0.5, "5", 10**6]):
        add(f"bootstrap-{i}", ("bootstrap",), v, "bootstrap")
    # models
    for i, v in enumerate([7, "gmm", {"gmm": {"dim": 2}}, [], None, [["gmm"]]]):
        add(f"models-{i}", ("models",), v, "models")
    m = ("models", 0)
    for i, (v, what) in enumerate(
        [
            (7, "models[0]"),
            ({"options": {"dim": 2}}, "models[0].name: missing"),
            ({"name": "nope"}, "unknown model 'nope'"),
            ({"name": "digits-features"}, "feature network"),
            ({"name": "../x"}, "not a safe name"),
            ({"name": "gmm", "options": 5}, "models[0].options"),
            ({"name": "gmm", "options": [1]}, "models[0].options"),
            ({"name": "gmm", "option": {"dim": 2}}, "did you mean 'options'"),
            ({"name": "gmm", "options": {"dim": "seven"}}, "models[0].options.dim: expected int"),
            ({"name": "gmm", "options": {"dim": 1}}, "models[0].options.dim: must be at least 2"),
            ({"name": "gmm", "options": {"dim": 1.5}}, "models[0].options.dim"),
            ({"name": "gmm", "options": {"dim": True}}, "models[0].options.dim"),
            ({"name": "gmm", "options": {"dim": 10**9}}, "models[0].options.dim: must be at most"),
            ({"name": "gmm", "options": {"prediction": "v"}}, "models[0].options.prediction"),
            ({"name": "gmm", "options": {"prediction": 5}}, "models[0].options.prediction"),
            ({"name": "gmm", "options": {"dims": 2}}, "did you mean 'dim'"),
            ({"name": "digits-unet", "options": {"weights": 5}}, "models[0].options.weights"),
            ({"name": "digits-unet", "options": {"weights": "missing.safetensors"}}, "file not found"),
            ({"name": "digits-unet", "options": {"dim": 2}}, "models[0].options.dim: unknown key"),
            ({"name": "diffusers", "options": {}}, "models[0].options.pipeline: missing"),
            ({"name": "diffusers", "options": {"pipeline": "a/b", "prompts": "a cat"}}, "models[0].options.prompts"),
            ({"name": "diffusers", "options": {"pipeline": "a/b", "prompts": []}}, "models[0].options.prompts: is empty"),
            ({"name": "diffusers", "options": {"pipeline": "a/b", "prompts": [5]}}, "models[0].options.prompts[0]"),
            ({"name": "diffusers", "options": {"pipeline": "a/b"}}, "prompts"),
            ({"name": "diffusers", "options": {"pipeline": "a/b", "prompts": ["x"], "height": -1}}, "options.height"),
            ({"name": "diffusers", "options": {"pipeline": "a/b", "prompts": ["x"], "height": "512"}}, "options.height"),
            ({"name": "diffusers", "options": {"pipeline": "a/b", "prompts": ["x"], "dtype": "float8"}}, "options.dtype"),
            ({"name": "diffusers", "options": {"pipeline": "a/b", "prompts": ["x"], "device": "tpu"}}, "options.device"),
            ({"name": "diffusers", "options": {"pipeline": "a/b", "prompts": ["x"], "download": "yes"}}, "options.download"),
            ({"name": "diffusers", "options": {"pipeline": "", "prompts": ["x"]}}, "options.pipeline"),
        ]
    ):
        add(f"model-entry-{i}", m, v, what)
    add("models-too-many", ("models",), [{"name": "gmm", "options": {"dim": 2}}] * 101, "models: has 101 entries")
    # methods
    for i, v in enumerate([5, "euler", {"ddim": {"knobs": {"eta": [0.5]}}}, [], None, [["ddim"]]]):
        add(f"methods-{i}", ("methods",), v, "methods")
    e = ("methods", 0)
    for i, (v, what) in enumerate(
        [
            (5, "methods[0]"),
            ({"knobs": {}}, "methods[0].name: missing"),
            ({"name": "eulr"}, "did you mean 'euler'"),
            ({"name": "../x"}, "not a safe name"),
            ({"name": None}, "methods[0].name"),
            ({"name": "ddim", "knob": {"eta": [0.5]}}, "did you mean 'knobs'"),
            ({"name": "ddim", "knobs": 5}, "methods[0].knobs"),
            ({"name": "ddim", "knobs": [0.5]}, "methods[0].knobs"),
            ({"name": "ddim", "knobs": {"eta": []}}, "methods[0].knobs.eta: is empty"),
            ({"name": "ddim", "knobs": {"eta": [NAN]}}, "methods[0].knobs.eta[0]: expected a finite number"),
            ({"name": "ddim", "knobs": {"eta": [INF]}}, "methods[0].knobs.eta[0]: expected a finite number"),
            ({"name": "ddim", "knobs": {"eta": NAN}}, "methods[0].knobs.eta[0]"),
            ({"name": "ddim", "knobs": {"eta": [2.0]}}, "methods[0].knobs.eta[0]: knob 'eta' must be in"),
            ({"name": "ddim", "knobs": {"eta": ["x"]}}, "methods[0].knobs.eta[0]: knob 'eta' must be float"),
            ({"name": "ddim", "knobs": {"eta": [{"a": 1}]}}, "methods[0].knobs.eta[0]"),
            ({"name": "ddim", "knobs": {"eta": [[0.5]]}}, "methods[0].knobs.eta[0]"),
            ({"name": "ddim", "knobs": {"eta": ["x" * 300]}}, "methods[0].knobs.eta[0]"),
            ({"name": "ddim", "knobs": {"nope": [1]}}, "has no knob 'nope'"),
            ({"name": "ddim", "knobs": {"": [1]}}, "not a knob name"),
            ({"name": "ddim", "knobs": {"schedule": ["cosine"]}}, "methods[0].knobs.schedule[0]"),
            ({"name": "ddim", "steps": []}, "methods[0].steps: is empty"),
            ({"name": "ddim", "steps": [0]}, "methods[0].steps[0]: must be at least 1"),
            ({"name": "ddim", "steps": ["3"]}, "methods[0].steps[0]"),
            ({"name": "ddim", "steps": [1.5]}, "methods[0].steps[0]"),
            ({"name": "ddim", "steps": None}, "methods[0].steps"),
            ({"name": "ddim", "knobs": {"eta": list(range(1001))}}, "methods[0].knobs.eta: has 1001 entries"),
        ]
    ):
        add(f"method-entry-{i}", e, v, what)
    # lists of numbers
    for i, v in enumerate([[], [0], [-1], [1.5], ["3"], [True], "3", [10**6], None, {"a": 1}, [None], list(range(1, 1002))]):
        add(f"steps-{i}", ("steps",), v, "steps")
    for i, v in enumerate([[], [NAN], [INF], [-INF], [-1], ["two"], [True], "1.0", [1e4], None, [None], {"w": 1}]):
        add(f"guidance-{i}", ("guidance",), v, "guidance")
    for i, v in enumerate([None, "exact_mse", [5], ["nope"], [["x"]], {"exact_mse": 1}]):
        add(f"metrics-{i}", ("metrics",), v, "metrics")
    for i, v in enumerate(["swd", ["nope"], [5], None]):
        add(f"optional_metrics-{i}", ("optional_metrics",), v, "optional_metrics")
    for i, v in enumerate([5, [], {"warmup": True}, {"warmup": -1}, {"warmup": 1.5}, {"warmp": 1}, {"warmup": 1, "x": 2}, None]):
        add(f"timing-{i}", ("timing",), v, "timing")
    for i, v in enumerate(["dask", 5, None, ["local"]]):
        add(f"executor-{i}", ("executor",), v, "executor")
    for i, v in enumerate([5, "../x", "", "a b", "/etc", ["x"], "x" * 100, "..", True]):
        add(f"reference_set-{i}", ("reference_set",), v, "reference_set")
    for i, v in enumerate(
        [
            5,
            "ddim",
            [],
            {"method": "nope"},
            {"steps": "x"},
            {"steps": 0},
            {"guidance": NAN},
            {"guidance": -1},
            {"foo": 1},
            [5],
            {"knobs": 5},
            {"model": ""},
            {"model": 5},
            {"knobs": {"eta": INF}},
        ]
    ):
        add(f"reference-{i}", ("reference",), v, "reference")
    for key in ("colour", "Models", "guidence", "knobs", "steps ", "include_"):
        add(f"unknown-key-{key.strip()}", (key,), 1, "unknown key")
    for key in ("models", "methods", "steps", "guidance", "metrics"):
        out.append(Case(f"missing-{key}", _dump(_without(key)), [f"{key}: missing"]))
    # valid piece by piece, wrong together
    out.append(Case("guidance-on-gmm", _dump(_with(("guidance",), [2.0])), ["is unconditional"]))
    out.append(Case("image-metric-on-gmm", _dump(_with(("metrics",), ["fid"])), ["measures image data"]))
    out.append(Case("method-applies-to-none", _dump(_with(("methods",), ["deepcache"])), ["no model of this suite is one"]))
    grid = {"name": "ddim", "knobs": {"eta": [i / 1000 for i in range(1000)], "schedule": ["uniform", "karras", "logsnr"]}}
    big = _with(("methods",), [grid, grid])
    big["steps"] = list(range(1, 101))
    out.append(Case("grid-explosion", _dump(big), ["expands to 600000 jobs"]))
    return out


def _laughs(levels: int, width: int) -> str:
    """Anchors ``l0`` .. ``l<levels-1>``, each ``width`` aliases of the one before: ``width**levels`` values expanded."""
    lines = ["lol0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _good_without(key: str) -> str:
    return yaml.safe_dump(_without(key), sort_keys=False)


def yaml_cases() -> list[Case]:
    """Files broken below the schema."""
    good = GOOD_TEXT
    out = [
        Case("latin1", (good + "description: café\n").encode("latin-1"), ["not UTF-8", "line 19"]),
        Case("utf16", (good).encode("utf-16"), ["not UTF-8"]),
        Case("bad-continuation", good.encode() + b"description: \xc3\x28\n", ["not UTF-8"]),
        Case("random-bytes", bytes(range(256)) * 4, ["not UTF-8"]),
        Case("nul-char", (good + "description: a\x00b\n").encode(), ["not valid YAML"]),
        Case("control-char", (good + "description: a\x07b\n").encode(), ["not valid YAML"]),
        Case("five-mb", (good + "description: " + "x" * 5_000_000 + "\n").encode(), ["larger than 1024 KiB"]),
        Case("just-over-limit", (good + "#" * (1 << 20) + "\n").encode(), ["larger than 1024 KiB"]),
        Case("many-values", (good + "description: [" + ", ".join(["1"] * 150_000) + "]\n").encode(), ["more than 20000 values"]),
        Case(
            "near-limit-comment",
            (good + "#" * 1_000_000 + "\nexecutor: dask\n").encode(),
            ["executor: expected 'local' or 'ray'"],
        ),
        Case(
            "near-limit-scalar",
            (good + "reference_set: " + "x" * 1_000_000 + "\n").encode(),
            ["reference_set: is 1000000 characters"],
        ),
        Case(
            "near-limit-values",
            (good + "description: [" + ", ".join(["ab"] * 19_900) + "]\n").encode(),
            ["description: expected str"],
        ),
        Case("empty", b"", ["the file is empty"]),
        Case("only-comments", b"# nothing here\n", ["the file is empty"]),
        Case("top-list", b"- gmm\n- ddim\n", ["the top level must be a mapping"]),
        Case("top-scalar", b"hello\n", ["the top level must be a mapping"]),
        Case("top-int", b"7\n", ["the top level must be a mapping"]),
        Case("two-documents", (good + "---\n" + good).encode(), ["not valid YAML", "single document"]),
        Case("huge-int", good.replace("bootstrap: 5", "bootstrap: " + "9" * 5000).encode(), ["4300 digits"]),
        Case("int-key", (good + "1: 2\n").encode(), ["keys must be strings"]),
        Case("null-key", (good + "null: 2\n").encode(), ["keys must be strings"]),
        Case("bool-key", (good + "yes: 2\n").encode(), ["keys must be strings"]),
        Case("complex-key", (good + "? [a, b]\n: c\n").encode(), ["keys must be strings"]),
        Case("dup-top", (good + "steps: [4]\n").encode(), ["duplicate key 'steps'"]),
        Case("dup-entry", good.replace("- ddim", "- {name: ddim, name: euler}").encode(), ["duplicate key 'name'"]),
        Case("dup-options", good.replace("dim: 2", "dim: 2\n    dim: 3").encode(), ["duplicate key 'dim'"]),
        Case("dup-timing", (good + "timing: {warmup: 1, warmup: 2}\n").encode(), ["duplicate key 'warmup'"]),
        Case("merge-key", (good + "timing: {<<: {warmup: 1}}\n").encode(), ["merge keys"]),
        Case(
            "merge-bomb",
            (
                "a: &a {x: 1, y: 2}\n"
                + "".join(f"m{i}: &m{i} {{<<: [*{'a' if i == 0 else f'm{i - 1}'}]}}\n" for i in range(30))
                + good
            ).encode(),
            ["aliases expanded"],
        ),
        Case(
            "python-apply",
            (_good_without("steps") + "steps: !!python/object/apply:os.system ['echo hi']\n").encode(),
            ["not valid YAML", "python"],
        ),
        Case("python-name", (_good_without("steps") + "steps: !!python/name:os.system ''\n").encode(), ["not valid YAML"]),
        Case("python-module", (good + "description: !!python/module:os ''\n").encode(), ["not valid YAML"]),
        Case("custom-tag", (good + "description: !shell 'rm -rf /'\n").encode(), ["not valid YAML"]),
        Case("binary-name", (good + "name: !!binary aGVsbG8=\n").encode(), ["name: expected str, got bytes"]),
        Case("set-steps", good.replace("steps:\n- 3\n- 6", "steps: !!set {3: null, 6: null}").encode(), ["keys must be strings"]),
        Case("timestamp-seed", (good + "seed: 2001-12-14\n").encode(), ["seed: expected int"]),
        Case("omap-timing", (good + "timing: !!omap [{warmup: 1}]\n").encode(), ["timing"]),
        Case("unclosed", (good + "steps2: [1, 2\n").encode(), ["not valid YAML"]),
        Case("tab-indent", good.replace("  options", "\toptions").encode(), ["not valid YAML"]),
        Case("bad-indent", good.replace("- ddim", "   - ddim").encode(), ["not valid YAML"]),
        Case("unterminated", (good + "description: 'abc\n").encode(), ["not valid YAML"]),
        Case("value-colon", (good + "description: a: b\n").encode(), ["not valid YAML"]),
        Case("undefined-alias", (_good_without("steps") + "steps: *nowhere\n").encode(), ["not valid YAML", "undefined alias"]),
        Case("directive", ("%YAML 9.9\n---\n" + good).encode(), ["not valid YAML"]),
    ]
    for depth in (25, 100, 1000, 100_000):
        out.append(
            Case(
                f"deep-flow-{depth}",
                (good + "description: " + "[" * depth + "]" * depth + "\n").encode(),
                ["nest"],
            )
        )
    out.append(
        Case(
            "deep-map",
            (good + "description:\n" + "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "x\n").encode(),
            ["nested more than 24"],
        )
    )
    out.append(
        Case("deep-options", good.replace("dim: 2", "dim: " + "{a: " * 30 + "1" + "}" * 30).encode(), ["nested more than 24"])
    )
    for key in ("steps", "methods", "metrics", "guidance", "models"):
        out.append(
            Case(f"laughs-{key}", (_laughs(9, 9) + _good_without(key) + f"{key}: *l8\n").encode(), ["more than 20000 values"])
        )
    out.append(Case("laughs-description", (_laughs(9, 9) + good + "description: *l8\n").encode(), ["more than 20000 values"]))
    out.append(
        Case(
            "laughs-knobs",
            (_laughs(9, 9) + _good_without("methods") + "methods: [{name: ddim, knobs: {eta: *l8}}]\n").encode(),
            ["more than 20000 values"],
        )
    )
    out.append(
        Case("laughs-wide", (_laughs(3, 1000) + _good_without("steps") + "steps: *l2\n").encode(), ["more than 20000 values"])
    )
    deep_alias = "d0: &d0 [[[[[[x]]]]]]\n" + "".join(f"d{i}: &d{i} [[[[[[*d{i - 1}]]]]]]\n" for i in range(1, 6)) + good
    out.append(Case("alias-depth", deep_alias.encode(), ["nested more than 24", "aliases expanded"]))
    out.append(Case("recursive-alias", (_good_without("steps") + "steps: &r [3, *r]\n").encode(), ["recursive alias"]))
    out.append(Case("recursive-map-alias", (good + "timing: &t {warmup: *t}\n").encode(), ["recursive alias"]))
    # includes
    out.append(Case("include-self", ("include: s.yaml\n" + good).encode(), ["includes itself in a cycle"]))
    out.append(Case("include-mutual", ("include: a.yaml\n" + good).encode(), ["cycle"], {"a.yaml": b"include: s.yaml\n"}))
    out.append(Case("include-int", ("include: 5\n" + good).encode(), ["include: must be a file name"]))
    out.append(Case("include-list", ("include: [a.yaml]\n" + good).encode(), ["include: must be a file name"]))
    out.append(Case("include-missing", ("include: nowhere.yaml\n" + good).encode(), ["file not found", "nowhere.yaml"]))
    out.append(Case("include-dir", ("include: sub\n" + good).encode(), ["file not found"], {"sub/x.yaml": b"a: 1\n"}))
    out.append(Case("include-dev-zero", ("include: /dev/zero\n" + good).encode(), ["file not found"]))
    out.append(
        Case(
            "include-latin1",
            ("include: a.yaml\n" + good).encode(),
            ["not UTF-8"],
            {"a.yaml": "description: café\n".encode("latin-1")},
        )
    )
    out.append(
        Case("include-toplist", ("include: a.yaml\n" + good).encode(), ["the top level must be a mapping"], {"a.yaml": b"- 1\n"})
    )
    out.append(Case("include-big", ("include: a.yaml\n" + good).encode(), ["larger than 1024 KiB"], {"a.yaml": b"#" * (2 << 20)}))
    out.append(Case("include-brings-bad", ("include: a.yaml\n" + good).encode(), ["executor"], {"a.yaml": b"executor: dask\n"}))
    chain = {f"i{k}.yaml": f"include: i{k + 1}.yaml\n".encode() for k in range(12)}
    chain["i12.yaml"] = b"seed: 0\n"
    out.append(Case("include-chain", ("include: i0.yaml\n" + good).encode(), ["more than 8 files deep"], chain))
    return out


def cases() -> list[Case]:
    return field_cases() + yaml_cases()


# --- the harness ------------------------------------------------------------------------------


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"over {LIMIT_S} s")


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def run_all(out_json: Path) -> None:
    import bench.cli
    import bench.plan  # noqa: F401  (imported once, before the limits: `bench plan` and `bench run` use them)
    import bench.runner  # noqa: F401

    home = Path(os.environ["BENCH_HOME"])
    home_before = _tree(home)
    with tempfile.TemporaryDirectory() as tmp:  # warm up: the registries load their modules on first use
        (Path(tmp) / "good.yaml").write_text(GOOD_TEXT)
        with contextlib.redirect_stdout(io.StringIO()):
            assert bench.cli.main(["validate", str(Path(tmp) / "good.yaml")]) == 0
    limit = _vm_size() + LIMIT_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k, case in enumerate(cases()):
            d = Path(tmp) / f"c{k}"
            d.mkdir()
            for rel, data in case.extra.items():
                (d / rel).parent.mkdir(parents=True, exist_ok=True)
                (d / rel).write_bytes(data)
            path = d / "s.yaml"
            path.write_bytes(case.text)
            res, store = d / "results", d / "store"
            commands = {
                "validate": ["validate", str(path)],
                "plan": ["plan", str(path), "--no-probe", "--results", str(res)],
                "run": ["run", str(path), "--results", str(res), "--store", str(store), "--no-progress"],
            }
            rec = {"name": case.name, "expect": case.expect, "commands": {}}
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            for cmd, argv in commands.items():
                err, outp = io.StringIO(), io.StringIO()
                t0 = time.perf_counter()
                signal.alarm(LIMIT_S)
                try:
                    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outp):
                        rc = bench.cli.main(argv)
                except BaseException as e:  # noqa: BLE001  (a crash is what this harness looks for)
                    rc = f"raised {type(e).__name__}: {str(e)[:300]}"
                finally:
                    signal.alarm(0)
                rec["commands"][cmd] = {"rc": rc, "stderr": err.getvalue()[-2000:], "seconds": time.perf_counter() - t0}
            rec["peak_growth_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
            rec["written"] = _tree(res) + _tree(store)
            results.append(rec)
    summary = {
        "cases": results,
        "total_s": time.perf_counter() - t_all,
        "peak_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0,
        "address_space_limit_bytes": limit,
        "bench_home_written": sorted(set(_tree(home)) - set(home_before)),
    }
    out_json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))
