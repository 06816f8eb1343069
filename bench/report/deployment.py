"""How each row's network was deployed (dtype, compiled, channels_last: bench.models.options), for
the report: latencies measured under different deployments are never compared without saying so.

Speedups are computed within a model (its label carries its options), so two models deployed
differently never share a speedup; the report's reference section says when a run's models were
deployed differently (their latencies are not like for like), and the leaderboard marks a
configuration deployed unlike its model's reference (a trained method's own student network runs
eager even when the teacher is compiled, say). Rows written before the columns existed say
nothing about their deployment and are left out of the comparison.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.report.html import esc

UNRECORDED = ""


def _set(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))


def deployment_label(r: pd.Series | dict[str, Any]) -> str:
    """``float32, eager`` / ``bfloat16, compiled (inductor), channels_last``; '' when the row does not record it."""
    dtype = r.get("dtype")
    if not _set(dtype) or not str(dtype):
        return UNRECORDED
    compiled = r.get("compiled")
    parts = [str(dtype), f"compiled ({r.get('compile_backend')})" if _set(compiled) and bool(compiled) else "eager"]
    cl = r.get("channels_last")
    return ", ".join(parts + (["channels_last"] if _set(cl) and bool(cl) else []))


def model_deployments(ok: pd.DataFrame) -> dict[str, list[str]]:
    """Model -> the distinct deployments its finished rows record (sorted; unrecorded left out)."""
    if "dtype" not in ok.columns:
        return {}
    out: dict[str, list[str]] = {}
    for model, g in ok.groupby("model", sort=True):
        labels = sorted({deployment_label(r) for _, r in g.iterrows()} - {UNRECORDED})
        if labels:
            out[str(model)] = labels
    return out


def deployment_note(ok: pd.DataFrame) -> str:
    """HTML paragraph(s) saying that the run's latencies were measured under different deployments;
    '' when every recorded row ran under the same one."""
    deps = model_deployments(ok)
    distinct = {d for ds in deps.values() for d in ds}
    if len(distinct) <= 1:
        return ""
    per_model = "; ".join(f"<b>{esc(m)}</b>: {esc(' | '.join(ds))}" for m, ds in deps.items())
    out = (
        "<p><b>Latencies in this run were measured under different deployments</b> (dtype, torch.compile, "
        f"memory format): {per_model}. Speedups are computed within a model only; latencies of differently deployed "
        "models are not like for like.</p>"
    )
    mixed = [m for m, ds in deps.items() if len(ds) > 1]
    if mixed:
        out += (
            "<p>Within "
            + ", ".join(f"<b>{esc(m)}</b>" for m in mixed)
            + " configurations ran under different deployments (a trained method's own network is not the model's): "
            f"the leaderboard marks each configuration deployed unlike its reference with {esc(MARK.format('...'))}.</p>"
        )
    return out


MARK = " [deployed: {}]"


def deployment_marker(r: pd.Series, reference: pd.Series) -> str:
    """A marker after a configuration's name when it ran under another deployment than its reference; '' otherwise."""
    a, b = deployment_label(r), deployment_label(reference)
    return MARK.format(a) if a and b and a != b else ""
