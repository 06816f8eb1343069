"""Number formatting and plain tables (Markdown and HTML) shared by reports and ``bench compare``."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any


def num(v: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; '-' for missing."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-" if v is None else str(v)
    if math.isnan(f):
        return "-"
    if f == 0:
        return "0"
    if f.is_integer() and abs(f) < 10**digits:
        return str(int(f))
    return f"{f:.{digits}g}"


def ci(v: Any, lo: Any, hi: Any, digits: int = 4) -> str:
    """``value [low, high]``."""
    if num(v) == "-":
        return "-"
    if num(lo) == "-" and num(hi) == "-":
        return num(v, digits)
    return f"{num(v, digits)} [{num(lo, 3)}, {num(hi, 3)}]"


def flops(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(f):
        return "-"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(f) >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


def ms(seconds: Any) -> str:
    try:
        f = float(seconds)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(f) else f"{1e3 * f:.3g} ms"


def duration(seconds: Any) -> str:
    try:
        f = float(seconds)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(f):
        return "-"
    if f == 0:
        return "0 s"
    if f < 120:
        return f"{f:.3g} s"
    if f < 7200:
        return f"{f / 60:.3g} min"
    return f"{f / 3600:.3g} h"


def ratio(v: Any) -> str:
    return "-" if num(v) == "-" else f"{float(v):.3g}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] | None = None) -> str:
    """An HTML table; ``classes[i]`` (optional) is the CSS class of row i."""
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{html.escape(classes[i])}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)
