"""Synthetic run directories (results.parquet, run.json, cohort.json) for the history tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

SUITE = {"name": "synth", "seed": 0, "n_samples": 50, "batch_size": 50, "bootstrap": 20, "warmup": 1, "metrics": ["fid"],
         "optional_metrics": [], "reference": [], "reference_set": None}  # fmt: skip
VERSIONS = {"bench": "0.1.0", "torch": "2.14.1", "diffusers": "0.42.1", "numpy": "2.4.6", "pandas": "3.1.1", "python": "3.11.7"}
DEVICE = {"type": "cpu", "processor": "", "threads": 2, "platform": "Linux-6.1-x86_64"}
SIDECAR = {"weights": {"digits-unet": "w0"}, "metric_code": {"fid": "m0"}, "harness_code": "h0"}


def fake_commit(i: int) -> str:
    return hashlib.sha1(f"commit {i}".encode()).hexdigest()


def make_run(
    results: Path, run_id: str, commit: str, started: str, rows: list[dict[str, Any]], versions: dict[str, str] | None = None
) -> Path:
    d = results / SUITE["name"] / run_id
    d.mkdir(parents=True)
    df = pd.DataFrame(
        [
            {"run_id": run_id, "suite": SUITE["name"], "git_sha": commit, "status": "ok", "error": "", "model": "digits-unet",
             "knobs": "{}", "guidance": 1.0, "device_name": "cpu", "latency_per_image_iqr_s": 0.001} | r
            for r in rows
        ]
    )  # fmt: skip
    df.to_parquet(d / "results.parquet", index=False)
    record = {
        "run_id": run_id,
        "suite": SUITE,
        "git_sha": commit,
        "started": started,
        "versions": versions or VERSIONS,
        "device": DEVICE,
    }
    (d / "run.json").write_text(json.dumps(record))
    (d / "cohort.json").write_text(json.dumps(SIDECAR))
    return d
