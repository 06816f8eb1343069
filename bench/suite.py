"""Suites: YAML files parsed (``yaml.safe_load``) into a validated spec and expanded into jobs.

Every error names its YAML path and the fix; unknown names list the closest valid ones.
Only registered names are ever looked up: a suite cannot make bench import or run code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from bench.adapter import KnobError
from bench.codeversion import code_version
from bench.paths import REPO
from bench.registry import METHODS, METRICS, MODELS, SUITES, UnknownNameError

SUITE_DIR = REPO / "suites"
TRAINED_CLASSES = ("finetune", "full")  # methods whose students could memorise the training data
KEYS = {
    "name": "suite name (defaults to the file name)",
    "description": "free text",
    "include": "another suite file to start from (relative to this one)",
    "seed": "int, base seed; sample k uses (seed, k)",
    "n_samples": "int, samples per job",
    "batch_size": "int, samples per sampler call",
    "bootstrap": "int, bootstrap resamples for confidence intervals",
    "models": "list of model names or {name, options}",
    "methods": "list of method names or {name, knobs: {knob: [values]}, steps: [ints] (default: the suite's steps)}",
    "steps": "list of ints",
    "guidance": "list of floats (1.0 = no classifier-free guidance)",
    "metrics": "list of metric names",
    "optional_metrics": "list of metric names recorded as missing (not failed) when they cannot run",
    "timing": "{warmup: int}",
    "executor": "local or ray (bench run --executor overrides it)",
    "reference_set": "reference set of the set metrics: digits-train or digits-heldout for fid/kid/precision/recall on "
    "digits (default digits-train; digits-heldout when the suite has a trained method), or the real-image set of "
    "fid_inception/kid_inception/cmmd (see `bench ref list`)",
    "reference": "{method, steps, guidance[, knobs][, model]} or a list of them: the reference configuration for "
    "speedup at matched quality in reports (default: the highest-NFE training-free solver)",
}


class SuiteError(ValueError):
    """All problems found in a suite, one per line, each with its YAML path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"suite {source} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name[k=v,...]``, short enough for tables and figures: a list shows as its length and a
        hash of its items (``prompts=3#1a2b3c``), a filesystem path as its last part."""
        opts = ",".join(f"{k}={_short(v)}" for k, v in sorted(self.options.items()) if k != "weights")
        return f"{self.name}[{opts}]" if opts else self.name


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return f"{len(v)}#{hashlib.sha256(json.dumps(list(v), default=str).encode()).hexdigest()[:6]}"
    if isinstance(v, str) and v.startswith(("/", "./", "../", "~")):
        return Path(v).name or v
    return str(v)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    knob_grid: dict[str, list[Any]] = field(default_factory=dict)
    steps: list[int] | None = None  # this method's step counts (None: the suite's)


@dataclass
class Suite:
    name: str
    source: str
    models: list[ModelSpec]
    methods: list[MethodSpec]
    steps: list[int]
    guidance: list[float]
    metrics: list[str]
    optional_metrics: list[str] = field(default_factory=list)
    seed: int = 0
    n_samples: int = 256
    batch_size: int = 64
    bootstrap: int = 50
    warmup: int = 1
    description: str = ""
    executor: str = "local"
    reference: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        d["reference_set"] = self.reference_set
        return d

    @property
    def reference_set(self) -> str | None:
        """The reference set of the set metrics (FID, KID, precision, recall): the suite's
        ``reference_set``, else ``digits-heldout`` for a suite with a trained method (a student can
        memorise the teachers' training digits, which a training-set reference would reward), else
        None (the metrics' own default, the training digits)."""
        explicit = self.raw.get("reference_set")
        if explicit:
            return str(explicit)
        trained = any(METHODS.entry(m.name).meta["training"] in TRAINED_CLASSES for m in self.methods)
        return "digits-heldout" if trained else None


@dataclass(frozen=True)
class Job:
    """One point of the sweep: everything that determines its output."""

    model: ModelSpec
    method: str
    knobs: tuple[tuple[str, Any], ...]
    steps: int
    guidance: float
    seed: int
    n_samples: int
    batch_size: int

    def key(self, model_hash: str) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "model_options": {k: v for k, v in self.model.options.items() if k != "weights"},
            "model_weights": model_hash,
            "method": self.method,
            "method_code": method_code_hash(self.method),
            "knobs": dict(self.knobs),
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "n_samples": self.n_samples,
        }

    def job_id(self, model_hash: str) -> str:
        """Hash of what determines the output (batch size does not: per-sample seeds)."""
        blob = json.dumps(self.key(model_hash), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@cache
def method_code_hash(name: str) -> str:
    """Version of a method's code: every project file its module imports, transitively (:mod:`bench.codeversion`)."""
    return code_version(METHODS.get(name).__module__)


def suite_path(name_or_path: str | Path) -> Path:
    """A registered suite name (``quick``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise SuiteError(str(p), [f"file not found: {p}; registered suites: {', '.join(SUITES.names())}"])
        return p
    return SUITES.get(str(name_or_path))


def _load_yaml(path: Path, where: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise SuiteError(where, [f"{where}: file not found: {path}; fix the path (relative to the including file)"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SuiteError(str(path), [f"not valid YAML: {e}"]) from e
    if not isinstance(data, dict):
        raise SuiteError(str(path), [f"top level must be a mapping of {', '.join(KEYS)}"])
    inc = data.pop("include", None)
    if inc is not None:
        if not isinstance(inc, str):
            raise SuiteError(str(path), ["include: must be a file name (string)"])
        target = (path.parent / inc).resolve()
        if target in chain:
            raise SuiteError(str(path), [f"include: {inc} includes itself in a cycle"])
        base = _load_yaml(target, f"{path}: include", (*chain, target))
        data = {**base, **data}
    return data


def load_suite(name_or_path: str | Path) -> Suite:
    """Read, validate and resolve a suite; raises :class:`SuiteError` listing every problem."""
    path = suite_path(name_or_path)
    raw = _load_yaml(path, str(path), (path.resolve(),))
    problems: list[str] = []

    def typed(key: str, typ: type, default: Any, minimum: int | None = None) -> Any:
        v = raw.get(key, default)
        ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            problems.append(f"{key}: expected {typ.__name__}, got {type(v).__name__} {v!r}; fix: {KEYS[key]}")
            return default
        if minimum is not None and v < minimum:
            problems.append(f"{key}: must be at least {minimum}, got {v}")
        return v

    def typed_list(key: str, typ: type, required: bool = True, minimum: float | None = None) -> list[Any]:
        v = raw.get(key, [] if not required else None)
        if v is None:
            problems.append(f"{key}: missing; fix: add `{key}:` ({KEYS[key]})")
            return []
        if not isinstance(v, list):
            v = [v]
        out = []
        for i, item in enumerate(v):
            if typ is float and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            if not isinstance(item, typ) or isinstance(item, bool):
                problems.append(f"{key}[{i}]: expected {typ.__name__}, got {type(item).__name__} {item!r}; fix: {KEYS[key]}")
            elif minimum is not None and item < minimum:
                problems.append(f"{key}[{i}]: must be at least {minimum}, got {item}")
            else:
                out.append(item)
        return out

    for key in raw:
        if key not in KEYS:
            problems.append(f"{key}: unknown key; valid keys: {', '.join(KEYS)}")

    models: list[ModelSpec] = []
    for i, m in enumerate(raw.get("models") or []):
        where = f"models[{i}]"
        name, opts = (
            (m, {}) if isinstance(m, str) else (m.get("name"), m.get("options") or {}) if isinstance(m, dict) else (None, {})
        )
        if not isinstance(name, str):
            problems.append(f"{where}: expected a model name or {{name, options}}, got {m!r}")
            continue
        try:
            entry = MODELS.entry(name)
        except UnknownNameError as e:
            problems.append(f"{where}.name: {e}")
            continue
        if entry.meta.get("kind") == "classifier":
            problems.append(f"{where}.name: {name!r} is a feature network, not a generative model")
            continue
        if not isinstance(opts, dict):
            problems.append(f"{where}.options: expected a mapping, got {opts!r}")
            continue
        bad = sorted(set(opts) - set(entry.meta.get("options", {})))
        if bad:
            problems.append(f"{where}.options.{bad[0]}: unknown option; {name} takes: {', '.join(entry.meta.get('options', {}))}")
            continue
        w = opts.get("weights")
        if w is not None:
            wp = (path.parent / w) if not Path(w).is_absolute() else Path(w)
            if not wp.is_file():
                problems.append(
                    f"{where}.options.weights: file not found: {wp}; fix the path or remove it to use the committed weights"
                )
                continue
            opts = {**opts, "weights": str(wp)}
        models.append(ModelSpec(name, dict(opts)))
    if not raw.get("models"):
        problems.append("models: missing or empty; fix: list at least one of " + ", ".join(MODELS.names()))

    methods: list[MethodSpec] = []
    for i, m in enumerate(raw.get("methods") or []):
        where = f"methods[{i}]"
        name, grid = (
            (m, {}) if isinstance(m, str) else (m.get("name"), m.get("knobs") or {}) if isinstance(m, dict) else (None, {})
        )
        if not isinstance(name, str):
            problems.append(f"{where}: expected a method name or {{name, knobs, steps}}, got {m!r}")
            continue
        own_steps = m.get("steps") if isinstance(m, dict) else None
        if isinstance(m, dict):
            bad_keys = sorted(set(m) - {"name", "knobs", "steps"})
            if bad_keys:
                problems.append(f"{where}.{bad_keys[0]}: unknown key; a method entry takes name, knobs, steps")
                continue
        if own_steps is not None:
            own_steps = own_steps if isinstance(own_steps, list) else [own_steps]
            if not own_steps or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in own_steps):
                problems.append(f"{where}.steps: expected a non-empty list of ints >= 1, got {own_steps!r}")
                continue
        try:
            cls = METHODS.get(name)
        except UnknownNameError as e:
            problems.append(f"{where}.name: {e}")
            continue
        if not isinstance(grid, dict):
            problems.append(f"{where}.knobs: expected a mapping of knob -> list of values, got {grid!r}")
            continue
        grid = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
        ok = True
        for k, values in grid.items():
            for j, v in enumerate(values):
                try:
                    cls.resolve_knobs({k: v})
                except KnobError as e:
                    problems.append(f"{where}.knobs.{k}[{j}]: {e}")
                    ok = False
        if ok:
            methods.append(MethodSpec(name, grid, own_steps))
    if not raw.get("methods"):
        problems.append("methods: missing or empty; fix: list methods (see `bench list methods`)")

    steps = typed_list("steps", int, minimum=1)
    guidance = typed_list("guidance", float, minimum=0.0)
    metrics = typed_list("metrics", str)
    optional = typed_list("optional_metrics", str, required=False)
    for key, names in (("metrics", metrics), ("optional_metrics", optional)):
        for i, n in enumerate(names):
            try:
                METRICS.entry(n)
            except UnknownNameError as e:
                problems.append(f"{key}[{i}]: {e}")
    timing = raw.get("timing") or {}
    warmup = timing.get("warmup", 1) if isinstance(timing, dict) else None
    if not isinstance(warmup, int) or warmup < 0:
        problems.append(f"timing.warmup: expected an int >= 0, got {warmup!r}")
        warmup = 1
    executor = typed("executor", str, "local")
    if executor not in ("local", "ray"):
        problems.append(f"executor: {executor!r} is not available; use 'local' or 'ray'")

    suite = Suite(
        name=typed("name", str, path.stem),
        source=str(path),
        models=models,
        methods=methods,
        steps=steps,
        guidance=guidance,
        metrics=metrics,
        optional_metrics=optional,
        seed=typed("seed", int, 0, 0),
        n_samples=typed("n_samples", int, 256, 2),
        batch_size=typed("batch_size", int, 64, 1),
        bootstrap=typed("bootstrap", int, 50, 0),
        warmup=warmup,
        description=typed("description", str, ""),
        executor=executor,
        reference=_reference(raw.get("reference"), problems),
        raw=raw,
    )
    problems += _cross_checks(suite)
    if problems:
        raise SuiteError(str(path), problems)
    return suite


def _reference(value: Any, problems: list[str]) -> list[dict[str, Any]]:
    """The suite's ``reference:`` entry as a list of mappings (checked: keys, types, method name)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for i, d in enumerate(items):
        where = f"reference[{i}]" if isinstance(value, list) else "reference"
        if not isinstance(d, dict):
            problems.append(f"{where}: expected a mapping {{method, steps, guidance[, knobs][, model]}}, got {d!r}")
            continue
        bad = sorted(set(d) - {"method", "steps", "guidance", "knobs", "model"})
        if bad:
            problems.append(f"{where}.{bad[0]}: unknown key; use method, steps, guidance, knobs, model")
            continue
        if "method" in d and d["method"] not in METHODS:
            problems.append(f"{where}.method: {UnknownNameError('method', str(d['method']), METHODS.names())}")
            continue
        if "steps" in d and (not isinstance(d["steps"], int) or isinstance(d["steps"], bool)):
            problems.append(f"{where}.steps: expected an int, got {d['steps']!r}")
            continue
        if "guidance" in d and (not isinstance(d["guidance"], int | float) or isinstance(d["guidance"], bool)):
            problems.append(f"{where}.guidance: expected a number, got {d['guidance']!r}")
            continue
        out.append(dict(d))
    return out


def _cross_checks(suite: Suite) -> list[str]:
    problems = []
    for i, ms in enumerate(suite.models):
        meta = MODELS.entry(ms.name).meta
        if ms.name == "gmm" and any(g != 1.0 for g in suite.guidance):
            problems.append(f"guidance: models[{i}] ({ms.label}) is unconditional; use guidance: [1.0]")
        for key in ("metrics", "optional_metrics"):
            for j, n in enumerate(getattr(suite, key)):
                if n in METRICS and METRICS.entry(n).meta["data"] != meta["data"]:
                    problems.append(
                        f"{key}[{j}]: {n!r} measures {METRICS.entry(n).meta['data']} data but models[{i}] "
                        f"({ms.label}) makes {meta['data']} data; split the suite by data kind"
                    )
    for i, m in enumerate(suite.methods):
        cls = METHODS.get(m.name)
        known = [c for c in (model_capabilities(ms) for ms in suite.models) if c is not None]
        if suite.models and len(known) == len(suite.models) and not any(cls.applies_to.matches(c) for c in known):
            problems.append(
                f"methods[{i}]: {m.name!r} applies to {cls.applies_to.text()} models and no model of this suite is one"
            )
    return problems


def model_capabilities(ms: ModelSpec) -> Any:
    """What a model is, known before it is built (methods are matched on it); None when it cannot
    be known yet (a pipeline not on this machine): every method is then planned, and one that does
    not apply fails when its job builds the model, saying why."""
    from bench.models import model_capabilities as caps

    return caps(ms.name, ms.options)


def expand(suite: Suite) -> tuple[list[Job], list[str]]:
    """Models x methods x knob grid x steps x guidance; returns jobs and the skipped pairs."""
    import itertools

    jobs, skipped = [], []
    for ms in suite.models:
        caps = model_capabilities(ms)
        for m in suite.methods:
            cls = METHODS.get(m.name)
            bad = cls.applies_to.mismatches(caps) if caps is not None else []
            if bad:
                skipped.append(
                    f"{m.name} x {ms.label}: {m.name} applies to {cls.applies_to.text()}; {ms.label} has {'; '.join(bad)}"
                )
                continue
            steps = m.steps if m.steps is not None else suite.steps
            native = cls.steps_supported
            if native is not None and any(n not in native for n in steps):
                dropped = [n for n in steps if n not in native]
                skipped.append(f"{m.name} x {ms.label} at {dropped} steps: {m.name} runs at {'/'.join(map(str, native))} steps")
                steps = [n for n in steps if n in native]
            names = sorted(m.knob_grid)
            for values in itertools.product(*(m.knob_grid[k] for k in names)):
                knobs = tuple(sorted(cls.resolve_knobs(dict(zip(names, values, strict=True))).items()))
                for n in steps:
                    for g in suite.guidance:
                        jobs.append(Job(ms, m.name, knobs, n, g, suite.seed, suite.n_samples, suite.batch_size))
    return jobs, skipped


for _p in sorted(SUITE_DIR.glob("*.yaml")):
    SUITES.add(_p.stem, _p, description=(yaml.safe_load(_p.read_text()) or {}).get("description", ""))
