"""The results database across runs: DuckDB over the runs' own Parquet files.

``open_db(results_root)`` reads every run's ``run.json`` (and the cohort sidecar ``bench run``
writes beside it) into two small tables and defines views over the ``results.parquet`` files,
which stay where ``bench run`` wrote them (DuckDB reads them in place; nothing is copied):

- ``runs``: one row per run: suite, run_id, git_sha, started (ISO time), path, parquet;
- ``cohorts``: one row per (run, model): the cohort key and its fields as JSON (:mod:`bench.history.cohort`);
- ``rows``: every job row of every run (``read_parquet(..., union_by_name)``, so runs of different
  bench versions with different columns union), with ``filename`` naming its Parquet file;
- ``history``: ``rows`` joined with ``runs`` and ``cohorts``: each row with its commit, date and cohort.

The database file (``RESULTS/history.duckdb``) is rebuilt on each call, so it always reflects the
runs on disk; open it with any DuckDB client, or ``bench history --sql``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.history.cohort import cohort_fields, cohort_key, read_sidecar

DB_NAME = "history.duckdb"


@dataclass
class HistoryDB:
    con: Any  # duckdb.DuckDBPyConnection
    path: Path
    n_runs: int

    def sql(self, query: str, params: list[Any] | None = None) -> pd.DataFrame:
        return self.con.execute(query, params or []).df()

    def close(self) -> None:
        self.con.close()


def _device_names(parquet: Path) -> dict[str, str]:
    """Each model's device name in a run (the GPU's name on CUDA), from its rows."""
    try:
        df = pd.read_parquet(parquet, columns=["model", "device_name"])
    except Exception:
        return {}
    return {
        str(m): str(g["device_name"].dropna().iloc[0]) if g["device_name"].notna().any() else "" for m, g in df.groupby("model")
    }


def scan_runs(results: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``runs`` and ``cohorts`` tables of every run under ``results/<suite>/<run-id>/``."""
    runs, cohorts = [], []
    for parquet in sorted(Path(results).glob("*/*/results.parquet")):
        run_dir = parquet.parent
        try:
            record = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError):
            continue  # not a whole run: nothing to place in time
        if not isinstance(record, dict):
            continue
        try:
            models = sorted(pd.read_parquet(parquet, columns=["model"])["model"].dropna().astype(str).unique())
        except Exception:
            continue
        suite = (record.get("suite") or {}).get("name") or run_dir.parent.name
        runs.append(
            {
                "suite": str(suite),
                "run_id": str(record.get("run_id") or run_dir.name),
                "git_sha": str(record.get("git_sha") or "unknown"),
                "started": str(record.get("started") or ""),
                "path": str(run_dir.resolve()),
                "parquet": str(parquet.resolve()),
            }
        )
        sidecar = read_sidecar(run_dir)
        names = _device_names(parquet)
        for m in models:
            fields = cohort_fields(record, sidecar, m, names.get(m, ""))
            cohorts.append(
                {
                    "parquet": str(parquet.resolve()),
                    "model": m,
                    "cohort": cohort_key(fields),
                    "fields": json.dumps(fields, sort_keys=True, default=str),
                }
            )
    cols_r = ["suite", "run_id", "git_sha", "started", "path", "parquet"]
    return pd.DataFrame(runs, columns=cols_r), pd.DataFrame(cohorts, columns=["parquet", "model", "cohort", "fields"])


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def open_db(results: Path, db_path: Path | None = None) -> HistoryDB:
    """Build (or rebuild) the database over every run under ``results`` and return it open."""
    import duckdb

    runs, cohorts = scan_runs(results)
    path = Path(db_path) if db_path is not None else Path(results) / DB_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    con.register("runs_df", runs)
    con.register("cohorts_df", cohorts)
    con.execute("CREATE OR REPLACE TABLE runs AS SELECT * FROM runs_df")
    con.execute("CREATE OR REPLACE TABLE cohorts AS SELECT * FROM cohorts_df")
    con.unregister("runs_df")
    con.unregister("cohorts_df")
    if len(runs):
        files = "[" + ", ".join(_quote(p) for p in runs["parquet"]) + "]"
        con.execute(f"CREATE OR REPLACE VIEW rows AS SELECT * FROM read_parquet({files}, union_by_name = true, filename = true)")
    else:  # an empty database still has the views, so queries fail only for want of rows
        con.execute("CREATE OR REPLACE VIEW rows AS SELECT NULL::VARCHAR AS filename, NULL::VARCHAR AS model WHERE false")
    con.execute(
        "CREATE OR REPLACE VIEW history AS SELECT r.*, u.git_sha AS commit, u.started, u.path AS run_dir, c.cohort, "
        "c.fields AS cohort_fields FROM rows r JOIN runs u ON r.filename = u.parquet "
        "LEFT JOIN cohorts c ON c.parquet = r.filename AND c.model = r.model"
    )
    return HistoryDB(con, path, len(runs))


def suite_history(db: HistoryDB, suite: str, columns: list[str]) -> pd.DataFrame:
    """The rows of a suite's runs in commit order (run start time, then run id), with the given
    row columns (those a run lacks are NULL) plus commit, started, run_id, cohort."""
    have = set(db.sql("SELECT * FROM history LIMIT 0").columns)
    sel = ", ".join(f'"{c}"' if c in have else f'NULL AS "{c}"' for c in columns)
    return db.sql(
        f"SELECT {sel}, commit, started, u_run_id AS run_id, cohort, cohort_fields FROM "
        "(SELECT *, run_dir AS u_run_dir FROM history) h JOIN (SELECT path, run_id AS u_run_id, suite AS u_suite FROM runs) x "
        "ON h.run_dir = x.path WHERE x.u_suite = ? ORDER BY started, u_run_id",
        [suite],
    )
