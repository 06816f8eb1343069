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


def test_video_report_shows_clips_with_no_broken_media(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Issue 15, acceptance 5: the report of a video run (clips of the committed moving-digits-dit,
    same seeds across methods) opens with no broken image, and Chromium's own decoder reads every
    embedded GIF with its 8 frames."""
    from test_video_harness import VIDEO_ASSETS_PRESENT, tiny_video_run

    if not VIDEO_ASSETS_PRESENT:
        pytest.skip("bench/assets/moving-digits-*.safetensors not trained yet")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    rep = build_report(tiny_video_run(tmp_path), out=tmp_path / "rep")
    check = check_page(rep.index, tmp_path / "rep" / "screenshot.png")
    assert check.ok, check.summary()
    assert len(check.images) == len(list(rep.dir.glob("*.png"))) - 1 + len(list(rep.dir.glob("*.gif")))
    anims = check.animations
    assert len(anims) == 4 and all(a["frames"] == 8 and not a["error"] for a in anims), anims
    assert all(a["alt"].startswith("animation of ") for a in anims)
    assert sum(i["alt"].startswith("frame strip of ") for i in check.images) == 4


def test_checker_catches_undecodable_animations(tmp_path: Path):
    import base64

    from PIL import Image

    frames = [Image.new("L", (8, 8), c) for c in (0, 255)]
    frames[0].save(tmp_path / "ok.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good = base64.b64encode((tmp_path / "ok.gif").read_bytes()).decode()
    torn = base64.b64encode((tmp_path / "ok.gif").read_bytes()[:20]).decode()
    page = tmp_path / "anim.html"
    page.write_text(
        '<!DOCTYPE html><html><head><title>anim</title><link rel="icon" href="data:,"></head><body>'
        f'<img src="data:image/gif;base64,{good}" alt="good"><img src="data:image/gif;base64,{torn}" alt="torn"></body></html>'
    )
    check = check_page(page, tmp_path / "anim.png")
    by = {a["alt"]: a for a in check.animations}
    assert by["good"]["frames"] == 2 and not by["good"]["error"]
    assert by["torn"]["error"] and not check.ok
    assert [a["alt"] for a in check.broken_animations] == ["torn"]
