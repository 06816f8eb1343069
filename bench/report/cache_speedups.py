"""FLOPs-implied against measured speedup of caching jobs over their uncached reference.

A caching job runs a solver (its ``solver`` knob) with some blocks skipped. Its reference is the
suite's reference job (``reference:`` entries, or an explicit ``--reference``) of the same model
that runs that solver uncached at the same steps and guidance; with no reference specs, any
finished job of that solver at the same steps and guidance. Per job:
``speedup_flops_implied`` = reference FLOPs / job FLOPs (what the skipped blocks promise) and
``speedup_measured`` = reference latency / job latency (median per image, what the clock saw).
Their ratio shows how much of the promise survives hook overhead and the blocks that still run.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd

from bench.report import fmt
from bench.report.data import canonical_knobs, config_label, method_defaults
from bench.report.matched import ReferenceSpec

COLUMNS = [
    "model", "configuration", "reference", "units_fraction", "flops", "reference_flops", "speedup_flops_implied",
    "latency_per_image_s", "reference_latency_per_image_s", "speedup_measured", "measured_over_implied", "inert",
]  # fmt: skip


def solver_of(row: pd.Series) -> str | None:
    """The solver a caching job ran under: its ``solver`` knob, else the method's default."""
    knobs = {**method_defaults(str(row["method"])), **json.loads(canonical_knobs(row["knobs"]))}
    return knobs.get("solver")


def _is_reference(row: pd.Series, specs: Sequence[ReferenceSpec]) -> bool:
    if not specs:
        return row.get("family") == "solver"
    return any((s.model is None or s.model == row["model"]) and s.selects(row) for s in specs)


def cache_speedups(ok: pd.DataFrame, specs: Sequence[ReferenceSpec] = (), inert: Collection = ()) -> pd.DataFrame:
    """One row per finished caching job that has a reference at the same solver, steps and guidance
    (columns :data:`COLUMNS`); empty when the run has none. ``inert``: indices of ``ok`` whose cache
    computes every unit (:func:`bench.history.audit.inert_rows`), marked in the ``inert`` column."""
    if ok.empty or "family" not in ok:
        return pd.DataFrame(columns=COLUMNS)
    refs = ok[[_is_reference(r, specs) for _, r in ok.iterrows()]]
    out = []
    for idx, r in ok[ok["family"] == "caching"].iterrows():
        solver = solver_of(r)
        m = refs[
            (refs["model"] == r["model"])
            & (refs["method"] == solver)
            & (refs["steps"].astype(int) == int(r["steps"]))
            & np.isclose(refs["guidance"].astype(float), float(r["guidance"]))
        ]
        if m.empty:
            continue
        ref = m.iloc[0]
        implied = _ratio(ref["flops"], r["flops"])
        measured = _ratio(ref["latency_per_image_s"], r["latency_per_image_s"])
        out.append(
            {
                "model": r["model"],
                "configuration": config_label(r),
                "reference": config_label(ref),
                "units_fraction": float(r["units_fraction"])
                if "units_fraction" in r and pd.notna(r["units_fraction"])
                else np.nan,
                "flops": float(r["flops"]),
                "reference_flops": float(ref["flops"]),
                "speedup_flops_implied": implied,
                "latency_per_image_s": float(r["latency_per_image_s"]),
                "reference_latency_per_image_s": float(ref["latency_per_image_s"]),
                "speedup_measured": measured,
                "measured_over_implied": measured / implied if implied and np.isfinite(implied) else np.nan,
                "inert": idx in inert,
            }
        )
    return pd.DataFrame(out, columns=COLUMNS)


def _ratio(a: object, b: object) -> float:
    try:
        a, b = float(a), float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
    return a / b if b > 0 else float("nan")


HEADER = ["model", "configuration", "reference", "blocks computed", "FLOPs/img", "speedup (FLOPs)", "latency/img",
          "speedup (measured)", "measured / implied"]  # fmt: skip


def _is_inert(r: pd.Series) -> bool:
    v = r.get("inert", False)
    return isinstance(v, bool | np.bool_) and bool(v)


def table_rows(df: pd.DataFrame) -> list[list[str]]:
    return [
        [r["model"], r["configuration"] + (" [inert]" if _is_inert(r) else ""), r["reference"], fmt.num(r["units_fraction"], 3), fmt.flops(r["flops"]),
         fmt.num(r["speedup_flops_implied"], 3), fmt.ms(r["latency_per_image_s"]), fmt.num(r["speedup_measured"], 3),
         fmt.num(r["measured_over_implied"], 3)]
        for _, r in df.iterrows()
    ]  # fmt: skip


def cache_speedups_html(df: pd.DataFrame) -> str:
    classes = ["inert" if _is_inert(r) else "" for _, r in df.iterrows()]
    note = (
        '<p class="meta">Each caching job against the uncached reference at the same solver, steps and guidance. '
        "Blocks computed: fraction of the cache's units entered that really ran (an untimed counting pass on 2 samples). "
        "Speedup (FLOPs) = reference FLOPs / job FLOPs per image; speedup (measured) = reference / job median latency "
        "per image. [inert]: the cache computes every unit it enters (blocks computed = 1): it skips nothing.</p>"
    )
    return note + fmt.html_table(HEADER, table_rows(df), classes)


def cache_speedups_markdown(df: pd.DataFrame) -> str:
    return fmt.markdown_table(HEADER, table_rows(df))
