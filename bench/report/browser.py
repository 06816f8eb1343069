"""Open a report in headless Chromium and check it: every image loads, no console errors, and a
screenshot is written. Talks the DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in,
fd 4 out, NUL-separated JSON), so it needs no Python package beyond the standard library.

``python -m bench.report.browser reports/<run-id>/index.html [--screenshot shot.png]``
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
INSTALL_HINT = "install it (Debian: apt-get install -y chromium) or set BENCH_CHROMIUM to its path"


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or did not answer in time."""


def find_chromium() -> str | None:
    """$BENCH_CHROMIUM, else the first Chromium/Chrome on PATH."""
    env = os.environ.get("BENCH_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    url: str
    title: str
    images: list[dict[str, Any]]
    console_errors: list[str]
    screenshot: Path
    size: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)
    animations: list[dict[str, Any]] = field(default_factory=list)  # GIFs as Chromium decodes them: alt, frames, error

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        return [i for i in self.images if not i["complete"] or i["width"] == 0]

    @property
    def broken_animations(self) -> list[dict[str, Any]]:
        return [a for a in self.animations if a["error"] or a["frames"] < 1]

    @property
    def ok(self) -> bool:
        return not self.broken_images and not self.broken_animations and not self.console_errors

    def summary(self) -> str:
        s = f"{self.url}: {len(self.images)} images, {len(self.broken_images)} broken, {len(self.console_errors)} console errors"
        if self.animations:
            s += f", {len(self.animations)} animations ({len(self.broken_animations)} undecodable)"
        s += f"; screenshot {self.screenshot} ({self.size[0]}x{self.size[1]})"
        bad = [f"broken image: {i['alt'] or i['src']}" for i in self.broken_images]
        bad += [f"undecodable animation: {a['alt']}: {a['error']}" for a in self.broken_animations]
        return "\n  ".join([s] + bad + self.console_errors)


class _Pipe:
    """A DevTools session over the browser's debugging pipe."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int) -> None:
        self.proc, self.w, self.r = proc, to_browser, from_browser
        self.next_id = 0
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def stderr_tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-1500:]

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.inbox.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self.inbox.put(json.loads(msg))

    def _next(self, deadline: float) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError("Chromium did not answer in time")
        try:
            msg = self.inbox.get(timeout=left)
        except queue.Empty:
            raise BrowserError("Chromium did not answer in time") from None
        if msg is None:
            time.sleep(0.5)
            raise BrowserError(f"Chromium closed the debugging pipe (exit code {self.proc.poll()}): {self.stderr_tail()}")
        return msg

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self.w, json.dumps(msg).encode() + b"\0")
        except OSError as e:
            raise BrowserError(f"Chromium is not listening ({e}); exit code {self.proc.poll()}: {self.stderr_tail()}") from e
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise BrowserError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(
                "console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            )
        elif e.get("method") == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            ent = p["entry"]
            out.append(f"{ent.get('source', 'log')}: {ent.get('text', '')} {ent.get('url', '')}".strip())
    return out


IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({
  src: i.currentSrc.slice(0, 80), alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"""

# every animated image (GIF) decoded by the browser's own decoder (WebCodecs ImageDecoder): its frame count
ANIMATIONS_JS = """(async () => JSON.stringify(await Promise.all(Array.from(document.images)
  .filter(i => i.currentSrc.startsWith('data:image/gif') || i.currentSrc.toLowerCase().endsWith('.gif'))
  .map(async i => {
    try {
      const data = await (await fetch(i.currentSrc)).arrayBuffer();
      const dec = new ImageDecoder({data, type: 'image/gif'});
      await dec.tracks.ready;
      await dec.completed;
      const frames = dec.tracks.selectedTrack.frameCount;
      await dec.decode({frameIndex: frames - 1});
      return {alt: i.alt, frames, error: ''};
    } catch (e) { return {alt: i.alt, frames: 0, error: String(e)}; }
  }))))()"""


def _above(fd: int, low: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return new


def check_page(page: Path, screenshot: Path, chromium: str | None = None, width: int = 1400, timeout: float = 90) -> PageCheck:
    """Load ``page`` (a file) in headless Chromium; report its images and console errors and
    write a full-page PNG screenshot to ``screenshot``."""
    exe = chromium or find_chromium()
    if exe is None:
        raise BrowserError(f"no Chromium found; {INSTALL_HINT}")
    page = Path(page).resolve()
    if not page.is_file():
        raise BrowserError(f"no such page: {page}")
    url = page.as_uri()
    in_r, in_w = os.pipe()  # we write, Chromium reads on fd 3
    out_r, out_w = os.pipe()  # Chromium writes on fd 4, we read
    # the child's ends move above fd 10 first, so that dup2 onto 3 and 4 cannot clobber one another
    in_r, out_w = (_above(fd, 10) for fd in (in_r, out_w))
    with tempfile.TemporaryDirectory(prefix="bench-chromium-") as profile:

        def onto_3_and_4() -> None:  # in the child, before exec: the fds Chromium's pipe mode reads and writes
            os.dup2(in_r, 3)
            os.dup2(out_w, 4)

        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        proc = subprocess.Popen(
            cmd,
            preexec_fn=onto_3_and_4,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(in_r)
        os.close(out_w)
        cdp = _Pipe(proc, in_w, out_r)
        try:
            target = cdp.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            sess = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                cdp.call(f"{domain}.enable", session=sess)
            cdp.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                sess,
            )
            nav = cdp.call("Page.navigate", {"url": url}, session=sess)
            if nav.get("errorText"):
                raise BrowserError(f"navigating to {url} failed: {nav['errorText']}")
            cdp.wait_event("Page.loadEventFired", timeout=timeout)
            images = json.loads(
                cdp.call("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True}, sess)["result"]["value"]
            )
            title = cdp.call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True}, sess)["result"]["value"]
            anim = cdp.call(
                "Runtime.evaluate",
                {"expression": ANIMATIONS_JS, "returnByValue": True, "awaitPromise": True},
                sess,
                timeout=timeout,
            )
            animations = json.loads(anim["result"]["value"]) if anim.get("result", {}).get("type") == "string" else []
            metrics = cdp.call("Page.getLayoutMetrics", session=sess)
            h = int(min(metrics.get("cssContentSize", metrics.get("contentSize", {})).get("height", 900), 16000))
            cdp.call(
                "Emulation.setDeviceMetricsOverride", {"width": width, "height": h, "deviceScaleFactor": 1, "mobile": False}, sess
            )
            shot = cdp.call("Page.captureScreenshot", {"format": "png"}, sess, timeout=timeout)
            screenshot = Path(screenshot)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            time.sleep(0.2)  # let late console messages arrive
            try:
                cdp.call("Runtime.evaluate", {"expression": "1", "returnByValue": True}, sess, timeout=10)
            except BrowserError:
                pass
            errors = _console_errors(cdp.events)
            try:
                cdp.call("Browser.close", timeout=10)
            except BrowserError:
                pass
        finally:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(in_w)
            os.close(out_r)
    return PageCheck(url, title, images, errors, screenshot, (width, h), animations=animations)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path)
    p.add_argument("--screenshot", type=Path, help="PNG path (default: screenshot.png beside the page)")
    args = p.parse_args(argv)
    try:
        check = check_page(args.page, args.screenshot or args.page.parent / "screenshot.png")
    except BrowserError as e:
        print(f"browser check: {e}", file=sys.stderr)
        return 2
    print(check.summary())
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
