"""The real tier: a diffusers text-to-image pipeline, by hub id or local directory, as a bench model.

The pipeline's network, noise schedule and text encoder become a :class:`ModelBundle` like the
embedded teachers', so every registered method (solvers, caches) runs on it unchanged and the
harness counts, times and scores it the same way:

- the suite's prompts are encoded once; a job's "class" k is prompt k (samples cycle through the
  prompts), and the null class is the negative prompt (empty by default), so classifier-free
  guidance is bench's one batched cond + uncond pass, as in the pipeline itself;
- the noise schedule comes from the pipeline's scheduler config (its betas, its prediction type);
  the sampler is the method's, never the pipeline's own loop;
- samples are latents; ``decode`` (the pipeline's VAE) turns them into images in [-1, 1] for the
  metrics and grids, outside the timed sampler call.

Supported so far: pipelines with a ``UNet2DConditionModel``, a text encoder and a VAE on a
discrete DDPM-family schedule (Stable Diffusion 1.x/2.x and their fine-tunes). Others fail with a
message saying so. Weights are read from a local directory or the local Hugging Face cache;
nothing is downloaded unless ``download: true``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.denoiser import Denoiser, VPSchedule
from bench.models import ModelBundle
from bench.registry import MODELS

PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PipelineError(ValueError):
    """A pipeline that cannot be loaded or is not supported, with the fix in the message."""


class TextConditionedUNet(nn.Module):
    """``net(x, t, cond)`` over a text UNet: ``cond`` indexes the encoded prompts, the last row of
    ``table`` being the negative (null) prompt."""

    def __init__(self, unet: nn.Module, table: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("table", table, persistent=False)

    @property
    def null_class(self) -> int:
        return len(self.table) - 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            cond = torch.full((len(x),), self.null_class, device=x.device, dtype=torch.long)
        emb = self.table[cond.to(self.table.device)]
        return self.unet(x.to(emb.dtype), t, encoder_hidden_states=emb).sample.to(x.dtype)


def load_pipeline(source: str, dtype: torch.dtype, download: bool = False) -> Any:
    """``DiffusionPipeline.from_pretrained`` on a local directory, or on a hub id from the local
    cache (downloading only when ``download``), with an error that names the fix."""
    from diffusers import DiffusionPipeline

    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and (path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1):
        raise PipelineError(f"pipeline {source!r}: no such directory, and not a hub id of the form OWNER/NAME")
    try:
        return DiffusionPipeline.from_pretrained(
            str(path) if local else source, dtype=dtype, local_files_only=not download and not local
        )
    except (OSError, ValueError) as e:
        if local:
            raise PipelineError(f"pipeline directory {path} could not be loaded by diffusers: {e}") from e
        raise PipelineError(
            f"pipeline {source!r} is not in the local Hugging Face cache: fetch it with `hf download {source}` "
            "(or `huggingface-cli download`), point `pipeline:` at a local directory, or set `download: true` "
            f"in the model's options ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def pipeline_kind(source: str) -> str:
    """The prediction kind (eps, v, x0) of a pipeline from its scheduler config alone: in its
    directory, or in the local Hugging Face cache; eps (Stable Diffusion's) when not found there,
    in which case building the model reports what is missing."""
    cfg_path: Path | None = Path(source).expanduser() / "scheduler" / "scheduler_config.json"
    if not cfg_path.is_file():
        cfg_path = None
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            try:
                from huggingface_hub import try_to_load_from_cache

                hit = try_to_load_from_cache(source, "scheduler/scheduler_config.json")
                cfg_path = Path(hit) if isinstance(hit, str) else None
            except Exception:
                cfg_path = None
    if cfg_path is None:
        return "eps"
    try:
        return PREDICTION.get(json.loads(cfg_path.read_text()).get("prediction_type", "epsilon"), "eps")
    except (OSError, ValueError):
        return "eps"


def schedule_of(scheduler: Any) -> tuple[VPSchedule, str]:
    """The discrete VP schedule (betas) and bench prediction kind of a pipeline's scheduler."""
    from diffusers import DDPMScheduler

    cfg = dict(scheduler.config)
    if "beta_schedule" not in cfg or cfg.get("use_flow_sigmas") or "shift" in cfg:
        raise PipelineError(
            f"the pipeline's scheduler {type(scheduler).__name__} is not a discrete DDPM-family schedule; "
            "bench's diffusers backend supports those so far (Stable Diffusion 1.x/2.x), not flow-matching pipelines"
        )
    kind = PREDICTION.get(cfg.get("prediction_type", "epsilon"))
    if kind is None:
        raise PipelineError(f"unsupported prediction_type {cfg.get('prediction_type')!r} in the scheduler config")
    ddpm = DDPMScheduler.from_config(cfg)  # computes the betas of any beta_schedule the pipeline names
    return VPSchedule(tuple(ddpm.betas.double().tolist())), kind


def pipeline_hash(pipe: Any) -> str:
    """A fingerprint of the weights: every component's config and its parameters' names, shapes
    and a sum of each tensor (cheap, and changes with any retraining or fine-tune)."""
    h = hashlib.sha256()
    for name, comp in sorted(pipe.components.items()):
        if comp is None:
            continue
        cfg = getattr(comp, "config", None)
        if cfg is not None:
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)  # transformers' configs, diffusers' FrozenDicts
            h.update(f"{name}:{json.dumps(cfg, sort_keys=True, default=str)}".encode())
        if isinstance(comp, nn.Module):
            for pname, p in comp.state_dict().items():
                h.update(f"{name}.{pname}{tuple(p.shape)}{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _decoder(vae: nn.Module, device: str | torch.device, batch: int = 8) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        out = []
        for lo in range(0, len(latents), batch):
            z = latents[lo : lo + batch].to(device=device, dtype=vae.dtype) / scale + shift
            out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    return decode


@MODELS.register(
    "diffusers",
    kind="eps|v",
    data="image",
    description="a diffusers text-to-image pipeline (UNet2DConditionModel, DDPM-family schedule) by hub id or local path",
    options={
        "pipeline": "hub id (OWNER/NAME, from the local Hugging Face cache) or a local directory",
        "prompts": "list of prompts (sample k uses prompt k mod len); or prompts_file",
        "prompts_file": "text file, one prompt per line",
        "negative_prompt": "the null condition of classifier-free guidance (default '')",
        "height": "int, pixels (default: the UNet's sample size x the VAE factor)",
        "width": "int, pixels (default: as height)",
        "dtype": "float32 | float16 | bfloat16 (default float32)",
        "device": "cpu | cuda | auto (default auto)",
        "download": "bool, allow a download from the hub (default false)",
    },
)
def diffusers_pipeline(
    pipeline: str,
    prompts: list[str] | None = None,
    prompts_file: str | None = None,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    dtype: str = "float32",
    device: str = "auto",
    download: bool = False,
) -> ModelBundle:
    if dtype not in DTYPES:
        raise PipelineError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if prompts_file is not None:
        p = Path(prompts_file).expanduser()
        if not p.is_file():
            raise PipelineError(f"prompts_file {p} not found")
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts or not all(isinstance(s, str) for s in prompts):
        raise PipelineError("a diffusers text-to-image model needs `prompts: [..]` (a list of strings) or `prompts_file:`")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    pipe = load_pipeline(pipeline, DTYPES[dtype], bool(download))
    unet = getattr(pipe, "unet", None)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if getattr(pipe, c, None) is None]
    if missing or type(unet).__name__ != "UNet2DConditionModel" or not hasattr(pipe, "encode_prompt"):
        raise PipelineError(
            f"{type(pipe).__name__} is not supported yet: bench's diffusers backend runs text-to-image pipelines with a "
            f"UNet2DConditionModel, a text encoder and a VAE (Stable Diffusion 1.x/2.x){'; missing: ' + ', '.join(missing) if missing else ''}"
        )
    schedule, kind = schedule_of(pipe.scheduler)
    pipe.to(dev)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    height = int(height or unet.config.sample_size * factor)
    width = int(width or height)
    if height % factor or width % factor:
        raise PipelineError(f"height and width must be multiples of {factor} (the VAE's downsampling), got {height}x{width}")
    with torch.no_grad():
        emb, neg = pipe.encode_prompt(list(prompts), dev, 1, True, negative_prompt=[negative_prompt] * len(prompts))
    net = TextConditionedUNet(unet, torch.cat([emb, neg[:1]])).eval().requires_grad_(False)
    return ModelBundle(
        name="diffusers",
        denoiser=Denoiser(net, kind, schedule, net.null_class),
        sample_shape=(int(unet.config.in_channels), height // factor, width // factor),
        data="image",
        num_classes=len(prompts),
        dtype=torch.float32,
        weights_hash=pipeline_hash(pipe),
        extra={"prompts": list(prompts), "decode": _decoder(pipe.vae, dev), "pipeline": type(pipe).__name__},
    )
