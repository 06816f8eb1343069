"""One registry for methods, models, metrics and suites: lookup by name, metadata with each entry."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the closest valid names."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        self.kind, self.name, self.close = kind, name, close
        msg = f"unknown {kind} {name!r}; {hint + ' ' if hint else ''}valid: {', '.join(sorted(valid))}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


@dataclass
class Entry:
    """A registered object with its metadata."""

    name: str
    obj: Any
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Name -> entry, with "did you mean" errors.

    ``loaders`` are modules imported on first lookup, so that registering happens where the
    thing is defined (``methods/solvers/ddim.py``) and a broken module fails loudly instead of
    silently vanishing.
    """

    def __init__(self, kind: str, loaders: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._loaders = loaders
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._loaders:
                importlib.import_module(mod)

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator: ``@METHODS.register("ddim", family="solver")``."""

        def deco(obj: Any) -> Any:
            self.add(name, obj, **meta)
            return obj

        return deco

    def add(self, name: str, obj: Any, **meta: Any) -> None:
        if name in self._entries and self._entries[name].obj is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, obj, meta)

    def entry(self, name: str) -> Entry:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, list(self._entries)) from None

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))


METHODS = Registry("method", loaders=("methods",))
MODELS = Registry("model", loaders=("bench.models",))
METRICS = Registry("metric", loaders=("bench.metrics",))
SUITES = Registry("suite", loaders=("bench.suite",))
