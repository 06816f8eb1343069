"""The real tier: a diffusers text-to-image pipeline, by hub id or local directory, as a bench model.

The pipeline's network, noise schedule and text encoder become a :class:`ModelBundle` like the
embedded teachers', so every registered method (solvers, caches) runs on it unchanged and the
harness counts, times and scores it the same way:

- the suite's prompts are encoded once; a job's "class" k is prompt k (samples cycle through the
  prompts), and the null class is the negative prompt (empty by default), so classifier-free
  guidance is bench's one batched cond + uncond pass, as in the pipeline itself;
- the noise schedule comes from the pipeline's scheduler config (its betas and prediction type, or
  rectified flow for a flow-matching scheduler); the sampler is the method's, never the
  pipeline's own loop, so a flow pipeline's time shift is not applied (the `schedule` knob of
  bench's solvers chooses the steps);
- samples are latents; ``decode`` (the pipeline's VAE) turns them into images in [-1, 1] for the
  metrics and grids, outside the timed sampler call.

Supported so far: ``UNet2DConditionModel`` pipelines on a discrete DDPM-family schedule (Stable
Diffusion 1.x/2.x and their fine-tunes), ``SD3Transformer2DModel`` pipelines on a flow-matching
schedule (Stable Diffusion 3/3.5, with or without the T5 encoder) and ``FluxTransformer2DModel``
pipelines (FLUX.1; a guidance-distilled one takes the guidance scale as an input, one pass per
step). Others fail with a message saying so. Weights are read from a local directory or the local Hugging Face cache;
nothing is downloaded unless ``download: true``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from bench.bundle import Capabilities, ModelBundle
from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.models.digits_nets import image_ids, pack, unpack  # Flux's 2x2 token packing and position ids
from bench.models.options import ModelOptions
from bench.registry import MODELS

PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PipelineError(ValueError):
    """A pipeline that cannot be loaded or is not supported, with the fix in the message."""


class TextConditionedNet(nn.Module):
    """``net(x, t, cond[, guidance])`` over a pipeline's text-conditioned network: ``cond`` indexes
    the encoded prompts, the last row of ``table`` being the negative (null) prompt.

    ``family`` says how the network is called: ``unet`` (a UNet2DConditionModel, kept as
    ``.unet``), ``sd3`` (an SD3 transformer, also given the pooled text embedding) or ``flux`` (a
    Flux transformer: latents packed into 2x2 patch tokens with their position ids, t / 1000 as
    FluxPipeline passes it, and the guidance scale as an input when the model is guidance-
    distilled). Transformers are kept as ``.transformer``, where the caches look for them."""

    def __init__(
        self,
        model: nn.Module,
        family: str,
        table: torch.Tensor,
        pooled: torch.Tensor | None = None,
        latent_hw: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        setattr(self, "unet" if family == "unet" else "transformer", model)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)
        if family == "flux":
            self.register_buffer("img_ids", image_ids(*latent_hw).to(table.dtype), persistent=False)
            self.register_buffer("txt_ids", torch.zeros(table.shape[1], 3, dtype=table.dtype), persistent=False)

    @property
    def null_class(self) -> int:
        return len(self.table) - 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float | None = None) -> torch.Tensor:
        if cond is None:
            cond = torch.full((len(x),), self.null_class, device=x.device, dtype=torch.long)
        cond = cond.to(self.table.device)
        emb = self.table[cond]
        h = x.to(emb.dtype)
        if self.family == "unet":
            out = self.unet(h, t, encoder_hidden_states=emb).sample
        elif self.family == "sd3":
            out = self.transformer(
                hidden_states=h, timestep=t, encoder_hidden_states=emb, pooled_projections=self.pooled[cond]
            ).sample
        else:
            g = None if guidance is None else torch.full((len(x),), float(guidance), device=x.device, dtype=torch.float32)
            out = self.transformer(
                hidden_states=pack(h), timestep=t.to(emb.dtype) / 1000, guidance=g, pooled_projections=self.pooled[cond],
                encoder_hidden_states=emb, txt_ids=self.txt_ids, img_ids=self.img_ids,
            ).sample  # fmt: skip
            out = unpack(out, *x.shape[1:])
        return out.to(x.dtype)


def _model_index(source: str) -> dict[str, Any]:
    """The pipeline's model_index.json (its directory, or the local Hugging Face cache); {} if absent."""
    path: Path | None = Path(source).expanduser() / "model_index.json"
    if not path.is_file():
        path = _cached(source, "model_index.json")
    try:
        return json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}


def _cached(source: str, filename: str) -> Path | None:
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source, filename)
    except Exception:
        return None
    return Path(hit) if isinstance(hit, str) else None


def load_pipeline(source: str, dtype: torch.dtype, download: bool = False) -> Any:
    """``DiffusionPipeline.from_pretrained`` on a local directory, or on a hub id from the local
    cache (downloading only when ``download``), with an error that names the fix."""
    from diffusers import DiffusionPipeline

    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and (path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1):
        raise PipelineError(f"pipeline {source!r}: no such directory, and not a hub id of the form OWNER/NAME")
    # components saved as absent (SD3 without its T5 encoder, say) must be passed as None to load
    absent = {k: None for k, v in _model_index(source).items() if isinstance(v, list) and v == [None, None]}
    try:
        return DiffusionPipeline.from_pretrained(
            str(path) if local else source, dtype=dtype, local_files_only=not download and not local, **absent
        )
    except (OSError, ValueError) as e:
        if local:
            raise PipelineError(f"pipeline directory {path} could not be loaded by diffusers: {e}") from e
        raise PipelineError(
            f"pipeline {source!r} is not in the local Hugging Face cache: fetch it with `hf download {source}`, "
            "point `pipeline:` at a local directory, or set `download: true` "
            f"in the model's options ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def pipeline_kind(source: str) -> str:
    """The prediction kind (eps, v, x0, flow) of a pipeline from its scheduler config alone: in its
    directory, or in the local Hugging Face cache; "" (unknown) when not found there, in which case
    building the model reports what is missing."""
    cfg_path: Path | None = Path(source).expanduser() / "scheduler" / "scheduler_config.json"
    if not cfg_path.is_file():
        cfg_path = _cached(source, "scheduler/scheduler_config.json")
    if cfg_path is None:
        return ""
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return ""
    if str(cfg.get("_class_name", "")).startswith("FlowMatch"):
        return "flow"
    return PREDICTION.get(cfg.get("prediction_type", "epsilon"), "eps")


def pipeline_capabilities(source: str) -> Capabilities | None:
    """A pipeline's capabilities from its configs alone (scheduler and model index, in its directory
    or the local Hugging Face cache); None when it is not on this machine."""
    kind = pipeline_kind(source)
    if not kind:
        return None
    index = _model_index(source)
    cls = next((v[1] for k, v in index.items() if k in ("unet", "transformer") and isinstance(v, list) and len(v) == 2), "")
    arch = "unet" if "UNet" in str(cls) else "dit"
    guidance = "cfg"
    if cls == "FluxTransformer2DModel":
        cfg = _component_config(source, "transformer")
        guidance = "embedded" if cfg.get("guidance_embeds") else "cfg"
    return Capabilities(arch, "image", kind, "text", "flow" if kind == "flow" else "vp", guidance)


def _component_config(source: str, component: str) -> dict[str, Any]:
    path: Path | None = Path(source).expanduser() / component / "config.json"
    if not path.is_file():
        path = _cached(source, f"{component}/config.json")
    try:
        return json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}


def schedule_of(scheduler: Any) -> tuple[VPSchedule | FlowSchedule, str]:
    """The bench schedule and prediction kind of a pipeline's scheduler: rectified flow for a
    flow-matching scheduler, else the discrete VP schedule of its betas."""
    from diffusers import DDPMScheduler

    cfg = dict(scheduler.config)
    if type(scheduler).__name__.startswith("FlowMatch"):
        return FlowSchedule(int(cfg.get("num_train_timesteps", 1000))), "flow"
    if "beta_schedule" not in cfg or cfg.get("use_flow_sigmas"):
        raise PipelineError(
            f"the pipeline's scheduler {type(scheduler).__name__} is neither a discrete DDPM-family schedule nor "
            "flow matching; bench's diffusers backend supports those two so far"
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


class PipelineOptions(ModelOptions):
    pipeline: str = Field(
        min_length=1, max_length=4096, description="hub id (OWNER/NAME, from the local Hugging Face cache) or a local directory"
    )
    prompts: list[str] = Field(None, min_length=1, max_length=100_000, description="non-empty list of prompts (sample k uses prompt k mod len); or prompts_file")  # type: ignore[assignment]  # fmt: skip
    prompts_file: str = Field(None, min_length=1, max_length=4096, description="text file, one prompt per line")  # type: ignore[assignment]
    negative_prompt: str = Field(
        "", max_length=100_000, description="the null condition of classifier-free guidance (default '')"
    )
    height: int = Field(None, ge=8, le=16384, description="int, pixels (default: the network's sample size x the VAE factor)")  # type: ignore[assignment]
    width: int = Field(None, ge=8, le=16384, description="int, pixels (default: as height)")  # type: ignore[assignment]
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="float32 | float16 | bfloat16 (default float32)"
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$", description="cpu | cuda[:N] | auto (default auto)")
    download: bool = Field(False, description="bool, allow a download from the hub (default false)")

    @model_validator(mode="after")
    def _prompts(self) -> PipelineOptions:
        if self.prompts is None and self.prompts_file is None:
            raise ValueError("a text-to-image model needs `prompts: [..]` (a list of strings) or `prompts_file:`")
        if any(len(p) > 100_000 for p in self.prompts or []):
            raise ValueError("a prompt is longer than 100000 characters")
        return self


@MODELS.register(
    "diffusers",
    kind="eps|v|flow",
    data="image",
    description="a diffusers text-to-image pipeline (SD 1.x/2.x UNet, SD3 or Flux transformer) by hub id or local path",
    options=PipelineOptions,
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
    if isinstance(prompts, str):
        raise PipelineError(f"prompts must be a list of strings, e.g. prompts: [{prompts!r}]; got one string")
    if not prompts or not all(isinstance(s, str) for s in prompts):
        raise PipelineError("a diffusers text-to-image model needs `prompts: [..]` (a list of strings) or `prompts_file:`")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    pipe = load_pipeline(pipeline, DTYPES[dtype], bool(download))
    family = _family(pipe)
    model = getattr(pipe, "unet" if family == "unet" else "transformer")
    schedule, kind = schedule_of(pipe.scheduler)
    pipe.to(dev)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    patch = 2 if family == "flux" else int(getattr(model.config, "patch_size", 1) or 1)  # Flux packs 2x2
    size = getattr(model.config, "sample_size", None) or getattr(pipe, "default_sample_size", 64)  # Flux: the pipeline's
    height = int(height or size * factor)
    width = int(width or height)
    if height % (factor * patch) or width % (factor * patch):
        raise PipelineError(
            f"height and width must be multiples of {factor * patch} (the VAE's downsampling x the patch size), got {height}x{width}"
        )
    n = len(prompts)
    neg = [negative_prompt] * n
    latent_ch = int(model.config.in_channels) // (4 if family == "flux" else 1)  # Flux's input is 2x2-packed
    latent_hw = (height // factor, width // factor)
    embedded = family == "flux" and bool(getattr(model.config, "guidance_embeds", False))
    with torch.no_grad():
        if family == "unet":
            emb, neg_emb = pipe.encode_prompt(list(prompts), dev, 1, True, negative_prompt=neg)
            net = TextConditionedNet(model, "unet", torch.cat([emb, neg_emb[:1]]))
        elif family == "sd3":
            emb, neg_emb, pooled, neg_pooled = pipe.encode_prompt(
                list(prompts), list(prompts), list(prompts), dev, 1, True, negative_prompt=neg, negative_prompt_2=neg, negative_prompt_3=neg
            )  # fmt: skip
            net = TextConditionedNet(model, "sd3", torch.cat([emb, neg_emb[:1]]), torch.cat([pooled, neg_pooled[:1]]))
        else:
            emb, pooled, _ = pipe.encode_prompt(list(prompts), list(prompts), dev, 1)
            neg_emb, neg_pooled, _ = pipe.encode_prompt([negative_prompt], [negative_prompt], dev, 1)
            net = TextConditionedNet(model, "flux", torch.cat([emb, neg_emb]), torch.cat([pooled, neg_pooled]), latent_hw)
    net = net.eval().requires_grad_(False)
    extra: dict[str, Any] = {"prompts": list(prompts), "decode": _decoder(pipe.vae, dev), "pipeline": type(pipe).__name__}
    if kind == "flow":
        extra["pipeline_time_shift"] = dict(pipe.scheduler.config).get("shift")  # not applied: see the module docstring
        extra["guidance"] = "embedded (guidance-distilled: one pass per step)" if embedded else "classifier-free"
    return ModelBundle(
        name="diffusers",
        denoiser=Denoiser(net, kind, schedule, net.null_class, guidance_embedded=embedded),
        sample_shape=(latent_ch, *latent_hw),
        data="image",
        num_classes=n,
        dtype=torch.float32,
        weights_hash=pipeline_hash(pipe),
        extra=extra,
    )


def _family(pipe: Any) -> str:
    """``unet`` (SD 1.x/2.x), ``sd3`` (SD3) or ``flux`` (FLUX.1); anything else is an error that says so."""
    unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
    has = all(getattr(pipe, c, None) is not None for c in ("vae", "text_encoder", "tokenizer")) and hasattr(pipe, "encode_prompt")
    kinds = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
    net = type(unet if unet is not None else transformer).__name__
    if has and net in kinds and (net != "FluxTransformer2DModel" or getattr(pipe, "text_encoder_2", None) is not None):
        return kinds[net]
    raise PipelineError(
        f"{type(pipe).__name__} ({net}) is not supported yet: bench's diffusers backend runs text-to-image pipelines "
        "with a UNet2DConditionModel (Stable Diffusion 1.x/2.x), an SD3Transformer2DModel (Stable Diffusion 3) or a "
        "FluxTransformer2DModel (FLUX.1), each with its text encoders and VAE"
    )
