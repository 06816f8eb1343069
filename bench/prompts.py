"""Prompt sets as named, checksummed inputs: PartiPrompts, DrawBench, MLPerf's COCO-2014 captions, GenEval.

A suite names a prompt set in a text-to-image model's options instead of (or besides) a literal list::

    prompts: {set: partiprompts, path: ../shared/data/PartiPrompts.tsv, limit: 400, categories: [Animals, Vehicles]}

The file is read from ``path`` (relative to the suite file), else from ``$BENCH_HOME/prompts/``
where ``bench prompts fetch NAME`` puts it once. Every read is checked: its structure (the
columns or keys of the set's format, no empty prompt, the published number of rows) and its
SHA-256, against the digest this project pinned (PartiPrompts), the one pinned when bench fetched
it (``$BENCH_HOME/prompts/prompts.lock.json``), or the ``sha256:`` the suite gives. A missing,
corrupted or truncated file is a :class:`PromptSetError` naming the fetch command or the path to
fix; nothing is downloaded except by ``bench prompts fetch``.

Loading the suite pins the file's SHA-256 into the model's options (so it is part of every job id),
and the model's bundle carries the set's identity (``name@sha256[:12]`` and the selection) and each
prompt's category: the worker writes both into the row (``prompt_set``, ``per_category``).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "PROMPT_SETS",
    "PromptSet",
    "PromptSetError",
    "PromptSetRef",
    "PromptSetSpec",
    "fetch",
    "load_prompt_set",
    "pin_options",
]


class PromptSetError(ValueError):
    """A prompt set that is missing, corrupted, truncated or badly named; the message names the fix."""


class PromptSetAbsentError(PromptSetError):
    """A prompt set whose file is not on this machine (the message names the fetch command)."""


@dataclass(frozen=True)
class PromptSetSpec:
    """A known prompt set: where it comes from, its file format and what a whole copy looks like."""

    name: str
    description: str
    filename: str  # under $BENCH_HOME/prompts/
    source: str  # the URL `bench prompts fetch` reads
    fmt: str  # "tsv" | "csv" | "jsonl"
    prompt_key: str  # column (tsv/csv) or key (jsonl) of the prompt
    category_key: str | None  # column/key of the category (per-category tables), if the set has one
    rows: int | None  # the published number of prompts; a copy with another count is truncated or another version
    required: tuple[str, ...] = ()  # other columns/keys every row must have
    challenge_key: str | None = None
    sha256: str | None = None  # pinned by this project (the copy it was developed with); None: pinned at fetch
    checksum_from: str = "pinned at `bench prompts fetch`"
    license: str = ""

    def fetch_command(self) -> str:
        return f"bench prompts fetch {self.name}"


PROMPT_SETS: dict[str, PromptSetSpec] = {
    s.name: s
    for s in [
        PromptSetSpec(
            "partiprompts",
            "PartiPrompts (Yu et al. 2022): 1,632 prompts in 12 categories and 11 challenge aspects",
            "PartiPrompts.tsv",
            "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv",
            "tsv",
            "Prompt",
            "Category",
            1632,
            required=("Challenge",),
            challenge_key="Challenge",
            sha256="fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb",
            checksum_from="SHA-256 of the copy this project was developed with (../shared/data/PartiPrompts.tsv)",
            license="Apache-2.0",
        ),
        PromptSetSpec(
            "drawbench",
            "DrawBench (Saharia et al. 2022, Imagen): 200 prompts in 11 categories (CSV with Prompts, Category)",
            "drawbench.csv",
            "https://huggingface.co/datasets/sayakpaul/drawbench/resolve/main/DrawBench%20Prompts%20-%20Sheet1.csv",
            "csv",
            "Prompts",
            "Category",
            200,
        ),
        PromptSetSpec(
            "coco2014-mlperf",
            "MLPerf Inference's 5,000 COCO-2014 val captions for SDXL (captions_source.tsv: id, image_id, caption, ...)",
            "captions_source.tsv",
            "https://raw.githubusercontent.com/mlcommons/inference/master/text_to_image/coco2014/captions/captions_source.tsv",
            "tsv",
            "caption",
            None,
            5000,
            required=("id", "image_id", "file_name"),
            license="CC-BY-4.0 (COCO annotations)",
        ),
        PromptSetSpec(
            "geneval",
            "GenEval (Ghosh et al. 2023) prompt metadata: 553 prompts, one JSON object a line with tag, include, prompt",
            "evaluation_metadata.jsonl",
            "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl",
            "jsonl",
            "prompt",
            "tag",
            553,
            required=("include",),
            license="MIT",
        ),
    ]
}


def prompts_dir() -> Path:
    from bench.paths import bench_home

    return bench_home() / "prompts"


def lock_path() -> Path:
    return prompts_dir() / "prompts.lock.json"


def _lock() -> dict[str, str]:
    try:
        d = json.loads(lock_path().read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def spec(name: str) -> PromptSetSpec:
    if name not in PROMPT_SETS:
        close = difflib.get_close_matches(name, list(PROMPT_SETS), n=1, cutoff=0.5)
        mean = f"did you mean {close[0]!r}? " if close else ""
        raise PromptSetError(f"unknown prompt set {name!r}; {mean}known sets: {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[name]


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a set (after the selection), each one's category and challenge, and the
    identity of the file they came from."""

    name: str
    path: str
    sha256: str
    prompts: list[str]
    categories: list[str] | None = None
    challenges: list[str] | None = None
    selection: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """``name@sha256[:12]``, plus the selection when not the whole set (``[limit=200]``): what
        every row of a job that used it records as ``prompt_set``."""
        sel = ",".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(self.selection.items()))
        return f"{self.name}@{self.sha256[:12]}" + (f"[{sel}]" if sel else "")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse(s: PromptSetSpec, data: bytes, where: str) -> list[dict[str, Any]]:
    """The rows of a prompt-set file, its structure checked; raises :class:`PromptSetError` saying
    what is wrong (the caller adds the fix)."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise PromptSetError(f"{where} is not UTF-8 (byte {e.start})") from None
    rows: list[dict[str, Any]] = []
    need = (s.prompt_key, *((s.category_key,) if s.category_key else ()), *s.required)
    if s.fmt in ("tsv", "csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if s.fmt == "tsv" else ",")
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise PromptSetError(
                f"{where} lacks the column(s) {', '.join(missing)} of {s.name}'s format "
                f"({s.fmt.upper()} with a header row: {', '.join(need)}); found {', '.join(reader.fieldnames or []) or 'no header'}"
            )
        for i, r in enumerate(reader):
            if None in r or any(r.get(c) is None for c in need):  # a short row: a torn last line, or a broken row
                raise PromptSetError(
                    f"{where}: row {i + 2} has {len(r) - (None in r)} fields, not the header's; the file is broken"
                )
            rows.append(r)
    else:
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                raise PromptSetError(f"{where}: line {i + 1} is not JSON (a torn last line?)") from None
            if not isinstance(r, dict) or any(k not in r for k in need):
                raise PromptSetError(f"{where}: line {i + 1} is not an object with the keys {', '.join(need)}")
            rows.append(r)
    for i, r in enumerate(rows):
        if not isinstance(r[s.prompt_key], str) or not r[s.prompt_key].strip():
            raise PromptSetError(f"{where}: prompt {i + 1} ({s.prompt_key!r}) is empty")
    if s.rows is not None and len(rows) != s.rows:
        raise PromptSetError(f"{where} holds {len(rows)} prompts; {s.name} has {s.rows} (truncated, or another version)")
    return rows


def _candidates(s: PromptSetSpec, path: str | None) -> list[Path]:
    if path:
        return [Path(path).expanduser()]
    env = os.environ.get("BENCH_PROMPTS_" + s.name.upper().replace("-", "_"))
    out = [Path(env).expanduser()] if env else []
    out.append(prompts_dir() / s.filename)
    if s.name == "partiprompts":  # where `bench weights fetch partiprompts` put it before prompt sets existed
        from bench.paths import bench_home

        out.append(bench_home() / "weights" / "data" / "PartiPrompts.tsv")
    return out


def _fix(s: PromptSetSpec, path: str | None) -> str:
    if path:
        return f"point `path:` at an intact copy of {s.name} (source: {s.source}), or fetch it with `{s.fetch_command()}` and drop `path:`"
    return f"re-fetch it with `{s.fetch_command()} --force` (source: {s.source})"


def read_verified(name: str, path: str | None = None, sha256: str | None = None) -> tuple[Path, str, list[dict[str, Any]]]:
    """The file of prompt set ``name`` (at ``path``, else in ``$BENCH_HOME/prompts``), its SHA-256
    and its rows, structure and checksum verified."""
    s = spec(name)
    found = next((p for p in _candidates(s, path) if p.is_file()), None)
    if found is None:
        where = ", ".join(str(p) for p in _candidates(s, path))
        how = f"fix `path:` or fetch it with `{s.fetch_command()}`" if path else f"fetch it once with `{s.fetch_command()}`"
        raise PromptSetAbsentError(
            f"prompt set {name!r} ({s.description}) not found at {where}; {how} (source: {s.source}), "
            "or give `path:` to a local copy"
        )
    data = found.read_bytes()
    digest = sha256_bytes(data)
    expected, why = (sha256, "the suite's sha256") if sha256 else (s.sha256, s.checksum_from) if s.sha256 else (None, "")
    if expected is None and found == prompts_dir() / s.filename:
        expected, why = _lock().get(name), f"the SHA-256 pinned when bench fetched it ({lock_path()})"
    try:
        rows = parse(s, data, str(found))
    except PromptSetError as e:
        raise PromptSetError(f"prompt set {name!r}: {e}; {_fix(s, path)}") from None
    if expected and digest != expected.lower():
        raise PromptSetError(
            f"prompt set {name!r}: {found} has sha256 {digest[:16]}..., not {expected[:16]}... ({why}): the file is "
            f"corrupted, truncated or another version; {_fix(s, path)}"
        )
    return found, digest, rows


class PromptSetRef(BaseModel):
    """A suite's reference to a prompt set (the ``prompts:`` option given as a mapping)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    set: str = Field(description=f"a prompt set: {', '.join(PROMPT_SETS)} (`bench prompts list`)")
    path: str = Field(None, min_length=1, max_length=4096, description="the set's file (relative to the suite); default: $BENCH_HOME/prompts/, where `bench prompts fetch` puts it")  # type: ignore[assignment]  # fmt: skip
    limit: int = Field(None, ge=1, le=1_000_000, description="int >= 1: the first N prompts (after the category filter), in file order")  # type: ignore[assignment]  # fmt: skip
    categories: list[str] = Field(None, min_length=1, max_length=100, description="non-empty list of the set's categories to keep")  # type: ignore[assignment]  # fmt: skip
    challenges: list[str] = Field(None, min_length=1, max_length=100, description="non-empty list of PartiPrompts challenge aspects to keep")  # type: ignore[assignment]  # fmt: skip
    per_category: int = Field(None, ge=1, le=1_000_000, description="int >= 1: the first N prompts of each category (a balanced subset), before `limit`")  # type: ignore[assignment]  # fmt: skip
    sha256: str = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="the file's SHA-256 (64 hex digits); filled in when the suite is loaded")  # type: ignore[assignment]  # fmt: skip


def _select(s: PromptSetSpec, rows: list[dict[str, Any]], ref: PromptSetRef) -> list[dict[str, Any]]:
    for key, wanted, col in (("categories", ref.categories, s.category_key), ("challenges", ref.challenges, s.challenge_key)):
        if wanted is None:
            continue
        if col is None:
            raise PromptSetError(f"prompt set {s.name!r} has no {key}; remove `{key}:`")
        known = sorted({str(r[col]) for r in rows})
        bad = [w for w in wanted if w not in known]
        if bad:
            hints = "; ".join(
                f"{b!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(b, known, n=1)) else "") for b in bad
            )
            raise PromptSetError(f"{key} {hints} not in {s.name}; its {key}: {', '.join(known)}")
        rows = [r for r in rows if str(r[col]) in wanted]
    if ref.per_category is not None:
        if s.category_key is None:
            raise PromptSetError(f"prompt set {s.name!r} has no categories; remove `per_category:`")
        seen: dict[str, int] = {}
        kept = []
        for r in rows:
            c = str(r[s.category_key])
            seen[c] = seen.get(c, 0) + 1
            if seen[c] <= ref.per_category:
                kept.append(r)
        rows = kept
    return rows[: ref.limit] if ref.limit else rows


def load_prompt_set(ref: PromptSetRef | dict[str, Any], base: Path | None = None) -> PromptSet:
    """The prompts a suite's ``prompts: {set: ...}`` selects, from a verified file."""
    ref = ref if isinstance(ref, PromptSetRef) else PromptSetRef.model_validate(ref)
    s = spec(ref.set)
    path = ref.path
    if path and base is not None and not Path(path).expanduser().is_absolute():
        path = str(base / path)
    found, digest, rows = read_verified(ref.set, path, ref.sha256)
    rows = _select(s, rows, ref)
    if not rows:
        raise PromptSetError(f"the selection of {ref.set} keeps no prompt; widen `categories:`/`challenges:`")
    selection = {
        k: v
        for k, v in (
            ("categories", ref.categories),
            ("challenges", ref.challenges),
            ("per_category", ref.per_category),
            ("limit", ref.limit),
        )
        if v
    }
    return PromptSet(
        ref.set,
        str(found),
        digest,
        [str(r[s.prompt_key]).strip() for r in rows],
        [str(r[s.category_key]) for r in rows] if s.category_key else None,
        [str(r[s.challenge_key]) for r in rows] if s.challenge_key else None,
        selection,
    )


def pin_options(value: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """A suite's ``prompts:`` mapping checked (raises :class:`PromptSetError` or pydantic's
    ``ValidationError``) and, when its file is here, verified and pinned: the absolute path and the
    file's sha256 filled in, so that every job id covers the file's content. A file not on this
    machine is left for the model build to report (with its fetch command)."""
    ref = PromptSetRef.model_validate(value)
    spec(ref.set)
    out = ref.model_dump(exclude_none=True)
    path = ref.path
    if path and base is not None and not Path(path).expanduser().is_absolute():
        path = str((base / path).resolve())
        out["path"] = path
    s = spec(ref.set)
    if not any(p.is_file() for p in _candidates(s, path)):
        return out
    ps = load_prompt_set(ref.model_copy(update={"path": path}))
    out["sha256"] = ps.sha256
    return out


def resolve_model_options(options: dict[str, Any]) -> tuple[dict[str, Any], PromptSet | None]:
    """A model's options with a ``prompts: {set: ...}`` mapping replaced by the set's prompt list,
    and the prompt set (None when the prompts are a literal list)."""
    value = options.get("prompts")
    if not isinstance(value, dict):
        return options, None
    try:
        ps = load_prompt_set(value)
    except ValidationError as e:
        raise PromptSetError(f"prompts: {e.errors()[0]['msg']} ({'.'.join(map(str, e.errors()[0]['loc']))})") from None
    return {**options, "prompts": list(ps.prompts)}, ps


def label(value: dict[str, Any]) -> str:
    """A short label of a ``prompts:`` mapping for tables: ``partiprompts#fab29e[limit=200]``."""
    sel = ",".join(
        f"{k}={len(v) if isinstance(v, list) else v}"
        for k, v in sorted(value.items())
        if k in ("limit", "categories", "challenges", "per_category")
    )
    sha = str(value.get("sha256") or "")[:6]
    return f"{value.get('set')}{'#' + sha if sha else ''}{f'[{sel}]' if sel else ''}"


def fetch(name: str, force: bool = False, timeout: float = 60.0) -> Path:
    """Download prompt set ``name`` once into ``$BENCH_HOME/prompts``, verify its structure and
    (when pinned) its SHA-256, and pin the digest of what was fetched in the lock file."""
    import urllib.request

    s = spec(name)
    dest = prompts_dir() / s.filename
    if dest.is_file() and not force:
        read_verified(name)
        return dest
    try:
        with urllib.request.urlopen(s.source, timeout=timeout) as r:  # noqa: S310 (a fixed https URL of the catalogue)
            data = r.read()
    except OSError as e:
        raise PromptSetError(
            f"could not fetch {name} from {s.source} ({type(e).__name__}: {e}); download it by hand and give its `path:`"
        ) from e
    parse(s, data, f"the download of {name} from {s.source}")
    digest = sha256_bytes(data)
    if s.sha256 and digest != s.sha256:
        raise PromptSetError(f"the download of {name} has sha256 {digest[:16]}..., not the pinned {s.sha256[:16]}...; not saved")
    from bench.io import atomic_write, write_json

    atomic_write(dest, lambda p: p.write_bytes(data))
    write_json(lock_path(), {**_lock(), name: digest})
    return dest


def listing() -> list[dict[str, Any]]:
    """Each known set: where bench looks for it, whether it is there and verifies, and its source."""
    out = []
    for name, s in PROMPT_SETS.items():
        try:
            found, digest, rows = read_verified(name)
            status = f"ok ({len(rows)} prompts, sha256 {digest[:12]})"
        except PromptSetError as e:
            found, status = None, "absent" if "not found" in str(e) else f"BAD: {e}"
        out.append({"name": name, "path": str(found or prompts_dir() / s.filename), "status": status, "source": s.source,
                    "rows": s.rows, "sha256": s.sha256 or _lock().get(name), "format": s.fmt})  # fmt: skip
    return out


def category_of_samples(categories: Sequence[str], labels: Sequence[int]) -> list[str]:
    """The category of each sample: sample k is conditioned on prompt ``labels[k]``."""
    return [categories[int(c)] for c in labels]
