"""Human-preference rewards whose packages clash with bench's environment: ImageReward (Xu et al.
2023, ``image-reward`` 1.5: timm 0.6.13, a transformers whose BLIP internals it imports) and HPS
v2.1 (Wu et al. 2023, ``hpsv2`` 1.2.0: protobuf<4 and its own copy of open_clip).

Each runs in its own isolated environment (``bench env setup imagereward|hpsv2``,
:mod:`bench.envs`); bench never imports them. The samples go to
:mod:`bench.metrics.preference_worker` as PNG files with their prompts and the package's own
scoring function comes back as one value per (image, prompt) pair. The checkpoints live in
``$BENCH_HOME/weights/<env>``, the base networks the packages build on in the Hugging Face cache;
the worker runs with the hub offline, and absent weights fail with a message naming them and
``bench env fetch <env>`` (which runs the packages' own downloads).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.envs import run_worker
from bench.metrics.base import MetricContext, Statistic, images_uint8, register_metric


@dataclass(frozen=True)
class PreferenceModel:
    metric: str
    env: str
    description: str
    weights: str

    @property
    def fetch_command(self) -> str:
        return f"bench env fetch {self.env}"

    def weights_dir(self) -> Path:
        from bench.weights import weights_dir

        return weights_dir() / self.env


MODELS = {
    m.metric: m
    for m in [
        PreferenceModel(
            "imagereward",
            "imagereward",
            "ImageReward v1.0 (Xu et al. 2023): a BLIP reward model trained on 137k expert comparisons, "
            "normalised reward of (image, prompt) pairs",
            "ImageReward.pt + med_config.json (THUDM/ImageReward) and the bert-base-uncased tokenizer",
        ),
        PreferenceModel(
            "hpsv2_1",
            "hpsv2",
            "HPS v2.1 (Wu et al. 2023): CLIP ViT-H/14 fine-tuned on HPD v2 preferences, (image, prompt) similarity",
            "HPS_v2.1_compressed.pt (xswu/HPSv2) on open_clip ViT-H-14 laion2B-s32B-b79K",
        ),
    ]
}


def worker_script() -> Path:
    """The worker file run in the environments (imported here only for its path: it imports nothing
    outside the standard library at its top, and these metrics' code version covers it)."""
    from bench.metrics import preference_worker

    return Path(preference_worker.__file__)


def _request(m: PreferenceModel, op: str, device: str = "cpu") -> dict:
    return {
        "op": op,
        "model": m.env,
        "metric": m.metric,
        "weights_dir": str(m.weights_dir()),
        "fetch_command": m.fetch_command,
        "device": device,
        "images": [],
    }


def write_pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    """[-1, 1] images (N, C, H, W) as RGB PNG files, as bench saves samples."""
    from PIL import Image

    arr = images_uint8(images).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    paths = []
    for i, im in enumerate(arr):
        p = folder / f"{i:05d}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


def score(metric: str, images: torch.Tensor, prompts: list[str], device: str = "cpu", timeout: float | None = None) -> np.ndarray:
    """The package's own score of each (image, prompt) pair, computed in its environment."""
    m = MODELS[metric]
    if len(prompts) != len(images):
        raise ValueError(f"{metric}: {len(prompts)} prompts for {len(images)} images")
    with tempfile.TemporaryDirectory(prefix=f"bench-{m.env}-") as tmp:
        paths = write_pngs(images, Path(tmp))
        req = _request(m, "score", device)
        req["images"] = [{"path": str(p), "prompt": pr} for p, pr in zip(paths, prompts, strict=True)]
        res = run_worker(m.env, worker_script(), req, workdir=Path(tmp), timeout=timeout)
    return np.asarray(res["values"], dtype=np.float64)


def missing_weights(metric: str) -> list[str]:
    """The files ``metric`` needs that are absent (empty: ready), asked in its environment."""
    m = MODELS[metric]
    return run_worker(m.env, worker_script(), _request(m, "missing"))["missing"]


def fetch(env: str) -> list[str]:
    """Run the package's own downloads of its weights (needs network); returns what is still missing."""
    (m,) = [m for m in MODELS.values() if m.env == env]
    online = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    return run_worker(m.env, worker_script(), _request(m, "fetch"), env=online)["missing"]


def _metric(metric: str):
    m = MODELS[metric]

    @register_metric(
        metric,
        higher_is_better=True,
        data="image",
        consumes=("images", "prompts"),
        weights=f"{m.weights} (`{m.fetch_command}`)",
        description=f"{m.description}; computed by the package itself in `bench env setup {m.env}`'s environment",
    )
    def fn(ctx: MetricContext) -> Statistic:
        if ctx.prompts is None:
            raise ValueError(
                f"{metric} scores (image, prompt) pairs and {ctx.bundle.name} gives its samples no prompts "
                "(digits models are conditioned on class labels: their text-free stand-in is class_acc)"
            )
        key = f"{metric}_values"
        if key not in ctx.cache:
            ctx.cache[key] = score(metric, ctx.samples, list(ctx.prompts), device=ctx.device)
        v = ctx.cache[key]
        return Statistic(lambda idx: float(v[idx].mean()), len(v))

    return fn


imagereward = _metric("imagereward")
hpsv2_1 = _metric("hpsv2_1")
