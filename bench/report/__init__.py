"""Reports of a run: Pareto frontiers, speedup against training cost, sample grids, a
leaderboard and provenance, as one self-contained HTML page (``bench report``)."""

from __future__ import annotations

from bench.report.build import REPORTS, Report, build_report
from bench.report.data import Run, RunError, load_run
from bench.report.matched import ReferenceSpec

__all__ = ["REPORTS", "Report", "Run", "RunError", "ReferenceSpec", "build_report", "load_run"]
