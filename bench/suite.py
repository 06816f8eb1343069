"""Suites: YAML files parsed (``yaml.safe_load``) into a validated spec and expanded into jobs.

Every error names its YAML path and the fix; unknown names list the closest valid ones.
Only registered names are ever looked up: a suite cannot make bench import or run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from bench.codeversion import code_version
from bench.paths import REPO
from bench.registry import METHODS, METRICS, MODELS, SUITES
from bench.schema import KEYS, MAX_INCLUDES, MAX_JOBS, SuiteError, read_yaml, validate

__all__ = ["KEYS", "Job", "MethodSpec", "ModelSpec", "Suite", "SuiteError", "expand", "load_suite", "suite_path"]

SUITE_DIR = REPO / "suites"
TRAINED_CLASSES = ("finetune", "full")  # methods whose students could memorise the training data


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
    if isinstance(v, dict) and "set" in v:  # a named prompt set: partiprompts#fab29e[limit=200]
        from bench.prompts import label

        return label(v)
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
    warmup_batch: int | None = None  # samples per warm-up call; None: the batch size
    description: str = ""
    executor: str = "local"
    reference: list[dict[str, Any]] = field(default_factory=list)
    accuracy_windows: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high], marked by bench report
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
    """The suite file's mapping with its ``include:`` chain merged in (this file's keys win)."""
    if not path.is_file():
        raise SuiteError(where, [f"{where}: file not found: {path}; fix the path (relative to the including file)"])
    data = read_yaml(path)
    if data is None:
        raise SuiteError(str(path), ["the file is empty; fix: give at least models, methods, steps, guidance and metrics"])
    if not isinstance(data, dict):
        raise SuiteError(str(path), [f"the top level must be a mapping of {', '.join(KEYS)}, got {type(data).__name__}"])
    inc = data.pop("include", None)
    if inc is not None:
        if not isinstance(inc, str) or not inc or len(inc) > 4096 or "\0" in inc:
            raise SuiteError(str(path), ["include: must be a file name (string), relative to this file"])
        target = (path.parent / inc).resolve()
        if target in chain:
            raise SuiteError(str(path), [f"include: {inc} includes itself in a cycle; remove the include"])
        if len(chain) >= MAX_INCLUDES:
            raise SuiteError(str(path), [f"include: more than {MAX_INCLUDES} files deep; flatten the include chain"])
        base = _load_yaml(target, f"{path}: include", (*chain, target))
        data = {**base, **data}
    return data


def _default_name(path: Path) -> str:
    """The suite's name when it gives none: its file name, made safe for a directory name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).lstrip("._-")[:64]
    return name or "suite"


def load_suite(name_or_path: str | Path) -> Suite:
    """Read, validate and resolve a suite; raises :class:`SuiteError` listing every problem
    (the schema and its limits: :mod:`bench.schema`)."""
    path = suite_path(name_or_path)
    raw = _load_yaml(path, str(path), (path.resolve(),))
    doc, problems = validate(raw, path.parent)
    if doc is None:
        raise SuiteError(str(path), problems)
    suite = Suite(
        name=doc.name or _default_name(path),
        source=str(path),
        models=[ModelSpec(m.name, dict(m.options)) for m in doc.models],
        methods=[MethodSpec(m.name, dict(m.knobs), m.steps) for m in doc.methods],
        steps=list(doc.steps),
        guidance=list(doc.guidance),
        metrics=list(doc.metrics),
        optional_metrics=list(doc.optional_metrics),
        seed=doc.seed,
        n_samples=doc.n_samples,
        batch_size=doc.batch_size,
        bootstrap=doc.bootstrap,
        warmup=doc.timing.warmup,
        warmup_batch=doc.timing.warmup_batch,
        description=doc.description,
        executor=doc.executor,
        reference=[r.model_dump(exclude_unset=True) for r in doc.reference or []],
        accuracy_windows=dict(doc.accuracy_windows or {}),
        raw=raw,
    )
    problems = _cross_checks(suite)
    if problems:
        raise SuiteError(str(path), problems)
    return suite


def job_count(suite: Suite) -> int:
    """How many jobs the grid has at most (before methods that do not apply are skipped)."""
    per_model = sum(
        math.prod(len(v) for v in m.knob_grid.values()) * len(m.steps if m.steps is not None else suite.steps)
        for m in suite.methods
    )
    return len(suite.models) * per_model * len(suite.guidance)


def _cross_checks(suite: Suite) -> list[str]:
    n = job_count(suite)
    if n > MAX_JOBS:
        return [f"the suite expands to {n} jobs, more than {MAX_JOBS}; split it into several suites or sweep fewer values"]
    problems = []
    for i, ms in enumerate(suite.models):
        meta = dict(MODELS.entry(ms.name).meta)
        # a pipeline's data (image or video) comes from its config, not its registration; a pipeline not on
        # this machine is not known yet, and its jobs check their metrics when they build it
        caps = model_capabilities(ms)
        meta["data"] = caps.data if caps is not None else None
        if ms.name == "gmm" and any(g != 1.0 for g in suite.guidance):
            problems.append(f"guidance: models[{i}] ({ms.label}) is unconditional; use guidance: [1.0]")
        for key in ("metrics", "optional_metrics"):
            for j, n in enumerate(getattr(suite, key)):
                if n in METRICS and meta["data"] is not None and METRICS.entry(n).meta["data"] != meta["data"]:
                    problems.append(
                        f"{key}[{j}]: {n!r} measures {METRICS.entry(n).meta['data']} data but models[{i}] "
                        f"({ms.label}) makes {meta['data']} data; split the suite by data kind"
                    )
    for name in suite.accuracy_windows:
        if name not in suite.metrics + suite.optional_metrics:
            problems.append(f"accuracy_windows.{name}: {name!r} is not among the suite's metrics; add it to metrics")
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
            if getattr(cls, "family", "") == "caching" and ms.options.get("compile") is True:  # bench.models.options
                skipped.append(
                    f"{m.name} x {ms.label}: a cache's hooks are not traced by torch.compile; "
                    "list the model again with compile: false for the caches"
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
