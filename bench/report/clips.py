"""Clips in the report: samples of shape (N, F, C, H, W) (a video model's) shown for the same seeds
across methods, as a frame strip PNG (seeds as rows, frames left to right) and an animated GIF
(seeds side by side) per configuration.

Sample k of every job starts from the noise of seed k, so row k of every strip, and clip k of every
animation, shows what each configuration made of the same starting noise. Which samples are clips
is read from their shape alone (5 dimensions), never from the model's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.report.data import Run, config_label, method_label

SEEDS = 4  # clips per configuration: seeds 0..3 (class k mod 10 on a class-conditional model)
SCALE = 4  # each pixel of a frame strip drawn as SCALE x SCALE (16x16 frames -> 64x64)
GIF_SCALE = 2  # an animation's pixels are drawn 2 x 2 (GIF's LZW compresses enlarged pixels poorly: 4x costs 4x the
# bytes) and the page shows them at SCALE, as the strips, with nearest-neighbour scaling
GAP = 1  # pixels (before scaling) between frames and between clips
FRAME_MS = 160  # display time of one animation frame
BAR = 1  # pixels (before scaling) of the frame-position bar under each animation frame
BACKGROUND = 128  # grey between frames


def is_clip(samples: np.ndarray | None) -> bool:
    """True for samples (N, F, C, H, W): clips, with C one (grey) or three (RGB) channels."""
    return samples is not None and samples.ndim == 5 and samples.shape[2] in (1, 3)


def _uint8_frames(x: np.ndarray) -> np.ndarray:
    """[-1, 1] clips (N, F, C, H, W) -> uint8 (N, F, H, W, C), as bench.video_data.to_uint8_frames."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1, 1)
    return np.round((x + 1) * 127.5).astype(np.uint8).transpose(0, 1, 3, 4, 2)


def _canvas(rows: int, cols: int, h: int, w: int, c: int, extra_h: int = 0) -> np.ndarray:
    return np.full((rows * (h + GAP) - GAP + extra_h, cols * (w + GAP) - GAP, c), BACKGROUND, dtype=np.uint8)


def _image(a: np.ndarray, scale: int = SCALE) -> Image.Image:
    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, "L" if a.shape[-1] == 1 else "RGB")
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def frame_strip(samples: np.ndarray, path: Path, seeds: int = SEEDS) -> Path:
    """Write the first ``seeds`` clips as one PNG: row k is clip k (seed k), frames left to right."""
    if not is_clip(samples):
        raise ValueError(f"a frame strip needs clips (N, F, C, H, W) with 1 or 3 channels, got shape {np.shape(samples)}")
    u = _uint8_frames(samples[:seeds])
    n, f, h, w, c = u.shape
    out = _canvas(n, f, h, w, c)
    for i in range(n):
        for j in range(f):
            out[i * (h + GAP) : i * (h + GAP) + h, j * (w + GAP) : j * (w + GAP) + w] = u[i, j]
    _image(out).save(path, optimize=True)
    return Path(path)


def clip_animation(samples: np.ndarray, path: Path, seeds: int = SEEDS, frame_ms: int = FRAME_MS) -> Path:
    """Write the first ``seeds`` clips side by side as an animated GIF of F frames, looping; a bar
    under the clips shows the frame's position (so every frame differs from the last, and the GIF
    keeps all F frames even where a clip stands still)."""
    if not is_clip(samples):
        raise ValueError(f"an animation needs clips (N, F, C, H, W) with 1 or 3 channels, got shape {np.shape(samples)}")
    u = _uint8_frames(samples[:seeds])
    n, f, h, w, c = u.shape
    frames = []
    for j in range(f):
        out = _canvas(1, n, h, w, c, extra_h=GAP + BAR)
        for i in range(n):
            out[:h, i * (w + GAP) : i * (w + GAP) + w] = u[i, j]
        out[h + GAP :, : max(1, round(out.shape[1] * (j + 1) / f))] = 255
        frames.append(_image(out, GIF_SCALE))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, optimize=False, disposal=1)
    return Path(path)


@dataclass(frozen=True)
class ClipFigure:
    """One configuration's clips: its frame strip and animation."""

    model: str
    guidance: float
    label: str  # the configuration (method variant, steps, guidance)
    strip: Path
    animation: Path
    frames: int
    seeds: int


def clip_figures(run: Run, out: Path, seeds: int = SEEDS) -> list[ClipFigure]:
    """A frame strip and an animation of seeds 0..seeds-1 for every finished job of ``run`` whose
    samples are clips, ordered by model, guidance, method variant and steps."""
    from bench.report.grids import slug

    ok = run.ok.copy()
    if ok.empty:
        return []
    ok["variant"] = ok.apply(method_label, axis=1)
    ok["_g"] = ok["guidance"].astype(float)
    ok["_s"] = ok["steps"].astype(int)
    made = []
    for _, r in ok.sort_values(["model", "_g", "variant", "_s"], kind="stable").iterrows():
        x = run.samples(r["job_id"])
        if not is_clip(x):
            continue
        name = f"clip_{slug(r['model'])}_w{r['_g']:g}_{slug(r['variant'])}_{r['_s']}"
        k = min(seeds, len(x))
        strip = frame_strip(x, out / f"{name}.png", k)
        anim = clip_animation(x, out / f"{name}.gif", k)
        made.append(ClipFigure(str(r["model"]), float(r["_g"]), config_label(r), strip, anim, int(x.shape[1]), k))
    return made


def clips_html(figs: list[ClipFigure]) -> str:
    """Per (model, guidance): a table of configurations with each one's frame strip and animation,
    both embedded (data URIs) with alt text."""
    from bench.report.html import esc, media

    body = []
    groups: dict[tuple[str, float], list[ClipFigure]] = {}
    for f in figs:
        groups.setdefault((f.model, f.guidance), []).append(f)
    for (model, g), fs in groups.items():
        k, nf = fs[0].seeds, fs[0].frames
        body.append(f"<h3>{esc(model)}, guidance {g:g}</h3>")
        body.append(
            f'<p class="meta">Every configuration starts clip k from the noise of seed k (rows of the strips, clips of the '
            f"animations left to right: seeds 0-{k - 1}; a class-conditional model draws class k mod its number). Strips: "
            f"frames 1-{nf} left to right. Animations: {nf} frames at {1000 // FRAME_MS} frames per second, looping; the "
            "white bar under them marks the frame.</p>"
        )
        rows = []
        for f in fs:
            strip = media(f.strip, f"frame strip of {f.label} on {model}: seeds 0-{k - 1} (rows), frames 1-{f.frames} (columns)")
            alt = f"animation of {f.label} on {model}: seeds 0-{k - 1} left to right, {f.frames} frames"
            anim = media(f.animation, alt, zoom=SCALE // GIF_SCALE)
            rows.append(f"<tr><td>{esc(f.label)}</td><td>{strip}</td><td>{anim}</td></tr>")
        body.append(
            '<table class="clips"><tr><th>configuration</th><th>frame strip</th><th>animation</th></tr>'
            + "".join(rows)
            + "</table>"
        )
    return "\n".join(body)
