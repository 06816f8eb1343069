"""Reading a run back: its results table, its run record, its samples, and metric directions.

Reports and ``bench compare`` only read what a run wrote; they never call a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.paths import REPO
from bench.registry import METHODS, METRICS

RESULTS = REPO / "results"
COST_COLUMNS = {
    "latency_per_image_s": "latency per image (ms, median)",
    "nfe": "NFE (network evaluations per sample)",
    "flops": "FLOPs per image",
}
KEY_COLUMNS = ["model", "method", "knobs", "steps", "guidance"]


class RunError(ValueError):
    """A run that cannot be found or read; the message says what was tried and the fix."""


def canonical_knobs(knobs: Any) -> str:
    """Knobs as sorted JSON, whatever form they were stored in."""
    if knobs is None or (isinstance(knobs, float) and np.isnan(knobs)):
        return "{}"
    d = json.loads(knobs) if isinstance(knobs, str) else dict(knobs)
    return json.dumps(d, sort_keys=True)


def method_defaults(method: str) -> dict[str, Any]:
    """The registered defaults of a method's knobs ({} for a method no longer registered)."""
    return {k.name: k.default for k in METHODS.get(method).knobs} if method in METHODS else {}


def config_key(row: pd.Series | dict[str, Any]) -> tuple[str, str, str, int, float]:
    """What identifies a configuration across runs: (model, method, knobs, steps, guidance).

    Knobs at the method's current default are left out, so a run made before a method gained
    a knob still matches a run made after (the new knob's default is the old behaviour)."""
    method = str(row["method"])
    defaults = method_defaults(method)
    knobs = {k: v for k, v in json.loads(canonical_knobs(row["knobs"])).items() if k not in defaults or defaults[k] != v}
    return (str(row["model"]), method, json.dumps(knobs, sort_keys=True), int(row["steps"]), float(row["guidance"]))


def knob_text(knobs: Any, method: str | None = None) -> str:
    """``knob=value,...``; knobs at the method's registered default are left out."""
    d = json.loads(canonical_knobs(knobs))
    defaults = method_defaults(method) if method is not None else {}
    return ",".join(f"{k}={v}" for k, v in d.items() if k not in defaults or defaults[k] != v)


def method_label(row: pd.Series | dict[str, Any]) -> str:
    """``method`` or ``method[knob=value,...]`` (non-default knobs): one label per method variant."""
    kt = knob_text(row["knobs"], str(row["method"]))
    return f"{row['method']}[{kt}]" if kt else str(row["method"])


def config_label(row: pd.Series | dict[str, Any]) -> str:
    """Method variant, steps and guidance: one label per configuration."""
    return f"{method_label(row)} {int(row['steps'])} steps w={float(row['guidance']):g}"


def higher_is_better(metric: str) -> bool:
    """The metric's direction, from the registry (never guessed from its name)."""
    return bool(METRICS.entry(metric).meta["higher_is_better"])


@dataclass
class Run:
    """One run read back: ``df`` has one row per job (failed ones included)."""

    df: pd.DataFrame
    record: dict[str, Any] = field(default_factory=dict)
    path: Path = Path(".")
    # a report over several runs (``merge_runs``): every run directory whose jobs this table holds
    dirs: tuple[Path, ...] = ()

    @property
    def run_dir(self) -> Path | None:
        if self.dirs:
            return self.dirs[0]
        return self.path if self.path.is_dir() else None

    def job_dir(self, job_id: str) -> Path | None:
        """The directory of a finished job's files (``row.json``, ``samples.npy``), in whichever of the
        run's directories holds it; None when none does."""
        for d in self.dirs or ((self.run_dir,) if self.run_dir is not None else ()):
            j = d / "jobs" / str(job_id)
            if (j / "samples.npy").is_file():
                return j
        return None

    @property
    def run_id(self) -> str:
        if self.record.get("run_id"):
            return str(self.record["run_id"])
        ids = self.df["run_id"].dropna().unique() if "run_id" in self.df else []
        return str(ids[0]) if len(ids) == 1 else self.path.stem

    @property
    def suite_name(self) -> str:
        suite = self.record.get("suite") or {}
        if suite.get("name"):
            return str(suite["name"])
        names = self.df["suite"].dropna().unique() if "suite" in self.df else []
        return str(names[0]) if len(names) == 1 else "unknown"

    @property
    def ok(self) -> pd.DataFrame:
        return self.df[self.df["status"] == "ok"]

    @property
    def metrics(self) -> list[str]:
        """Registered metrics with values in this run, in the suite's order."""
        suite = self.record.get("suite") or {}
        order = list(suite.get("metrics") or []) + list(suite.get("optional_metrics") or [])
        present = [c for c in self.df.columns if f"{c}_ci_low" in self.df.columns and c in METRICS]
        present = [c for c in present if self.df[c].notna().any()]
        return [m for m in order if m in present] + sorted(m for m in present if m not in order)

    def samples(self, job_id: str) -> np.ndarray | None:
        """The job's samples (float array in [-1, 1]), or None when the run kept none."""
        j = self.job_dir(job_id)
        if j is None:
            return None
        p = j / "samples.npy"
        from bench.store import SamplesError, load_samples

        try:
            return load_samples(p)
        except SamplesError as e:
            raise RunError(str(e)) from None


def resolve_run(spec: str | Path, results: Path = RESULTS) -> Path:
    """A run directory (or a results .parquet) from a path, ``suite/run-id``, a run id, or a
    suite name (its latest run)."""
    p = Path(spec)
    tried = [str(p)]
    if p.is_file() and p.suffix == ".parquet":
        return p
    if p.is_dir():
        if (p / "results.parquet").is_file():
            return p
        runs = sorted(d for d in p.iterdir() if (d / "results.parquet").is_file())
        if runs:  # a suite directory: its latest run (run ids are timestamps by default)
            return max(runs, key=lambda d: ((d / "run.json").stat().st_mtime if (d / "run.json").is_file() else 0, d.name))
        raise RunError(f"{p} holds no results.parquet; pass a run directory results/<suite>/<run-id>/")
    for cand in (results / str(spec), *sorted(results.glob(f"*/{spec}"))):
        tried.append(str(cand))
        if cand.is_dir():
            return resolve_run(cand, results)
    raise RunError(f"run {str(spec)!r} not found (tried {', '.join(dict.fromkeys(tried))}); pass results/<suite>/<run-id>/")


def load_run(spec: str | Path, results: Path = RESULTS) -> Run:
    """Read a run directory (results.parquet + run.json) or a bare results .parquet file."""
    path = resolve_run(spec, results)
    table = path if path.suffix == ".parquet" else path / "results.parquet"
    try:
        df = pd.read_parquet(table)
    except Exception as e:
        raise RunError(f"cannot read {table} ({e}); re-run `bench run` or pass another run") from e
    missing = [c for c in KEY_COLUMNS + ["status"] if c not in df.columns]
    if missing:
        raise RunError(f"{table} lacks the columns {missing}; it was not written by `bench run`")
    if "latency_per_image_s" not in df.columns and {"latency_s", "batch_size"} <= set(df.columns):
        df["latency_per_image_s"] = pd.to_numeric(df["latency_s"], errors="coerce") / pd.to_numeric(
            df["batch_size"], errors="coerce"
        )
    record: dict[str, Any] = {}
    rec = (path if path.is_dir() else path.parent) / ("run.json" if path.is_dir() else f"{path.stem}.run.json")
    if rec.is_file():
        try:
            record = json.loads(rec.read_text())
        except (OSError, ValueError) as e:
            raise RunError(
                f"cannot read {rec} ({type(e).__name__}: {e}); the file is torn: re-run `bench run` or remove it"
            ) from e
        if not isinstance(record, dict):
            raise RunError(f"{rec} is not a run record (a JSON mapping); re-run `bench run` or remove it")
    return Run(df.reset_index(drop=True), record, path)


def merge_runs(runs: list[Run]) -> Run:
    """One table over several runs of suites that share their models and seeds (e.g. the distillation
    and consistency suites), for one report: each configuration once (the first run that has it wins,
    so a teacher configuration both suites ran appears once), the suites' models, metrics and
    references united, and every run's directory searched for a job's samples."""
    if len(runs) == 1:
        return runs[0]
    seen: set[tuple[Any, ...]] = set()
    parts = []
    for r in runs:
        keep = []
        for _, row in r.df.iterrows():
            key = (*config_key(row), row.get("seed"), row.get("n_samples"), row.get("status"))
            keep.append(key not in seen)
            seen.add(key)
        parts.append(r.df[keep])
    df = pd.concat(parts, ignore_index=True)
    for col in ("seed", "n_samples"):
        vals = df[col].dropna().unique() if col in df else []
        if len(vals) > 1:
            raise RunError(
                f"runs {', '.join(r.run_id for r in runs)} differ in {col} ({sorted(map(str, vals))}): a report over "
                "several runs compares them sample by sample, so they must share it; report them one by one"
            )
    suites = [r.record.get("suite") or {} for r in runs]
    suite: dict[str, Any] = dict(suites[0])
    suite["name"] = "+".join(dict.fromkeys(r.suite_name for r in runs))

    def union(key: str) -> list[Any]:
        out: list[Any] = []
        for s in suites:
            for x in s.get(key) or []:
                if x not in out:
                    out.append(x)
        return out

    for key in ("models", "metrics", "optional_metrics", "reference"):
        suite[key] = union(key)
    record = dict(runs[0].record)
    record.update(
        suite=suite,
        run_id="+".join(r.run_id for r in runs),
        merged_runs=[{"run_id": r.run_id, "suite": r.suite_name, "path": str(r.path)} for r in runs],
    )
    dirs = tuple(d for r in runs for d in (r.dirs or ((r.run_dir,) if r.run_dir is not None else ())))
    return Run(df, record, runs[0].path, dirs)
