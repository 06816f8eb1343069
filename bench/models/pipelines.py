"""The real tier: a diffusers pipeline, by hub id or local directory, as a bench model.

The pipeline's network, noise schedule and text encoder become a :class:`ModelBundle` like the
embedded teachers', so every registered method (solvers, caches) runs on it unchanged and the
harness counts, times and scores it the same way:

- the suite's prompts are encoded once, as the pipeline's own ``__call__`` encodes them (its
  defaults: caption cleaning, sequence length, SANA's complex human instruction, SDXL's zero
  embedding for an empty negative prompt); a job's "class" k is prompt k (samples cycle through the
  prompts), and the null class is the negative prompt (empty by default), so classifier-free
  guidance is bench's one batched cond + uncond pass, as in the pipeline itself. A class-conditional
  pipeline (DiT) takes ``class_labels`` (ImageNet ids, or ``all``) instead, its null class (1000)
  being the unconditional row;
- the noise schedule comes from the pipeline's scheduler config (its betas and prediction type, or
  rectified flow for a flow-matching scheduler or a DPM-Solver on flow sigmas); the sampler is the
  method's, never the pipeline's own loop. A flow pipeline's time shift is applied as the pipeline
  applies it (option ``shift``: ``auto`` = SD3's static ``shift``, FLUX's resolution-dependent
  ``mu`` from the image's token count, SANA's ``flow_shift``; ``none``; or a number) by a
  :class:`ShiftedFlowSchedule`: bench's time is reparametrised so that every schedule and solver
  steps on the shifted noise levels, and the network is called at its own shifted timestep. So
  bench's ``euler`` (``uniform`` grid) at n steps is FLUX's default loop and SD3's loop at sigmas
  linspace(1, 1/n, n) (SD3's default grid ends at shift(1/1000) instead of 1/n before the shift:
  diffusers shifts its last level twice, which bench's grid does not reproduce). VP pipelines
  match diffusers' schedulers on the 'trailing' spacing (bench's ``uniform``);
- a network that also predicts a learned variance (PixArt, DiT) is read by its first half of
  channels, as its pipeline reads it;
- samples are latents; ``decode`` (the pipeline's VAE) turns them into images in [-1, 1] for the
  metrics and grids, outside the timed sampler call.

Supported: ``UNet2DConditionModel`` pipelines on a discrete DDPM-family schedule (Stable Diffusion
1.x/2.x and their fine-tunes; SDXL, whose added text/time conditioning, the pooled text embedding
and the original-size / crop / target-size ids, are built as StableDiffusionXLPipeline builds them,
options ``original_size``, ``crops_coords_top_left``, ``target_size``), ``SD3Transformer2DModel``
(Stable Diffusion 3/3.5, with or without the T5 encoder), ``FluxTransformer2DModel`` (FLUX.1; a
guidance-distilled one takes the guidance scale as an input, one pass per step),
``PixArtTransformer2DModel`` (PixArt-alpha and -Sigma, T5 with its attention mask; bench samples at
the given size, without the pipeline's resolution binning), ``SanaTransformer2DModel`` (SANA, Gemma2)
and DiTPipeline's class-conditional ``Transformer2DModel`` (DiT-XL/2). Not yet: SANA-Sprint
(SCM/TrigFlow sampling), HunyuanDiT, Lumina. Text-to-video pipelines (Wan 2.1/2.2, LTX-Video,
CogVideoX, HunyuanVideo; options ``num_frames``, ``frame_rate``) are built by
:mod:`bench.models.video_pipelines` through ``VIDEO_BACKEND``. Others fail with a message saying so. Weights are read
from a local directory or the local Hugging Face cache; nothing is downloaded unless ``download: true``.
SD3's last joint block and SANA's blocks are adjusted for diffusers' cache hooks
(:mod:`bench.models.pipeline_blocks`; the computation is unchanged).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from bench.bundle import Capabilities, ModelBundle
from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.models.digits_nets import image_ids, pack, unpack  # Flux's 2x2 token packing and position ids
from bench.models.options import DeployOptions
from bench.registry import MODELS

PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAMILIES = {
    "UNet2DConditionModel": "unet",  # "sdxl" when it takes added text/time conditioning
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
    "Transformer2DModel": "dit",  # DiT: class-conditional (adaptive norm over ImageNet labels)
    "DiTTransformer2DModel": "dit",  # what diffusers loads a saved DiT transformer as
}
# The video pipelines' backend (bench.models.video_pipelines, imported by bench.models, fills it in:
# is_video(pipeline class name), bundle(pipe, ...), capabilities(kind)); a hook, so the two modules
# import in one direction only.
VIDEO_BACKEND: dict[str, Callable[..., Any]] = {}


class PipelineError(ValueError):
    """A pipeline that cannot be loaded or is not supported, with the fix in the message."""


class PipelineAbsentError(PipelineError):
    """A hub pipeline that is not on this machine (the message names the fetch command): a suite
    naming it still validates and plans, without job ids (``bench plan``)."""


@dataclass(frozen=True)
class ShiftedFlowSchedule(FlowSchedule):
    """Rectified flow in a shifted time: bench's native time ``t = 1000 u`` is at noise level
    ``s = m u / (1 + (m - 1) u)`` (SD3's time shift; FLUX's resolution-dependent shift is the same
    map with ``m = exp(mu)``). Equivalently sigma / alpha = m u / (1 - u): the shift multiplies every
    noise level by ``m``, so each of bench's schedules (uniform, karras, logsnr, ays, gits), chosen
    in ``u``, lands on the levels the pipeline samples at, and every solver steps with the true
    (alpha, sigma) of this method. The network itself is called at ``1000 s`` (:meth:`model_time`).

    Solvers that evaluate between grid points ask the schedule: DEIS's flow coefficients scale by
    ``shift`` and singlestep DPM-Solver finds its intermediate times by :meth:`time_of_sigma`.
    Known limitation: code that converts a flow noise level to time as ``t = 1000 s`` still does
    so (methods/solvers/core.py: F-PNDM's warm-up midpoints and EDM churn, ``s_churn > 0``;
    bench.schedules.time_of_lambda where DPM-Solver-v3 and bench/flowmap.py use it): an error with a
    shift, measured small for pndm (tests/test_pipelines_flow.py), not measured for the others;
    those files are in trained methods' code versions.
    ``shift: none`` restores the linear time."""

    shift: float = 1.0

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        u = t.to(torch.float64) / self.num_train_timesteps
        return self.shift * u / (1 + (self.shift - 1) * u)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma_of(t)
        return 1 - s, s

    def time_of_sigma(self, s: float) -> float:
        """Bench's time at noise level ``s`` (the inverse of :meth:`sigma_of`)."""
        return self.num_train_timesteps * s / (self.shift - (self.shift - 1) * s)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network was trained with at bench's time ``t`` (1000 s)."""
        return (self.sigma_of(t) * self.num_train_timesteps).to(t.dtype if t.is_floating_point() else torch.float32)


class TextConditionedNet(nn.Module):
    """``net(x, t, cond[, guidance])`` over a pipeline's conditioned network: ``cond`` indexes the
    encoded prompts (or class labels), the last row of ``table`` being the negative (null) one.

    ``family`` says how the network is called: ``unet`` (a UNet2DConditionModel, kept as ``.unet``;
    with ``pooled`` and ``time_ids`` it is SDXL's, given the pooled text embedding and the
    size/crop ids as added conditioning), ``sd3`` (an SD3 transformer, also given the pooled text
    embedding), ``flux`` (a Flux transformer: latents packed into 2x2 patch tokens with their
    position ids, t / 1000 as FluxPipeline passes it, and the guidance scale as an input when the
    model is guidance-distilled), ``pixart`` and ``sana`` (T5 / Gemma2 token embeddings with their
    attention mask) or ``dit`` (``table`` holds ImageNet class labels, the null label last).
    Transformers are kept as ``.transformer``, where the caches look for them. A network that
    predicts a learned variance too (PixArt, DiT: twice the latent channels) is read, as its
    pipeline reads it, by the first half of its output channels. ``schedule`` (a
    :class:`ShiftedFlowSchedule`) maps bench's time to the network's."""

    def __init__(
        self,
        model: nn.Module,
        family: str,
        table: torch.Tensor,
        pooled: torch.Tensor | None = None,
        latent_hw: tuple[int, int] | None = None,
        *,
        mask: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        added: dict[str, torch.Tensor] | None = None,
        schedule: ShiftedFlowSchedule | None = None,
        timestep_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.family = family
        setattr(self, "unet" if family == "unet" else "transformer", model)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("time_ids", time_ids, persistent=False)
        self.added = {k: v for k, v in (added or {}).items()}  # PixArt-alpha 1024's resolution / aspect ratio
        self.time_schedule = schedule if schedule is not None and schedule.shift != 1.0 else None
        self.timestep_scale = float(timestep_scale)
        self.net_dtype = next(model.parameters()).dtype
        in_ch = int(model.config.in_channels)
        self.learned_sigma = family in ("pixart", "sana", "dit") and int(model.config.out_channels or in_ch) == 2 * in_ch
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
        h = x.to(self.net_dtype)
        if self.time_schedule is not None:
            t = self.time_schedule.model_time(t)
        f = self.family
        if f == "unet":
            kw: dict[str, Any] = {}
            if self.time_ids is not None:  # SDXL
                kw["added_cond_kwargs"] = {"text_embeds": self.pooled[cond], "time_ids": self.time_ids[cond]}
            out = self.unet(h, t, encoder_hidden_states=emb, **kw).sample
        elif f == "sd3":
            out = self.transformer(
                hidden_states=h, timestep=t, encoder_hidden_states=emb, pooled_projections=self.pooled[cond]
            ).sample
        elif f == "flux":
            g = None if guidance is None else torch.full((len(x),), float(guidance), device=x.device, dtype=torch.float32)
            out = self.transformer(
                hidden_states=pack(h), timestep=t.to(emb.dtype) / 1000, guidance=g, pooled_projections=self.pooled[cond],
                encoder_hidden_states=emb, txt_ids=self.txt_ids, img_ids=self.img_ids,
            ).sample  # fmt: skip
            out = unpack(out, *x.shape[1:])
        elif f == "pixart":
            added = {"resolution": None, "aspect_ratio": None}
            added.update({k: v.to(x.device).expand(len(x), -1) for k, v in self.added.items()})
            out = self.transformer(
                h, encoder_hidden_states=emb, timestep=t, added_cond_kwargs=added, encoder_attention_mask=self.mask[cond]
            ).sample
        elif f == "sana":
            out = self.transformer(
                h, encoder_hidden_states=emb, encoder_attention_mask=self.mask[cond], timestep=t * self.timestep_scale
            ).sample
        else:  # dit
            out = self.transformer(h, timestep=t, class_labels=emb).sample
        if self.learned_sigma:
            out = out[:, : x.shape[1]]
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
        raise PipelineAbsentError(
            f"pipeline {source!r} is not in the local Hugging Face cache: fetch it with `hf download {source}`, "
            "point `pipeline:` at a local directory, or set `download: true` "
            f"in the model's options ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def pipeline_kind(source: str) -> str:
    """The prediction kind (eps, v, x0, flow) of a pipeline from its scheduler config alone: in its
    directory, or in the local Hugging Face cache; "" (unknown) when not found there, in which case
    building the model reports what is missing."""
    cfg = _component_config(source, "scheduler", "scheduler_config.json")
    if not cfg:
        return ""
    if str(cfg.get("_class_name", "")).startswith("FlowMatch") or cfg.get("use_flow_sigmas"):
        return "flow"
    return PREDICTION.get(cfg.get("prediction_type", "epsilon"), "eps")


def pipeline_capabilities(source: str) -> Capabilities | None:
    """A pipeline's capabilities from its configs alone (scheduler and model index, in its directory
    or the local Hugging Face cache); None when it is not on this machine."""
    kind = pipeline_kind(source)
    if not kind:
        return None
    index = _model_index(source)
    if VIDEO_BACKEND and VIDEO_BACKEND["is_video"](str(index.get("_class_name", ""))):  # Wan, LTX-Video, CogVideoX
        return VIDEO_BACKEND["capabilities"](kind, str(index.get("_class_name", "")))
    cls = next((v[1] for k, v in index.items() if k in ("unet", "transformer") and isinstance(v, list) and len(v) == 2), "")
    arch = "unet" if "UNet" in str(cls) else "dit"
    guidance = "cfg"
    if cls == "FluxTransformer2DModel":
        cfg = _component_config(source, "transformer")
        guidance = "embedded" if cfg.get("guidance_embeds") else "cfg"
    text = any(k.startswith("text_encoder") and isinstance(v, list) and v[0] is not None for k, v in index.items())
    conditioning = "text" if text or not index else "class"  # DiT: ImageNet labels, no text encoder
    return Capabilities(arch, "image", kind, conditioning, "flow" if kind == "flow" else "vp", guidance)


def _component_config(source: str, component: str, filename: str = "config.json") -> dict[str, Any]:
    path: Path | None = Path(source).expanduser() / component / filename
    if not path.is_file():
        path = _cached(source, f"{component}/{filename}")
    try:
        return json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}


def schedule_of(scheduler: Any) -> tuple[VPSchedule | FlowSchedule, str]:
    """The bench schedule and prediction kind of a pipeline's scheduler: rectified flow for a
    flow-matching scheduler (or a DPM-Solver on flow sigmas, as SANA's), else the discrete VP
    schedule of its betas. The time shift is separate: :func:`time_shift_of`."""
    from diffusers import DDPMScheduler

    cfg = dict(scheduler.config)
    if type(scheduler).__name__.startswith("FlowMatch") or cfg.get("use_flow_sigmas"):
        if cfg.get("use_flow_sigmas") and cfg.get("prediction_type", "flow_prediction") != "flow_prediction":
            raise PipelineError(
                f"{type(scheduler).__name__} on flow sigmas with prediction_type {cfg.get('prediction_type')!r}: unsupported"
            )
        return FlowSchedule(int(cfg.get("num_train_timesteps", 1000))), "flow"
    if "beta_schedule" not in cfg:
        raise PipelineError(
            f"the pipeline's scheduler {type(scheduler).__name__} is neither a discrete DDPM-family schedule nor "
            "flow matching; bench's diffusers backend supports those two so far"
        )
    kind = PREDICTION.get(cfg.get("prediction_type", "epsilon"))
    if kind is None or kind == "flow":
        raise PipelineError(f"unsupported prediction_type {cfg.get('prediction_type')!r} in the scheduler config")
    ddpm = DDPMScheduler.from_config(cfg)  # computes the betas of any beta_schedule the pipeline names
    return VPSchedule(tuple(ddpm.betas.double().tolist())), kind


def time_shift_of(scheduler: Any, image_tokens: int, shift: str | float = "auto") -> tuple[float, str]:
    """The time shift m of a flow pipeline (see :class:`ShiftedFlowSchedule`) and how it was chosen.

    ``auto`` reads the scheduler config as the pipeline's sampling loop does: a FlowMatch scheduler
    with ``use_dynamic_shifting`` (FLUX.1, SD3.5 variants) gets mu from the image's token count
    (FluxPipeline's ``calculate_shift``: linear from ``base_shift`` at ``base_image_seq_len`` to
    ``max_shift`` at ``max_image_seq_len``) and m = exp(mu) (``time_shift_type: linear``: m = mu);
    otherwise its static ``shift`` (SD3: 3.0); a DPM-Solver on flow sigmas (SANA) its
    ``flow_shift``. ``none`` is m = 1 (no shift); a number is that m."""
    if shift == "none":
        return 1.0, "none"
    if not isinstance(shift, str):
        m = float(shift)
        if not (m > 0 and math.isfinite(m)):
            raise PipelineError(f"shift must be a positive number, auto or none; got {shift!r}")
        return m, f"given ({m:g})"
    if shift != "auto":
        raise PipelineError(f"shift must be auto, none or a positive number; got {shift!r}")
    cfg = dict(scheduler.config)
    if type(scheduler).__name__.startswith("FlowMatch"):
        if cfg.get("use_dynamic_shifting"):
            lo, hi = int(cfg.get("base_image_seq_len", 256)), int(cfg.get("max_image_seq_len", 4096))
            b0, b1 = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
            mu = b0 + (image_tokens - lo) * (b1 - b0) / (hi - lo)
            m = math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
            return m, f"dynamic (mu {mu:.6g} at {image_tokens} image tokens)"
        return float(cfg.get("shift", 1.0)), "static (scheduler config)"
    if cfg.get("use_flow_sigmas"):
        return float(cfg.get("flow_shift", 1.0) or 1.0), "static (scheduler flow_shift)"
    return 1.0, "none (not a flow schedule)"


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


class PipelineOptions(DeployOptions):  # dtype, compile, channels_last: applied by build_model
    pipeline: str = Field(
        min_length=1, max_length=4096, description="hub id (OWNER/NAME, from the local Hugging Face cache) or a local directory"
    )
    prompts: list[str] = Field(None, min_length=1, max_length=100_000, description="non-empty list of prompts (sample k uses prompt k mod len); or prompts_file")  # type: ignore[assignment]  # fmt: skip
    prompts_file: str = Field(None, min_length=1, max_length=4096, description="text file, one prompt per line")  # type: ignore[assignment]
    class_labels: list[Annotated[int, Field(ge=0, le=99_999)]] | Literal["all"] = Field(None, min_length=1, max_length=100_000, description="class-conditional pipelines (DiT): ImageNet labels (sample k uses label k mod len), or all (0..999)")  # type: ignore[assignment]  # fmt: skip
    negative_prompt: str = Field(
        "",
        max_length=100_000,
        description="the null condition of classifier-free guidance (default '': SDXL's zeros, as its pipeline)",
    )
    height: int = Field(None, ge=8, le=16384, description="int, pixels (default: the network's sample size x the VAE factor)")  # type: ignore[assignment]
    width: int = Field(None, ge=8, le=16384, description="int, pixels (default: as height)")  # type: ignore[assignment]
    shift: Literal["auto", "none"] | Annotated[float, Field(gt=0, le=1000)] = Field(
        "auto",
        description="flow pipelines' time shift: auto (the scheduler config's: static, or FLUX's dynamic from the image size) | none | a number",
    )
    original_size: list[Annotated[int, Field(ge=1, le=16384)]] = Field(None, min_length=2, max_length=2, description="SDXL size conditioning [height, width] (default: the image size)")  # type: ignore[assignment]  # fmt: skip
    crops_coords_top_left: list[Annotated[int, Field(ge=0, le=16384)]] = Field(None, min_length=2, max_length=2, description="SDXL crop conditioning [top, left] (default [0, 0])")  # type: ignore[assignment]  # fmt: skip
    target_size: list[Annotated[int, Field(ge=1, le=16384)]] = Field(None, min_length=2, max_length=2, description="SDXL target-size conditioning [height, width] (default: the image size)")  # type: ignore[assignment]  # fmt: skip
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="float32 | float16 | bfloat16 (default float32)"
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$", description="cpu | cuda[:N] | auto (default auto)")
    download: bool = Field(False, description="bool, allow a download from the hub (default false)")
    num_frames: int = Field(None, ge=1, le=10_000, description="video pipelines: frames in pixels (default the pipeline's; 1 + a multiple of the VAE's temporal compression)")  # type: ignore[assignment]  # fmt: skip
    frame_rate: int = Field(None, ge=1, le=1000, description="LTX-Video: the frame rate its RoPE is scaled by (default the pipeline's, 25)")  # type: ignore[assignment]  # fmt: skip

    @model_validator(mode="after")
    def _prompts(self) -> PipelineOptions:
        if self.prompts is None and self.prompts_file is None and self.class_labels is None:
            raise ValueError(
                "a text-to-image model needs `prompts: [..]` (a list of strings) or `prompts_file:`; "
                "a class-conditional one (DiT) `class_labels: [..]` or `class_labels: all`"
            )
        if any(len(p) > 100_000 for p in self.prompts or []):
            raise ValueError("a prompt is longer than 100000 characters")
        return self


@MODELS.register(
    "diffusers",
    kind="eps|v|flow",
    data="image",
    description="a diffusers pipeline (SD 1.x/2.x, SDXL, SD3, FLUX.1, PixArt-alpha/sigma, SANA, DiT; video: Wan, LTX-Video, "
    "CogVideoX) by hub id or local path",
    options=PipelineOptions,
)
def diffusers_pipeline(
    pipeline: str,
    prompts: list[str] | None = None,
    prompts_file: str | None = None,
    class_labels: list[int] | str | None = None,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    shift: str | float = "auto",
    original_size: list[int] | None = None,
    crops_coords_top_left: list[int] | None = None,
    target_size: list[int] | None = None,
    dtype: str = "float32",
    device: str = "auto",
    download: bool = False,
    num_frames: int | None = None,
    frame_rate: int | None = None,
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
    if prompts is not None and (not prompts or not all(isinstance(s, str) for s in prompts)):
        raise PipelineError("a diffusers text-to-image model needs `prompts: [..]` (a list of strings) or `prompts_file:`")
    if prompts is None and class_labels is None:
        raise PipelineError(
            "a diffusers text-to-image model needs `prompts: [..]` (a list of strings) or `prompts_file:` "
            "(a class-conditional one, DiT: `class_labels: [..]` or `class_labels: all`)"
        )
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    pipe = load_pipeline(pipeline, DTYPES[dtype], bool(download))
    if VIDEO_BACKEND and VIDEO_BACKEND["is_video"](type(pipe).__name__):  # Wan, LTX-Video, CogVideoX: clips of latents
        if (
            class_labels is not None
            or prompts is None
            or any(v is not None for v in (original_size, crops_coords_top_left, target_size))
        ):
            raise PipelineError(
                f"{type(pipe).__name__} is a text-to-video pipeline: it takes `prompts:` (or `prompts_file:`), "
                "and neither class_labels nor SDXL's size conditioning"
            )
        return VIDEO_BACKEND["bundle"](
            pipe, prompts=list(prompts), negative_prompt=negative_prompt, height=height, width=width,
            num_frames=num_frames, frame_rate=frame_rate, shift=shift, device=dev,
        )  # fmt: skip
    if num_frames is not None or frame_rate is not None:
        raise PipelineError(f"num_frames and frame_rate apply to video pipelines; {type(pipe).__name__} makes images")
    family = _family(pipe)
    if family == "dit" and prompts is not None:
        raise PipelineError(
            f"{type(pipe).__name__} is class-conditional: give `class_labels: [..]` (ImageNet ids) or `all`, not prompts"
        )
    if family != "dit" and prompts is None:
        raise PipelineError(f"{type(pipe).__name__} is a text-to-image pipeline: it needs `prompts: [..]` or `prompts_file:`")
    model = getattr(pipe, "unet" if family in ("unet", "sdxl") else "transformer")
    schedule, kind = schedule_of(pipe.scheduler)
    pipe.to(dev)
    factor = (
        2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if "block_out_channels" in pipe.vae.config
        else int(pipe.vae_scale_factor)
    )
    patch = 2 if family == "flux" else int(getattr(model.config, "patch_size", 1) or 1)  # Flux packs 2x2
    size = getattr(model.config, "sample_size", None) or getattr(pipe, "default_sample_size", 64)  # Flux: the pipeline's
    height = int(height or size * factor)
    width = int(width or height)
    if height % (factor * patch) or width % (factor * patch):
        raise PipelineError(
            f"height and width must be multiples of {factor * patch} (the VAE's downsampling x the patch size), got {height}x{width}"
        )
    latent_ch = int(model.config.in_channels) // (4 if family == "flux" else 1)  # Flux's input is 2x2-packed
    latent_hw = (height // factor, width // factor)
    extra: dict[str, Any] = {"decode": _decoder(pipe.vae, dev), "pipeline": type(pipe).__name__}
    weights = pipeline_hash(pipe)
    if kind == "flow":
        m, how = time_shift_of(pipe.scheduler, (latent_hw[0] // patch) * (latent_hw[1] // patch), shift)
        schedule = ShiftedFlowSchedule(schedule.num_train_timesteps, shift=m)
        extra["pipeline_time_shift"] = dict(pipe.scheduler.config).get("shift")
        extra["time_shift"] = {"shift": m, "how": how}
        if m != 1.0:  # the bundle's identity: the weights' fingerprint and the shift its solvers step with
            weights = hashlib.sha256(f"{weights}|time_shift={m!r}".encode()).hexdigest()[:16]
    elif shift not in ("auto", "none"):
        raise PipelineError(
            f"shift applies to flow-matching pipelines; {type(pipe).__name__} samples a VP schedule (use auto or none)"
        )
    if family == "dit":
        null = int(getattr(model.config, "num_embeds_ada_norm", None) or 1000)  # DiTPipeline's null class 1000
        labels = list(range(null)) if class_labels in (None, "all") else [int(c) for c in class_labels]  # type: ignore[union-attr]
        if any(not 0 <= c < null for c in labels):
            raise PipelineError(f"class_labels must be in 0..{null - 1} (the model's classes), got {labels}")
        net = TextConditionedNet(model, "dit", torch.tensor([*labels, null], device=dev))
        n = len(labels)
        extra["class_labels"] = labels
    else:
        n = len(prompts)  # type: ignore[arg-type]
        sizes = (original_size, crops_coords_top_left, target_size)
        if family != "sdxl" and any(v is not None for v in sizes):
            raise PipelineError(
                "original_size, crops_coords_top_left and target_size are SDXL's conditioning; this pipeline has none"
            )
        with torch.no_grad():
            net = _text_net(pipe, family, model, list(prompts), negative_prompt, dev, latent_hw, (height, width), sizes)  # type: ignore[arg-type]
        extra["prompts"] = list(prompts)  # type: ignore[arg-type]
    if isinstance(schedule, ShiftedFlowSchedule):
        net.time_schedule = schedule if schedule.shift != 1.0 else None
        net.timestep_scale = float(getattr(model.config, "timestep_scale", 1.0) or 1.0) if family == "sana" else 1.0
    if family in ("sd3", "sana"):
        from bench.models.pipeline_blocks import prepare_for_hooks

        prepare_for_hooks(model)
    net = net.eval().requires_grad_(False)
    embedded = family == "flux" and bool(getattr(model.config, "guidance_embeds", False))
    if kind == "flow":
        extra["guidance"] = "embedded (guidance-distilled: one pass per step)" if embedded else "classifier-free"
    return ModelBundle(
        name="diffusers",
        denoiser=Denoiser(net, kind, schedule, net.null_class, guidance_embedded=embedded),
        sample_shape=(latent_ch, *latent_hw),
        data="image",
        num_classes=n,
        dtype=torch.float32,
        weights_hash=weights,
        extra=extra,
    )


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """The default of ``pipe.__call__``'s argument ``name`` (what the pipeline's own loop uses)."""
    p = inspect.signature(pipe.__call__).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def _text_net(
    pipe: Any,
    family: str,
    model: nn.Module,
    prompts: list[str],
    negative_prompt: str,
    dev: str,
    latent_hw: tuple[int, int],
    size: tuple[int, int],
    sdxl_sizes: tuple[list[int] | None, ...],
) -> TextConditionedNet:
    """The prompts and the negative prompt encoded as the pipeline's own ``__call__`` encodes them
    (its defaults: caption cleaning, sequence length, SANA's complex human instruction, SDXL's zero
    negative embedding for an empty negative prompt), as a :class:`TextConditionedNet`."""
    neg = [negative_prompt] * len(prompts)
    if family == "unet":
        emb, neg_emb = pipe.encode_prompt(prompts, dev, 1, True, negative_prompt=neg)
        return TextConditionedNet(model, "unet", torch.cat([emb, neg_emb[:1]]))
    if family == "sdxl":
        zeros = negative_prompt == "" and bool(pipe.config.get("force_zeros_for_empty_prompt", False))
        neg_arg = None if zeros else neg  # SDXL's pipeline: no negative prompt -> zero embeddings
        emb, neg_emb, pooled, neg_pooled = pipe.encode_prompt(
            prompts, prompts, dev, 1, True, negative_prompt=neg_arg, negative_prompt_2=neg_arg
        )
        original, crop, target = sdxl_sizes
        proj = int(pipe.text_encoder_2.config.projection_dim) if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
        ids = pipe._get_add_time_ids(
            tuple(original or size),
            tuple(crop or (0, 0)),
            tuple(target or size),
            dtype=emb.dtype,
            text_encoder_projection_dim=proj,
        ).to(dev)
        return TextConditionedNet(
            model, "unet", torch.cat([emb, neg_emb[:1]]), torch.cat([pooled, neg_pooled[:1]]),
            time_ids=ids.expand(len(prompts) + 1, -1).contiguous(),
        )  # fmt: skip
    if family == "sd3":
        emb, neg_emb, pooled, neg_pooled = pipe.encode_prompt(
            prompts, prompts, prompts, dev, 1, True, negative_prompt=neg, negative_prompt_2=neg, negative_prompt_3=neg
        )
        return TextConditionedNet(model, "sd3", torch.cat([emb, neg_emb[:1]]), torch.cat([pooled, neg_pooled[:1]]))
    if family == "flux":
        emb, pooled, _ = pipe.encode_prompt(prompts, prompts, dev, 1)
        neg_emb, neg_pooled, _ = pipe.encode_prompt([negative_prompt], [negative_prompt], dev, 1)
        return TextConditionedNet(model, "flux", torch.cat([emb, neg_emb]), torch.cat([pooled, neg_pooled]), latent_hw)
    kw: dict[str, Any] = {
        "clean_caption": _call_default(pipe, "clean_caption", False),
        "max_sequence_length": _call_default(pipe, "max_sequence_length", 300),
    }
    if family == "sana":
        kw["complex_human_instruction"] = _call_default(pipe, "complex_human_instruction", None)
    emb, mask, neg_emb, neg_mask = pipe.encode_prompt(prompts, True, negative_prompt=negative_prompt, device=dev, **kw)
    added: dict[str, torch.Tensor] = {}
    if family == "pixart" and getattr(model, "use_additional_conditions", False):  # PixArt-alpha 1024
        added = {
            "resolution": torch.tensor([list(size)], dtype=emb.dtype, device=dev),
            "aspect_ratio": torch.tensor([[size[0] / size[1]]], dtype=emb.dtype, device=dev),
        }
    return TextConditionedNet(model, family, torch.cat([emb, neg_emb[:1]]), mask=torch.cat([mask, neg_mask[:1]]), added=added)


def _family(pipe: Any) -> str:
    """``unet`` (SD 1.x/2.x), ``sdxl``, ``sd3``, ``flux``, ``pixart`` (PixArt-alpha/sigma), ``sana``
    or ``dit`` (class-conditional DiT); anything else is an error that says so."""
    unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
    net = type(unet if unet is not None else transformer).__name__
    family = FAMILIES.get(net, "")
    if family == "unet" and getattr(unet.config, "addition_embed_type", None) == "text_time":
        family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None or hasattr(pipe, "_get_add_time_ids") else ""
    if family == "dit":
        ok = getattr(transformer.config, "num_embeds_ada_norm", None) is not None and getattr(pipe, "vae", None) is not None
    else:
        ok = all(getattr(pipe, c, None) is not None for c in ("vae", "text_encoder", "tokenizer")) and hasattr(
            pipe, "encode_prompt"
        )
        if family == "flux":
            ok = ok and getattr(pipe, "text_encoder_2", None) is not None
    if family and ok:
        return family
    raise PipelineError(
        f"{type(pipe).__name__} ({net}) is not supported yet: bench's diffusers backend runs text-to-image pipelines "
        "with a UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL), an SD3Transformer2DModel (Stable Diffusion 3), a "
        "FluxTransformer2DModel (FLUX.1), a PixArtTransformer2DModel (PixArt-alpha/sigma) or a SanaTransformer2DModel "
        "(SANA), each with its text encoders and VAE, and DiTPipeline (class-conditional Transformer2DModel)"
    )
