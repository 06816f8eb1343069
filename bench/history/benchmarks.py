"""Performance benchmarks in the results history: pytest-benchmark's saved JSON as runs.

``pytest benchmarks/ --benchmark-json=FILE`` (or ``--benchmark-autosave``, into ``.benchmarks/``)
saves, per benchmark, the statistics of its timed rounds and its ``extra_info``. ``bench history
benchmarks --import FILE|DIR`` turns each saved file into one run of the suite ``benchmarks`` under
``results/benchmarks/<run-id>/`` (``results.parquet`` and ``run.json``, as ``bench run`` writes
them), so the history's database, cohorts, rolling baseline and step detection treat a slower
harness as they treat a worse FID:

- one configuration per benchmark: model ``benchmarks``, method = the benchmark's name (with its
  parameters' id, ``test_cli_start[help]``);
- latency (``latency_per_image_s``, its IQR) = the median (IQR) of the benchmark's rounds;
- quality metric ``bench_value`` (lower is better) = the benchmark's ``extra_info["bench_value"]``
  (a ratio such as harness/bare time, with ``bench_value_ci`` as its interval when it has one),
  else the median time;
- the run's commit and date = the saved file's ``commit_info.id`` and ``datetime``; its cohort =
  the machine (processor, core count, OS) and the Python version. The harness code is deliberately
  not in the cohort: a change of bench that slows the harness must be a REGRESSION, not a new cohort.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from bench.history.defaults import BENCH_METRIC  # lower is better (defaults.higher_is_better)

BENCH_SUITE = "benchmarks"
BENCH_MODEL = "benchmarks"


class BenchmarkFileError(ValueError):
    """A file that is not pytest-benchmark's saved JSON."""


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def benchmark_files(paths: list[Path]) -> list[Path]:
    """The JSON files named, and those under the directories named (pytest-benchmark's storage), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.rglob("*.json"))
        elif p.is_file():
            out.append(p)
        else:
            raise BenchmarkFileError(
                f"{p} not found: pass pytest-benchmark's JSON (--benchmark-json) or its .benchmarks/ directory"
            )
    return out


def read_benchmark_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BenchmarkFileError(f"cannot read {path} ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or "machine_info" not in data:
        raise BenchmarkFileError(f"{path} is not pytest-benchmark's saved JSON (no 'benchmarks' and 'machine_info')")
    return data


def benchmark_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One results row per benchmark of a saved file (the columns ``bench run`` writes that history reads)."""
    rows = []
    for b in data["benchmarks"]:
        stats, extra = b.get("stats") or {}, b.get("extra_info") or {}
        median = _num(stats.get("median"))
        value = _num(extra.get(BENCH_METRIC, median))
        ci = extra.get(f"{BENCH_METRIC}_ci") or [math.nan, math.nan]
        rows.append(
            {
                "job_id": f"{b.get('fullname') or b['name']}",
                "status": "ok",
                "error": "",
                "model": BENCH_MODEL,
                "method": str(b["name"]),
                "family": "benchmark",
                "training": "free",
                "knobs": "{}",  # the name carries the parameters' id (test_cli_start[help]); their values are in params
                "steps": 1,
                "guidance": 1.0,
                "latency_s": median,
                "latency_per_image_s": median,
                "latency_iqr_s": _num(stats.get("iqr")),
                "latency_per_image_iqr_s": _num(stats.get("iqr")),
                "batch_size": 1,
                "timed_batches": int(stats.get("rounds") or 0),
                BENCH_METRIC: value,
                f"{BENCH_METRIC}_ci_low": _num(ci[0]),
                f"{BENCH_METRIC}_ci_high": _num(ci[1]),
                "extra_info": json.dumps(extra, sort_keys=True, default=str),
                "params": json.dumps(b.get("params") or {}, sort_keys=True, default=str),
            }
        )
    return rows


def run_record(data: dict[str, Any], source: Path, run_id: str) -> dict[str, Any]:
    """``run.json`` of an imported file: commit, date, device and versions for the cohort."""
    m, commit = data.get("machine_info") or {}, data.get("commit_info") or {}
    cpu = m.get("cpu") or {}
    return {
        "run_id": run_id,
        "suite": {"name": BENCH_SUITE, "metrics": [BENCH_METRIC]},
        "git_sha": str(commit.get("id") or "unknown") + ("-dirty" if commit.get("dirty") else ""),
        "started": str(data.get("datetime") or ""),
        "finished": str(data.get("datetime") or ""),
        "device": {
            "type": "cpu",
            "processor": str(cpu.get("brand_raw") or m.get("processor") or m.get("machine") or ""),
            "threads": cpu.get("count"),
            "platform": f"{m.get('system', '')}-{m.get('release', '')}",
        },
        "versions": {"python": str(m.get("python_version") or ""), "pytest-benchmark": str(data.get("version") or "")},
        "command": f"bench history {BENCH_SUITE} --import {source}",
        "source": str(source),
    }


def run_id_of(data: dict[str, Any], path: Path) -> str:
    """A stable run id for a saved file: its date and commit (so importing it again changes nothing)."""
    when = re.sub(r"[^0-9A-Za-z]", "", str(data.get("datetime") or ""))[:15] or "undated"
    sha = str((data.get("commit_info") or {}).get("id") or "unknown")[:10]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(path).stem)[:60]
    return f"{when}-{sha}-{name}"


def import_benchmarks(paths: list[Path], results: Path) -> list[Path]:
    """Write each saved file under ``paths`` as a run of the suite ``benchmarks`` under ``results``
    (a file imported before is left as it is); returns the run directories of the new runs."""
    import pandas as pd

    from bench.io import write_json
    from bench.paths import within

    new = []
    for f in benchmark_files(paths):
        data = read_benchmark_file(f)
        rows = benchmark_rows(data)
        if not rows:
            continue
        run_id = run_id_of(data, f)
        run_dir = within(Path(results), BENCH_SUITE, run_id)
        if (run_dir / "results.parquet").is_file():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "run.json", run_record(data, f, run_id))
        pd.DataFrame(rows).to_parquet(run_dir / "results.parquet", index=False)
        new.append(run_dir)
    return new
