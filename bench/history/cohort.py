"""Cohorts: which runs of a configuration may be compared with each other.

A configuration's numbers move when the code under test changes (that is what history tracks),
but also when *how it is measured* changes: the suite's evaluation settings, the device, the
libraries, bench itself, the model's weights or the metric code. Runs are compared only within a
cohort, the runs that agree on all of those; a run whose cohort has no earlier run is
CALIBRATION_NEEDED, never a regression.

The cohort of a run is per model (the weights are a model's): :func:`cohort_fields` gathers the
fields, :func:`cohort_key` hashes them. The suite's grid (which models, methods, steps, guidance
it lists) is not in the key: adding a method to a suite does not change how the others are
measured. Weights hashes and the metric and harness code are not in ``run.json``, so ``bench run``
writes them beside it (:data:`SIDECAR`) with the code that ran; a run without one (made before
this module) gets ``"unrecorded"`` for them, a cohort of its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SIDECAR = "cohort.json"
UNRECORDED = "unrecorded"
# the suite's settings that change how every configuration is measured (not its grid)
SUITE_EVALUATION_KEYS = ("seed", "n_samples", "batch_size", "bootstrap", "warmup", "warmup_batch", "metrics", "optional_metrics",
                         "reference", "reference_set")  # fmt: skip
DEVICE_KEYS = ("type", "processor", "threads")


def measured_code(suite: Any) -> dict[str, Any]:
    """What ``bench run`` records beside ``run.json`` for the cohort: each model's weights hash,
    each metric's code version and the harness code version, computed by the code that ran (a
    diffusers pipeline is named by its options, hub id or path and revision, not hashed: that would
    load it again)."""
    from bench.codeversion import code_version, module_of
    from bench.models import build_model
    from bench.registry import METRICS

    weights: dict[str, str] = {}
    for m in suite.models:
        if m.name == "diffusers":  # loading a pipeline again only to hash it is too dear: its hub id / path and revision
            weights[m.label] = "pipeline:" + json.dumps(m.options, sort_keys=True, default=str)
            continue
        try:
            weights[m.label] = build_model(m.name, **m.options).weights_hash
        except Exception as e:  # a model that cannot be built here (a pipeline not on the machine)
            weights[m.label] = f"{UNRECORDED}: {type(e).__name__}"
    names = list(suite.metrics) + list(suite.optional_metrics)
    return {
        "weights": weights,
        "metric_code": {n: code_version(module_of(METRICS.get(n))) for n in names},
        "harness_code": code_version("bench.worker"),
    }


def write_sidecar(run_dir: Path, suite: Any) -> Path:
    from bench.io import write_json

    path = Path(run_dir) / SIDECAR
    write_json(path, measured_code(suite))
    return path


def read_sidecar(run_dir: Path) -> dict[str, Any]:
    try:
        obj = json.loads((Path(run_dir) / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def cohort_fields(record: dict[str, Any], sidecar: dict[str, Any], model: str, device_name: str = "") -> dict[str, Any]:
    """The fields that define the cohort of ``model``'s rows in a run (``record``: its run.json)."""
    suite = record.get("suite") or {}
    device = record.get("device") or {}
    platform = str(device.get("platform", ""))
    return {
        "suite": {k: suite.get(k) for k in SUITE_EVALUATION_KEYS},
        "device": {k: device.get(k) for k in DEVICE_KEYS} | {"os": platform.split("-")[0], "name": device_name},
        "versions": dict(sorted((record.get("versions") or {}).items())),  # bench's own version among them
        "weights": (sidecar.get("weights") or {}).get(model, UNRECORDED),
        "metric_code": sidecar.get("metric_code", UNRECORDED),
        "harness_code": sidecar.get("harness_code", UNRECORDED),
    }


def cohort_key(fields: dict[str, Any]) -> str:
    """A short stable hash of the cohort's fields."""
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cohort_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What changed between two cohorts' fields, as ``field: old -> new`` (top-level and one level down)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            out += [f"{k}.{s}: {va.get(s)} -> {vb.get(s)}" for s in sorted(set(va) | set(vb)) if va.get(s) != vb.get(s)]
        else:
            out.append(f"{k}: {va} -> {vb}")
    return out
