"""Regression tracking over time: a results database across runs (DuckDB over the runs' Parquet
files), cohorts, step detection over commits, ``bench history`` and its page, and the audits."""
