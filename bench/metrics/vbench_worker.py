"""Runs in the isolated ``vbench`` environment (``bench vbench setup``), never in bench's own:
``python -I vbench_worker.py request.json result.json``. Standard library only at the top level;
vbench, numpy and OpenCV are imported inside the functions that use them.

Requests (``op``):

- ``evaluate``: write each clip (``.npy``, uint8 frames T x H x W x 3, RGB) as an MP4 file with
  OpenCV (clips given as ``.mp4`` are used as they are), then run VBench's own evaluation,
  ``VBench(...).evaluate(..., mode="custom_input", local=True)``, on that folder. Before it, the
  weights each dimension needs are looked for where vbench keeps them (``$VBENCH_CACHE_DIR``):
  vbench's own ``init_submodules`` is run with its download commands recorded instead of run, so
  what is missing is exactly what vbench would download; missing weights are reported (with the
  fetch command) instead of downloaded.
- ``fetch``: run vbench's own ``init_submodules`` for real (it downloads with wget) and the
  aesthetic head's own download.
- ``missing``: only the check of ``evaluate``.

Result: ``{"ok": true, "rows": [{"dimension", "value", "videos": [...], "per_video": [...]}], ...}``
or ``{"ok": false, "error": "missing_weights" | "error", "message": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

FETCH = "bench vbench fetch"
AESTHETIC_HEAD = "sa_0_4_vit_l_14_linear.pth"  # the file vbench.aesthetic_quality downloads into its aesthetic_model dir


def write_mp4(frames_npy: Path, out: Path, fps: float) -> None:
    import cv2
    import numpy as np

    frames = np.load(frames_npy)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{frames_npy}: expected uint8 frames T x H x W x 3, got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {out}")
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def missing_weights(dimensions: list[str]) -> dict[str, list[str]]:
    """For each dimension, what vbench's ``init_submodules(local=True)`` would download (its own
    commands, recorded instead of run), plus the aesthetic head it downloads later."""
    import subprocess

    import vbench.utils as vu

    missing: dict[str, list[str]] = {}
    for dim in dimensions:
        recorded: list[list[str]] = []
        real_run = subprocess.run

        def record(cmd, *args, _into=recorded, **kwargs):
            _into.append([str(c) for c in cmd])
            return subprocess.CompletedProcess(cmd, 0)

        subprocess.run = record
        try:
            sub = vu.init_submodules([dim], local=True)
        finally:
            subprocess.run = real_run
        need = []
        for cmd in recorded:
            if cmd and cmd[0] in ("wget", "git"):
                url = next((c for c in cmd if c.startswith("http")), " ".join(cmd))
                dest = cmd[cmd.index("-P") + 1] if "-P" in cmd else cmd[-1]
                need.append(f"{url} -> {dest}")
        if dim == "aesthetic_quality":
            head = Path(sub[dim][1]) / AESTHETIC_HEAD
            if not head.is_file():
                need.append(f"the LAION aesthetic head {AESTHETIC_HEAD} -> {head.parent}")
        if need:
            missing[dim] = need
    return missing


def missing_message(missing: dict[str, list[str]]) -> str:
    import vbench.utils as vu

    lines = [f"  {d}: " + "; ".join(w) for d, w in missing.items()]
    return (
        f"VBench dimension(s) {', '.join(missing)} need weights that are not in vbench's cache {vu.CACHE_DIR}:\n"
        + "\n".join(lines)
        + f"\nFetch them with `{FETCH} {' '.join(missing)}` (vbench's own downloader; or set $VBENCH_CACHE_DIR to a copy)"
    )


def evaluate(req: dict, wd: Path) -> dict:
    from vbench import VBench

    dims = list(req["dimensions"])
    missing = missing_weights(dims)
    if missing:
        return {"ok": False, "error": "missing_weights", "message": missing_message(missing), "missing": missing}
    vdir = wd / "videos"
    vdir.mkdir(exist_ok=True)
    order, prompts = [], {}
    for i, clip in enumerate(req["videos"]):
        src = Path(clip["path"])
        name = f"{clip.get('name', f'{i:05d}')}.mp4"
        if src.suffix == ".npy":
            write_mp4(src, vdir / name, req.get("fps", 8))
        else:
            (vdir / name).symlink_to(src.resolve())
        order.append(str(vdir / name))
        if clip.get("prompt") is not None:
            prompts[name] = clip["prompt"]
    out = wd / "vbench_out"
    import vbench

    bench = VBench(req.get("device", "cpu"), str(Path(vbench.__file__).parent / "VBench_full_info.json"), str(out))
    bench.evaluate(
        videos_path=str(vdir),
        name="bench",
        prompt_list=prompts if prompts else [],
        dimension_list=dims,
        local=True,
        mode="custom_input",
    )
    raw = json.loads((out / "bench_eval_results.json").read_text())
    rows = []
    for dim in dims:
        total, per = raw[dim]
        by_path = {os.path.abspath(r["video_path"]): r["video_results"] for r in per}
        rows.append(
            {
                "dimension": dim,
                "value": float(total),
                "videos": order,
                "vbench_order": [os.path.abspath(r["video_path"]) for r in per],  # the order vbench read them in
                "per_video": [
                    None if by_path.get(os.path.abspath(p)) is None else float(by_path[os.path.abspath(p)]) for p in order
                ],
            }
        )
    import vbench.utils as vu

    return {"ok": True, "rows": rows, "cache_dir": vu.CACHE_DIR}


def fetch(req: dict) -> dict:
    import vbench.utils as vu

    dims = list(req["dimensions"])
    try:
        sub = vu.init_submodules(dims, local=True)  # downloads with wget (and git, unzip)
        if "aesthetic_quality" in dims:
            from vbench.aesthetic_quality import get_aesthetic_model

            get_aesthetic_model(sub["aesthetic_quality"][1])
    except Exception as e:
        missing = missing_weights(dims)
        return {
            "ok": False,
            "error": "fetch_failed",
            "message": f"vbench's download failed ({type(e).__name__}: {str(e)[:300]}); vbench downloads with "
            f"wget, git and unzip. Fix: put the files there by hand, or set $VBENCH_CACHE_DIR to a copy:\n"
            + missing_message(missing),
        }
    missing = missing_weights(dims)
    if missing:
        return {"ok": False, "error": "error", "message": "after vbench's download:\n" + missing_message(missing)}
    return {"ok": True, "cache_dir": vu.CACHE_DIR}


def main(argv: list[str]) -> int:
    req_path, res_path = Path(argv[1]), Path(argv[2])
    req = json.loads(req_path.read_text())
    try:
        if req["op"] == "evaluate":
            res = evaluate(req, req_path.parent)
        elif req["op"] == "missing":
            missing = missing_weights(list(req["dimensions"]))
            res = {"ok": True, "missing": missing, "message": missing_message(missing) if missing else ""}
        elif req["op"] == "fetch":
            res = fetch(req)
        else:
            res = {"ok": False, "error": "error", "message": f"unknown op {req['op']!r}"}
    except Exception as e:  # reported to bench with the traceback
        res = {"ok": False, "error": "error", "message": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    res_path.write_text(json.dumps(res))
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
