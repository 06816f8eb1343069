"""Where bench keeps things: committed assets in the package, caches under $BENCH_HOME."""

from __future__ import annotations

import os
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
REPO = Path(__file__).resolve().parent.parent


def bench_home() -> Path:
    """$BENCH_HOME, default ~/.cache/bench: training checkpoints, metric weights, reference stats."""
    return Path(os.environ.get("BENCH_HOME", Path.home() / ".cache" / "bench")).expanduser()


class PathEscapeError(ValueError):
    """A path bench would write that is not under the root it belongs to."""


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def within(root: Path, *parts: str) -> Path:
    """``root / parts``, checked to stay under ``root`` once resolved (``..``, absolute parts and
    symbolic links included), each part a plain name: every directory bench writes is made this way
    from names that a suite or a command line chose. Returns ``root / parts`` as given (not
    resolved); raises :class:`PathEscapeError` otherwise."""
    for part in parts:
        if not SAFE_NAME.fullmatch(str(part)):
            raise PathEscapeError(
                f"{str(part)[:80]!r} cannot name a directory under {root}: use 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
    out = Path(root).joinpath(*map(str, parts))
    base, path = Path(root).resolve(), out.resolve()
    if not path.is_relative_to(base):
        raise PathEscapeError(f"{path} is outside {base}; bench writes only under its results, store and $BENCH_HOME roots")
    return out
