"""What ``bench list`` prints, without importing torch, diffusers and every method each time.

The registries fill when their modules are imported (``methods`` registers every method as it
imports them), which takes 6-10 s on a 2-core CPU. ``bench list`` instead reads a catalogue of the
entries, written the first time they are listed from the real registry together with the files
they were made from: every project file the registry's loader modules import, transitively (as
:func:`bench.codeversion.closure` reads them, with ``ast``), with its sha256, the repository's
location (entries hold absolute paths) and, for suites, the YAML files. The catalogue is used only
while every one of those files is unchanged (a few milliseconds of hashing, no parsing); an edit to
a method, to a module it imports or to a suite makes the next ``bench list`` import the registry
again and rewrite it: the catalogue is never stale, only cold. (The files checked are those of the
registry's code version, :func:`bench.codeversion.code_version`: a change elsewhere cannot change
what the loaders register.)

The catalogue lives under ``$BENCH_HOME/catalog/`` (one JSON file per kind); ``make install``
writes it once (``python -m bench.catalog``). ``tests/test_cli_start.py`` checks that the
catalogue's listing equals the real registry's, text and JSON, and that an edit makes it cold.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.paths import REPO, bench_home

KINDS = ("methods", "models", "metrics", "suites")
FORMAT = 1  # bump when the entries' layout changes


def _registry(kind: str):
    from bench import registry

    return {"methods": registry.METHODS, "models": registry.MODELS, "metrics": registry.METRICS, "suites": registry.SUITES}[kind]


def meta_value(v: object) -> object:
    """A registry metadata value as JSON: paths as strings, an options schema as option -> description,
    a function of the options (a model's capabilities) named as such."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, type) and hasattr(v, "describe"):
        return v.describe()
    if callable(v) and not isinstance(v, type):
        return "computed from the model's options"
    return v


def registry_entries(kind: str) -> list[dict[str, Any]]:
    """The entries of the real registry (importing its modules): name and every metadata value, as
    the JSON that ``bench list KIND --json`` prints (read back, so both paths print the same)."""
    reg = _registry(kind)
    entries = [{"name": e.name, **{k: meta_value(v) for k, v in e.meta.items()}} for e in reg]
    if kind == "suites":
        for d, e in zip(entries, reg, strict=True):
            d["path"] = str(e.obj)
    return json.loads(json.dumps(entries, default=str))


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def sources(kind: str, root: Path = REPO) -> dict[str, str | None]:
    """What the entries of ``kind`` are made from: relative path -> sha256 of each file (see the module's docstring)."""
    from bench.codeversion import closure, module_file

    root = Path(root)
    files = {module_file(m, root) for mod in _registry(kind)._loaders for m in closure(mod, root)}
    if kind == "suites":
        files |= set(root.joinpath("suites").glob("*.yaml"))
    return {str(f.relative_to(root)): _sha(f) for f in sorted(f for f in files if f is not None)}


def is_current(data: dict[str, Any], kind: str, root: Path = REPO) -> bool:
    """Whether a catalogue was written from the files as they are now (hashes only: no parsing, no import)."""
    srcs = data.get("sources")
    if data.get("format") != FORMAT or data.get("kind") != kind or data.get("root") != str(Path(root).resolve()):
        return False
    if not isinstance(srcs, dict) or not srcs:
        return False
    if kind == "suites":  # a suite added or removed
        listed = {str(p.relative_to(root)) for p in Path(root, "suites").glob("*.yaml")}
        if listed != {k for k in srcs if k.startswith("suites/")}:
            return False
    return all(_sha(Path(root, rel)) == sha for rel, sha in srcs.items())


def catalog_path(kind: str) -> Path:
    return bench_home() / "catalog" / f"{kind}.json"


def write_catalog(kind: str, entries: list[dict[str, Any]], srcs: dict[str, str | None], root: Path = REPO) -> Path | None:
    """Write the catalogue of ``kind`` atomically; None when $BENCH_HOME cannot be written (listing still works)."""
    path = catalog_path(kind)
    data = {"format": FORMAT, "kind": kind, "root": str(Path(root).resolve()), "sources": srcs, "entries": entries}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{kind}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def read_catalog(kind: str, root: Path = REPO) -> list[dict[str, Any]] | None:
    """The catalogued entries of ``kind`` when the catalogue is current, else None."""
    try:
        data = json.loads(catalog_path(kind).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not is_current(data, kind, root):
        return None
    entries = data.get("entries")
    return entries if isinstance(entries, list) else None


def entries(kind: str) -> list[dict[str, Any]]:
    """The entries of ``kind``: from the catalogue when it is current, else from the registry (and
    the catalogue is rewritten). A registry this process has already loaded, or added entries to (a
    test's method), is read directly, and its entries are not catalogued."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    reg = _registry(kind)
    if reg._loaded or reg._entries:
        return registry_entries(kind)
    found = read_catalog(kind)
    if found is not None:
        return found
    srcs = sources(kind)  # before importing: an edit while importing leaves the catalogue cold, not stale
    out = registry_entries(kind)
    write_catalog(kind, out, srcs)
    return out


def main() -> None:
    """``python -m bench.catalog``: write every kind's catalogue (``make install`` runs it)."""
    for kind in KINDS:
        srcs = sources(kind)
        path = write_catalog(kind, registry_entries(kind), srcs)
        print(f"{kind}: {path or 'not written ($BENCH_HOME is not writable)'}")


if __name__ == "__main__":
    main()
