"""Suites as data: a bounded YAML reader and the typed schema every suite is validated against.

A suite file is read by :func:`read_yaml` behind hard limits: at most :data:`MAX_BYTES` of UTF-8,
nesting at most :data:`MAX_DEPTH` deep and at most :data:`MAX_NODES` YAML nodes *after* alias
expansion (so an alias chain, "billion laughs", is refused while it is being parsed, before
anything walks it); no duplicate keys, only string keys, no merge keys (``<<``), no tags beyond
YAML's safe ones. The document is then validated by :class:`SuiteDoc`, a pydantic model in strict
mode: unknown keys are errors at every level, numbers are finite and in range, lists are non-empty,
names come from a safe alphabet (:data:`NAME_PATTERN`: they become directory names), registered
names are looked up in the registries, method knobs by the method's typed knobs and model options
by the model's own options schema (its registry entry's ``options``: a pydantic model).

Every problem is one line: its YAML path, what was found (truncated) and the fix.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_BYTES = 1 << 20  # one suite file (and each file it includes)
MAX_DEPTH = 24  # nesting of mappings and lists, aliases expanded (the shipped suites reach 4)
MAX_NODES = 20_000  # YAML values after alias expansion (the largest shipped suite has about 300; a prompt list, one each)
MAX_INCLUDES = 8  # include: chain length
MAX_JOBS = 100_000  # jobs a suite may expand to
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME = re.compile(NAME_PATTERN)
_KNOB = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class SuiteError(ValueError):
    """All problems found in a suite, one per line, each with its YAML path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"suite {source}: {problems[0]}")
        else:
            super().__init__(f"suite {source} has {len(problems)} problems:\n  " + "\n  ".join(problems))


# --- showing what was found -------------------------------------------------------------------

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 2
_TYPE_NAMES = {dict: "mapping", list: "list", str: "str", int: "int", float: "float", bool: "bool", type(None): "null"}


def show(value: Any) -> str:
    """A short repr of ``value`` (long strings and big collections truncated; never expanded)."""
    if value is None:
        return "null"
    try:
        text = _repr.repr(value)
    except Exception:  # an int too long to print, say
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _typed(value: Any) -> str:
    """``int 5``, ``str 'x'``, ``null``: what was found, with its YAML type."""
    return "null" if value is None else f"{type_name(value)} {show(value)}"


def yaml_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``('methods', 0, 'knobs', 'eta', 1)`` -> ``methods[0].knobs.eta[1]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        else:
            text = str(part)
            out += ("." if out else "") + (text if len(text) <= 40 else text[:37] + "...")
    return out or "(top level)"


# --- the bounded YAML reader ------------------------------------------------------------------


class YAMLLimitError(yaml.MarkedYAMLError):
    """A suite beyond the reader's limits, or YAML that bench does not accept in a suite."""


class _Limits:
    """A safe loader's composer and constructor that count nodes (aliases expanded) and depth
    while composing, and refuse duplicate keys, non-string keys and merge keys while constructing."""

    def _start(self) -> None:
        self._depth = 0
        self._nodes = 0
        self._deepest = 0
        self._size: dict[int, int] = {}
        self._height: dict[int, int] = {}

    def _check(self, mark: Any) -> None:
        if self._deepest > MAX_DEPTH:
            raise YAMLLimitError(
                None,
                None,
                f"nested more than {MAX_DEPTH} levels deep (aliases expanded); fix: flatten it (a suite needs 4)",
                mark,
            )
        if self._nodes > MAX_NODES:
            raise YAMLLimitError(
                None, None, f"more than {MAX_NODES} values (aliases expanded); fix: shorten it or expand fewer aliases", mark
            )

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:
                size = self._size.get(id(node))
                if size is None:
                    raise YAMLLimitError(
                        None,
                        None,
                        f"alias *{event.anchor} refers to a collection that contains it (a recursive alias); fix: remove it",
                        event.start_mark,
                    )
                self._nodes += size
                self._deepest = max(self._deepest, self._depth + self._height[id(node)])
                self._check(event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        start, outer = self._nodes, self._deepest
        self._nodes += 1
        self._deepest = self._depth
        self._check(self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._size[id(node)] = self._nodes - start
        self._height[id(node)] = self._deepest - self._depth
        self._deepest = max(outer, self._deepest)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, f"expected a mapping, found {node.id}", node.start_mark)
        out: dict[str, Any] = {}
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YAMLLimitError(
                    None, None, "merge keys (<<) are not accepted in suites; write the keys out", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise YAMLLimitError(None, None, f"keys must be strings, found {_typed(key)}; quote it", key_node.start_mark)
            if key in out:
                raise YAMLLimitError(
                    None, None, f"duplicate key {show(key)} (first on line {first[key] + 1}); keep one", key_node.start_mark
                )
            first[key] = key_node.start_mark.line
            out[key] = self.construct_object(value_node, deep=deep)
        return out


try:  # libyaml's scanner and parser (C) under the composer above (Python): ~10x faster
    from yaml._yaml import CParser

    class _SuiteLoader(_Limits, yaml.composer.Composer, CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            yaml.composer.Composer.__init__(self)
            self._start()

except ImportError:  # PyYAML built without libyaml

    class _SuiteLoader(_Limits, yaml.SafeLoader):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            yaml.SafeLoader.__init__(self, stream)
            self._start()


def _yaml_problem(e: Exception) -> str:
    """One line for a YAML error: where and what."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = e.problem or e.context or "invalid"
        if e.context and e.problem:
            what = f"{e.problem} ({e.context})"
        if isinstance(e, YAMLLimitError):
            return f"{where}{what}"
        if "tag" in what:
            return f"not valid YAML: {where}{what}; fix: remove the tag (a suite is plain YAML: no !!python or custom tags)"
        return f"not valid YAML: {where}{what}; fix the syntax"
    text = " ".join(str(e).split())
    if "integer string conversion" in text:
        return "not valid YAML: an integer literal of more than 4300 digits; fix: use a smaller number"
    return f"not valid YAML: {text[:200]}; fix the file"


def read_yaml(path: Path) -> Any:
    """The YAML document of ``path``, within the limits above; raises :class:`SuiteError`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise SuiteError(str(path), [f"cannot read the file ({e.strerror or e}); check the path and its permissions"]) from e
    if len(data) > MAX_BYTES:
        raise SuiteError(
            str(path), [f"the file is larger than {MAX_BYTES // 1024} KiB, the limit of a suite; split it or shorten it"]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SuiteError(
            str(path), [f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}); save the file as UTF-8"]
        ) from None
    text = text.removeprefix("\ufeff")
    try:
        return yaml.load(text, Loader=_SuiteLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:  # int() of a huge literal raises ValueError
        raise SuiteError(str(path), [_yaml_problem(e)]) from None


# --- the schema -------------------------------------------------------------------------------


def nested(problems: list[tuple[tuple[Any, ...], str]]) -> PydanticCustomError:
    """An error that stands for several problems below the field raising it (relative paths)."""
    return PydanticCustomError("nested", "{count} problems", {"count": len(problems), "problems": problems})


def _safe_name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise ValueError(f"{show(v)} is not a safe name: use {NAME_RULE}")
    return v


def _knob_name(v: str) -> str:
    if not _KNOB.fullmatch(v):
        raise ValueError(f"{show(v)} is not a knob name (letters, digits and '_')")
    return v


def _registered(kind: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        from bench.registry import METHODS, METRICS, MODELS, UnknownNameError

        reg = {"method": METHODS, "model": MODELS, "metric": METRICS}[kind]
        try:
            entry = reg.entry(v)
        except UnknownNameError as e:
            raise ValueError(str(e)) from None
        if kind == "model" and entry.meta.get("kind") == "classifier":
            raise ValueError(f"{v!r} is a feature network, not a generative model")
        return v

    return check


def _scalar(v: Any) -> Any:
    """A knob value: a bool, an int, a finite float or a short string."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {show(v)}")
    if isinstance(v, str) and len(v) > 256:
        raise ValueError(f"a string of {len(v)} characters; at most 256")
    if not isinstance(v, bool | int | float | str):
        raise ValueError(f"a knob value is a number, a string or true/false, got {type_name(v)} {show(v)}")
    return v


def _window(v: list[float]) -> list[float]:
    if len(v) != 2 or v[0] > v[1]:
        raise ValueError(f"an accuracy window is [low, high] with low <= high, got {show(v)}")
    return v


def _as_list(v: Any) -> Any:
    return v if isinstance(v, list) else [v]


def _entries(v: Any) -> Any:
    """A list of names or mappings: names become ``{name: ...}`` (a non-list is left for the type check)."""
    return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


def _one_or_list(v: Any) -> Any:
    return [v] if isinstance(v, dict) else v


SafeName = Annotated[str, Field(max_length=64), AfterValidator(_safe_name)]
KnobName = Annotated[str, AfterValidator(_knob_name)]
MethodName = Annotated[SafeName, AfterValidator(_registered("method"))]
ModelName = Annotated[SafeName, AfterValidator(_registered("model"))]
MetricName = Annotated[SafeName, AfterValidator(_registered("metric"))]
Steps = Annotated[int, Field(ge=1, le=100_000)]
Guidance = Annotated[float, Field(ge=0.0, le=1000.0, allow_inf_nan=False)]
KnobValue = Annotated[Any, AfterValidator(_scalar)]
KnobValues = Annotated[list[KnobValue], BeforeValidator(_as_list), Field(min_length=1, max_length=1000)]


class Strict(BaseModel):
    """Strict types (no coercion: ``"5"`` is not 5, ``true`` is not 1), unknown keys rejected."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Timing(Strict):
    warmup: int = Field(1, ge=0, le=1000, description="int >= 0, untimed sampler calls before the timed ones")
    warmup_batch: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="int >= 1, samples in each warm-up call (default: the batch size). A small batch warms a CPU "
        "run at a fraction of the cost; on a GPU keep the default: cuDNN autotuning and torch.compile choose "
        "kernels per shape",
    )


class MethodEntry(Strict):
    name: MethodName = Field(description="a registered method (`bench list methods`)")
    knobs: dict[KnobName, KnobValues] = Field(
        default_factory=dict, max_length=64, description="a mapping of knob -> value or non-empty list of values"
    )
    steps: list[Steps] = Field(None, min_length=1, max_length=1000, description="non-empty list of ints >= 1")  # type: ignore[assignment]

    @model_validator(mode="after")
    def _knobs(self) -> MethodEntry:
        from bench.adapter import KnobError
        from bench.registry import METHODS

        cls = METHODS.get(self.name)
        problems = []
        for k, values in self.knobs.items():
            for j, v in enumerate(values):
                try:
                    cls.resolve_knobs({k: v})
                except KnobError as e:
                    problems.append((("knobs", k, j), str(e)))
        if problems:
            raise nested(problems)
        return self


class ModelEntry(Strict):
    name: ModelName = Field(description="a registered model (`bench list models`)")
    options: dict[str, Any] = Field(default_factory=dict, description="the model's options (`bench list models --json`)")

    @model_validator(mode="after")
    def _options(self, info: ValidationInfo) -> ModelEntry:
        from bench.registry import MODELS

        schema = MODELS.entry(self.name).meta.get("options")
        opts = self.options
        # a named prompt set (bench.prompts): checked, pinned, then a list to the model's schema
        if isinstance(opts.get("prompts"), dict):
            from bench.prompts import PromptSetError, PromptSetRef, pin_options

            try:
                self.options = {**opts, "prompts": pin_options(opts["prompts"], Path((info.context or {}).get("base", ".")))}
            except ValidationError as e:
                raise nested([(("options", "prompts", *loc), msg) for err in e.errors() for loc, msg in problems_of(err, PromptSetRef)]) from None  # fmt: skip
            except (PromptSetError, RuntimeError, OSError) as e:  # RuntimeError: a ~user path of no such user
                raise nested([(("options", "prompts"), str(e))]) from None
            opts = {**opts, "prompts": ["(the prompt set)"]}
        if "latents" in opts:  # start latents from a file (bench.latents): pinned here, not the model's own option
            from bench.latents import pin

            try:
                self.options = {**self.options, "latents": pin(opts["latents"], Path((info.context or {}).get("base", ".")))}
            except (ValueError, RuntimeError, OSError) as e:  # LatentsError is a ValueError
                raise nested([(("options", "latents"), str(e))]) from None
            opts = {k: v for k, v in opts.items() if k != "latents"}
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            try:
                schema.model_validate(opts)
            except ValidationError as e:
                raise nested([(("options", *loc), msg) for err in e.errors() for loc, msg in problems_of(err, schema)]) from None
        w = self.options.get("weights")
        if isinstance(w, str):
            base = Path((info.context or {}).get("base", "."))
            wp = Path(w).expanduser()
            wp = wp if wp.is_absolute() else base / wp
            if not wp.is_file():
                raise nested(
                    [(("options", "weights"), f"file not found: {wp}; fix the path or remove it to use the committed weights")]
                )
            self.options = {**self.options, "weights": str(wp)}
        return self


class Reference(Strict):
    method: MethodName = Field(None, description="a registered method (`bench list methods`)")  # type: ignore[assignment]
    steps: Steps = Field(None, description="int >= 1")  # type: ignore[assignment]
    guidance: Guidance = Field(None, description="a finite float >= 0")  # type: ignore[assignment]
    knobs: dict[KnobName, KnobValue] = Field(None, max_length=64, description="a mapping of knob -> value")  # type: ignore[assignment]
    model: str = Field(None, min_length=1, max_length=200, description="a model name or label")  # type: ignore[assignment]


KEYS = {
    "name": f"suite name: {NAME_RULE} (defaults to the file name)",
    "description": "free text",
    "include": "another suite file to start from (relative to this one)",
    "seed": "int >= 0, base seed; sample k uses (seed, k)",
    "n_samples": "int >= 2, samples per job",
    "batch_size": "int >= 1, samples per sampler call",
    "bootstrap": "int >= 0, bootstrap resamples for confidence intervals",
    "models": "non-empty list of model names or {name, options}",
    "methods": "non-empty list of method names or {name, knobs: {knob: [values]}, steps: [ints] (default: the suite's steps)}",
    "steps": "non-empty list of ints >= 1",
    "guidance": "non-empty list of finite floats >= 0 (1.0 = no classifier-free guidance)",
    "metrics": "list of metric names",
    "optional_metrics": "list of metric names recorded as missing (not failed) when they cannot run",
    "timing": "{warmup: int >= 0, warmup_batch: int >= 1}",
    "executor": "local or ray (bench run --executor overrides it)",
    "reference_set": "reference set of the set metrics: digits-train or digits-heldout for fid/kid/precision/recall on "
    "digits (default digits-train; digits-heldout when the suite has a trained method), or the real-image set of "
    "fid_inception/kid_inception/cmmd (see `bench ref list`)",
    "accuracy_windows": "{metric: [low, high]}: bench report marks each configuration's value inside or outside its window "
    "(MLPerf's accuracy targets, say)",
    "reference": "{method, steps, guidance[, knobs][, model]} or a non-empty list of them: the reference configuration for "
    "speedup at matched quality in reports (default: the highest-NFE training-free solver)",
}


class SuiteDoc(Strict):
    """A suite file, ``include:`` resolved (see :data:`KEYS`)."""

    name: SafeName = None  # type: ignore[assignment]
    description: str = Field("", max_length=20_000)
    seed: int = Field(0, ge=0, le=2**63 - 2)
    n_samples: int = Field(256, ge=2, le=1_000_000)
    batch_size: int = Field(64, ge=1, le=1_000_000)
    bootstrap: int = Field(50, ge=0, le=100_000)
    models: Annotated[list[ModelEntry], BeforeValidator(_entries), Field(min_length=1, max_length=100)]
    methods: Annotated[list[MethodEntry], BeforeValidator(_entries), Field(min_length=1, max_length=1000)]
    steps: list[Steps] = Field(min_length=1, max_length=1000)
    guidance: list[Guidance] = Field(min_length=1, max_length=1000)
    metrics: list[MetricName] = Field(max_length=100)
    optional_metrics: list[MetricName] = Field(default_factory=list, max_length=100)
    timing: Timing = Field(default_factory=Timing)
    executor: Literal["local", "ray"] = "local"
    reference_set: SafeName = None  # type: ignore[assignment]
    reference: Annotated[list[Reference], BeforeValidator(_one_or_list), Field(min_length=1, max_length=100)] = None  # type: ignore[assignment]
    accuracy_windows: dict[MetricName, Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], AfterValidator(_window)]] = Field(None, max_length=100)  # type: ignore[assignment]  # fmt: skip

    @model_validator(mode="after")
    def _compile_warmup(self) -> SuiteDoc:
        """A compiled model compiles at its first call, for that call's shapes: the warm-up must
        take it, on the timed batch's shape, not the timed calls."""
        bad = [i for i, m in enumerate(self.models) if m.options.get("compile") is True]
        if bad and self.timing.warmup < 1:
            msg = f"is 0 but models[{bad[0]}] has compile: true, so compilation would be timed; fix: set timing: {{warmup: 1}}"
            raise nested([(("timing", "warmup"), msg)])
        small = getattr(self.timing, "warmup_batch", None)  # samples per warm-up call (default: the batch)
        if bad and small is not None and small < min(self.batch_size, self.n_samples):
            msg = (
                f"is {small}, less than the batch, but models[{bad[0]}] has compile: true: the compiled network is "
                "specialised to the warm-up's shapes and would recompile in the first timed batch; fix: remove warmup_batch"
            )
            raise nested([(("timing", "warmup_batch"), msg)])
        return self


# --- errors as lines --------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "int",
    "float_type": "float",
    "string_type": "str",
    "bool_type": "bool",
    "list_type": "list",
    "dict_type": "mapping",
    "model_type": "mapping",
    "model_attributes_type": "mapping",
}


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that the mapping at ``loc`` is validated by (for its valid keys)."""
    import typing

    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        while True:  # unwrap Annotated, list[...] and X | None down to a model class
            args = typing.get_args(ann)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                break
            inner = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)] or [
                a for a in args if typing.get_args(a)
            ]
            if not inner:
                return None
            ann = inner[0]
        cur = ann
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _hint(loc: tuple[Any, ...], model: type[BaseModel]) -> str:
    names = [p for p in loc if isinstance(p, str) and p != "[key]"]
    last = max((i for i, p in enumerate(loc) if isinstance(p, str) and p != "[key]"), default=None)
    parent = _model_at(model, tuple(loc[:last])) if last is not None else None
    if names and parent is not None and names[-1] in parent.model_fields:
        desc = parent.model_fields[names[-1]].description
        if desc:
            return desc
    if "knobs" in names[:-1]:
        return "a knob takes a value or a non-empty list of values (`bench list methods --json` shows each knob's type and range)"
    if model is SuiteDoc and names and names[0] in KEYS:
        return KEYS[names[0]]
    return ""


def problems_of(err: dict[str, Any], model: type[BaseModel] = SuiteDoc) -> list[tuple[tuple[Any, ...], str]]:
    """One pydantic error as (loc, message) lines; a nested error expands to its problems."""
    loc = tuple(err["loc"])
    t = err["type"]
    ctx = err.get("ctx") or {}
    found = err.get("input")
    hint = _hint(loc, model)
    fix = f"; fix: {hint}" if hint else ""
    key = next((p for p in reversed(loc) if isinstance(p, str) and p != "[key]"), "")
    if t == "nested":
        return [(loc + tuple(sub), msg) for sub, msg in ctx["problems"]]
    if t == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        valid = list(parent.model_fields) if parent is not None else []
        if parent is SuiteDoc:
            valid = list(KEYS)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        mean = f"did you mean {close[0]!r}? " if close else ""
        return [(loc, f"unknown key; {mean}valid keys{' here' if len(loc) > 1 else ''}: {', '.join(valid)}")]
    if t == "missing":
        return [(loc, f"missing; fix: add `{key}:`" + (f" ({hint})" if hint else ""))]
    if t in _EXPECTED:
        msg = f"expected {_EXPECTED[t]}, got {_typed(found)}"
        wrap = (isinstance(found, str) and key in ("models", "methods", "metrics", "optional_metrics", "prompts")) or (
            isinstance(found, int | float) and not isinstance(found, bool) and key in ("steps", "guidance")
        )
        if t == "list_type" and wrap:
            return [(loc, f"{msg}; fix: write a list, `{key}: [{found}]`" + (f" ({hint})" if hint else ""))]
        if t in ("model_type", "dict_type") and not loc:
            return [(loc, f"the top level must be a mapping of {', '.join(KEYS)}, got {_typed(found)}")]
        return [(loc, msg + fix)]
    if t == "too_short":
        return [(loc, f"is empty{fix or '; fix: give at least one value'}")]
    if t == "too_long":
        return [(loc, f"has {ctx.get('actual_length')} entries, at most {ctx.get('max_length')}; split the suite")]
    if t == "string_too_long":
        return [(loc, f"is {len(found)} characters long, at most {ctx.get('max_length')}; shorten it")]
    if t == "string_too_short":
        return [(loc, f"is empty{fix}")]
    if t == "finite_number":
        return [(loc, f"expected a finite number, got {show(found)}{fix}")]
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {
            "greater_than_equal": "at least",
            "greater_than": "more than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }
        limit = next(iter(ctx.values()))
        return [(loc, f"must be {bound[t]} {limit}, got {show(found)}{fix}")]
    if t == "literal_error":
        return [(loc, f"expected {ctx.get('expected')}, got {show(found)}")]
    if t == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        return [(loc, msg)]
    return [(loc, f"{err['msg']}, got {_typed(found)}{fix}")]


def validate(raw: Any, base: Path) -> tuple[SuiteDoc | None, list[str]]:
    """The typed suite, or None and every problem as a line ``<yaml path>: <problem>; fix: ...``."""
    try:
        return SuiteDoc.model_validate(raw, context={"base": base}), []
    except ValidationError as e:
        lines = [f"{yaml_path(loc)}: {msg}" for err in e.errors() for loc, msg in problems_of(err)]
        return None, list(dict.fromkeys(lines))
