"""The report opens in headless Chromium: every image loads, no console errors, a screenshot is written.

Skips when no Chromium is installed (Debian: `apt-get install -y chromium`; or set
BENCH_CHROMIUM to a Chrome/Chromium binary), except under BENCH_REQUIRE_BROWSER=1 (CI, which
installs it), where a missing browser fails the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from report_helpers import tiny_run

from bench.paths import REPO
from bench.report import build_report
from bench.report.browser import INSTALL_HINT, check_page, find_chromium

REQUIRED = os.environ.get("BENCH_REQUIRE_BROWSER") == "1"
pytestmark = pytest.mark.skipif(
    find_chromium() is None and not REQUIRED, reason=f"headless browser test needs Chromium: {INSTALL_HINT}"
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_opens_in_headless_chromium(tmp_path: Path):
    rep = build_report(tiny_run(tmp_path), out=tmp_path / "rep")
    shot = tmp_path / "rep" / "screenshot.png"
    check = check_page(rep.index, shot)
    assert check.ok, check.summary()
    assert check.title.startswith("bench report: tiny / tiny-run")
    assert len(check.images) == len(list(rep.dir.glob("*.png"))) - 1 >= 3  # every figure but the screenshot
    assert all(i["width"] > 100 for i in check.images)
    data = shot.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000
    assert check.size[1] > 1000  # the whole page, not the first screen


@pytest.mark.skipif(
    not (REPO / "results" / "baselines" / "quick.parquet").is_file(),
    reason="results/baselines/quick.parquet not committed yet (issue 6 open)",
)
def test_quick_baseline_report_opens(tmp_path: Path):
    """The report of the committed quick-suite baseline (real numbers, no samples kept: no grids)."""
    baseline = REPO / "results" / "baselines" / "quick.parquet"
    rep = build_report(baseline, out=tmp_path / "quick")
    check = check_page(rep.index, tmp_path / "quick" / "screenshot.png")
    assert check.ok, check.summary()
    assert "digits-unet" in rep.index.read_text() and "digits-dit" in rep.index.read_text()
    assert len(check.images) == 3  # speedup chart and one Pareto figure per model


def test_checker_catches_broken_images_and_console_errors(tmp_path: Path):
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><title>bad</title><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png" alt="gone"><script>console.error("boom")</script></body></html>'
    )
    check = check_page(page, tmp_path / "bad.png")
    assert not check.ok
    assert [i["alt"] for i in check.broken_images] == ["gone"]
    assert any("boom" in e for e in check.console_errors)
    assert (tmp_path / "bad.png").read_bytes().startswith(PNG)
