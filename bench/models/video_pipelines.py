"""The real tier's video pipelines: a diffusers text-to-video pipeline as a bench model.

:func:`bench.models.pipelines.diffusers_pipeline` (model ``diffusers``) hands a video pipeline to
:func:`video_bundle`, so a suite names it as it names an image pipeline
(``{name: diffusers, options: {pipeline: Wan-AI/Wan2.1-T2V-1.3B-Diffusers, prompts: [..]}}``), with
``num_frames`` (pixels; default the pipeline's) and, for LTX-Video, ``frame_rate``. As for images,
the prompts are encoded once as the pipeline's ``__call__`` encodes them (its
``max_sequence_length``; the empty negative prompt by default), classifier-free guidance is bench's
batched cond + uncond pass, and the sampler is the method's, never the pipeline's loop.

Samples are video latents in bench's convention, frames before channels: one sample is
(F, C, H, W) (latent frames, latent channels, latent height, width), as the embedded video teacher's
(:mod:`bench.models.video`); the network converts at its edges to what each transformer takes.
``decode`` (outside the timed sampler) turns latents into clips (N, F, 3, H, W) in [-1, 1] through
the pipeline's VAE, un-normalising them as the pipeline does. Capabilities: arch ``video-dit``,
data ``video``, text conditioning, classifier-free guidance.

Supported (diffusers 0.42; each checked on a tiny random-weight pipeline of its classes in
tests/test_pipelines_video.py):

- ``WanPipeline`` (Wan 2.1; Wan 2.2's two-expert A14B and its TI2V-5B per-token timesteps):
  ``WanTransformer3DModel`` on (B, C, F, H, W), UMT5 text, ``AutoencoderKLWan`` (latents_mean /
  latents_std). Flow matching with the scheduler's static shift (its UniPC's ``flow_shift``, or a
  FlowMatch scheduler's ``shift``), applied by a :class:`ShiftedFlowSchedule`: bench's ``euler`` at n
  steps is WanPipeline's loop on FlowMatch Euler at sigmas linspace(1, 1/n, n) before the shift
  (tested). Wan's hub scheduler, UniPC on flow sigmas, is not reproduced by bench's ``unipc``:
  diffusers 0.42 steps it at linspace(1, 1/1000, n + 1)[:-1] before the shift, then 0 (not bench's
  uniform grid to 0), and calls the network at those times truncated to integers (measured on the
  tiny Wan at 5 steps: 0.05 largest difference). Wan 2.2's
  ``transformer_2`` takes the steps whose network timestep is below ``boundary_ratio`` x 1000, as
  the pipeline switches; its ``guidance_scale_2`` is the pipeline's default (equal to the guidance
  scale). Caches hook ``.transformer`` only (the high-noise expert).
- ``LTXPipeline`` (LTX-Video): ``LTXVideoTransformer3DModel`` on packed tokens (B, F H W, C) with
  T5's attention mask and RoPE scaled by (temporal ratio / frame rate, spatial, spatial);
  ``AutoencoderKLLTXVideo`` (latents_mean / latents_std / scaling factor; the timestep-conditioned
  decoder gets the pipeline's default ``decode_timestep`` 0, no decode noise). Flow matching with the
  resolution-dependent shift: mu linear in the latent video's token count (frames x H x W) as
  LTXPipeline computes it, m = exp(mu). A scheduler config with ``shift_terminal`` (LTX-Video
  0.9.1+: the shifted levels stretched so the last one is ``shift_terminal``, a stretch that depends
  on the number of steps) is not reproduced: bench steps on the shifted levels without the stretch;
  ``extra["time_shift"]["not_reproduced"]`` says so.
- ``CogVideoXPipeline`` (CogVideoX 2B/5B, 1.5): ``CogVideoXTransformer3DModel`` on (B, F, C, H, W)
  (already bench's order), T5, ``AutoencoderKLCogVideoX``. Its VP schedule is the scheduler's own
  alphas_cumprod (CogVideoXDDIMScheduler / CogVideoXDPMScheduler: SNR shift ``snr_shift_scale``, then
  zero terminal SNR), v-prediction, read from the scheduler object itself because diffusers'
  DDPMScheduler does not know the SNR shift; at zero terminal SNR the noisiest step is pure noise
  (:class:`TerminalSNRSchedule`). Rotary embeddings are computed once by the pipeline's own
  ``_prepare_rotary_positional_embeddings``; CogVideoX 1.5's temporal patch pads the latent frames
  as the pipeline does, and decoding drops the padding. CogVideoX-5B's CogVideoXDPMScheduler is a
  stochastic DPM-Solver++(2M) SDE (fresh noise at every step; its first step ignores the start
  latents since alpha = 0 there), so no solver reproduces it from the same latents; bench's ``ddim``
  on 'trailing' timesteps is CogVideoXDDIMScheduler's loop (CogVideoX-2B's).

- ``HunyuanVideoPipeline``: ``HunyuanVideoTransformer3DModel`` on (B, C, F, H, W), Llama text with
  the pipeline's default prompt template and CLIP's pooled embedding, ``AutoencoderKLHunyuanVideo``
  (scaling factor). Guidance-distilled: the guidance scale x 1000 is an input of the one pass per
  step (capability guidance ``embedded``, as FLUX.1-dev); the pipeline's optional true CFG
  (``true_cfg_scale`` with a negative prompt, a second pass) is not run. Flow matching at the
  scheduler's static shift (7 on the hub): bench's ``euler`` at n steps is the pipeline's default
  loop (sigmas linspace(1, 0, n + 1)[:-1], shifted).

Not yet: Wan's image-to-video and VACE pipelines, CogVideoX's ``use_dynamic_cfg``, the
image-to-video and condition pipelines of CogVideoX and LTX-Video.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.bundle import Capabilities, ModelBundle
from bench.denoiser import Denoiser, VPSchedule
from bench.models.pipelines import (
    PREDICTION,
    VIDEO_BACKEND,
    PipelineError,
    ShiftedFlowSchedule,
    _call_default,
    pipeline_hash,
    schedule_of,
    time_shift_of,
)

VIDEO_PIPELINES = {
    "WanPipeline": "wan",
    "LTXPipeline": "ltx",
    "CogVideoXPipeline": "cogvideox",
    "HunyuanVideoPipeline": "hunyuan",
}
TRANSFORMERS = {
    "wan": "WanTransformer3DModel",
    "ltx": "LTXVideoTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel",
    "hunyuan": "HunyuanVideoTransformer3DModel",
}
EMBEDDED_GUIDANCE = ("HunyuanVideoPipeline",)  # guidance-distilled: the scale is an input, one pass per step
NOT_YET = {
    "WanImageToVideoPipeline": "Wan image-to-video is not supported yet (bench runs text-to-video)",
    "WanVACEPipeline": "Wan VACE is not supported yet (bench runs text-to-video)",
    "CogVideoXImageToVideoPipeline": "CogVideoX image-to-video is not supported yet (bench runs text-to-video)",
    "LTXImageToVideoPipeline": "LTX-Video image-to-video is not supported yet (bench runs text-to-video)",
    "LTXConditionPipeline": "LTX-Video's condition pipeline is not supported yet (bench runs text-to-video)",
}


def is_video_pipeline(class_name: str) -> bool:
    """Whether a pipeline class (its name, as in model_index.json) is a video pipeline bench knows."""
    return class_name in VIDEO_PIPELINES or class_name in NOT_YET


def video_capabilities(kind: str, pipeline_class: str = "") -> Capabilities:
    """A text-to-video pipeline's capabilities (``kind``: its prediction, from the scheduler config;
    HunyuanVideo's guidance is embedded)."""
    guidance = "embedded" if pipeline_class in EMBEDDED_GUIDANCE else "cfg"
    return Capabilities("video-dit", "video", kind, "text", "flow" if kind == "flow" else "vp", guidance)


@dataclass(frozen=True)
class TerminalSNRSchedule(VPSchedule):
    """A VP schedule whose last alphas_cumprod is 0 (zero terminal SNR, CogVideoX's): there
    sigma/alpha is infinite and :class:`VPSchedule` would give nan; here any time past the last
    finite knot (t > T - 2) is pure noise, alpha = 0, sigma = 1. Elsewhere unchanged."""

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = super().alpha_sigma(t)
        noise = ~(torch.isfinite(a) & torch.isfinite(s))
        if bool(noise.any()):
            a = torch.where(noise, torch.zeros_like(a), a)
            s = torch.where(noise, torch.ones_like(s), s)
        return a, s


def vp_schedule_of_alphas(alphas_cumprod: torch.Tensor) -> VPSchedule:
    """A bench VP schedule with exactly these alphas_cumprod (betas_i = 1 - ab_i / ab_{i-1})."""
    ab = alphas_cumprod.double().cpu()
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = (1 - ab / prev).clamp(0, 1)
    cls = TerminalSNRSchedule if float(ab[-1]) == 0.0 else VPSchedule
    return cls(tuple(betas.tolist()))


class VideoTextNet(nn.Module):
    """``net(x, t, cond)`` over a video pipeline's transformer for clips ``x`` (B, F, C, H, W):
    ``cond`` indexes the encoded prompts, the last row of ``table`` the negative one. ``family``
    (wan, ltx, cogvideox) says how the transformer is called (see the module docstring); the
    transformer is kept as ``.transformer`` for the caches (Wan 2.2's low-noise expert as
    ``.transformer_2``)."""

    arch = "video-dit"

    def __init__(
        self,
        model: nn.Module,
        family: str,
        table: torch.Tensor,
        latent_shape: tuple[int, int, int, int],
        *,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        schedule: ShiftedFlowSchedule | None = None,
        model_2: nn.Module | None = None,
        boundary: float | None = None,
        expand_timesteps: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_scale: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        self.transformer = model
        self.transformer_2 = model_2
        self.boundary = boundary
        self.expand_timesteps = expand_timesteps
        self.latent_shape = latent_shape  # (F, C, H, W)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)
        self.register_buffer("rope_cos", None if rope is None else rope[0], persistent=False)
        self.register_buffer("rope_sin", None if rope is None else rope[1], persistent=False)
        self.rope_scale = rope_scale
        self.time_schedule = schedule if schedule is not None and schedule.shift != 1.0 else None
        self.net_dtype = model.dtype

    @property
    def null_class(self) -> int:
        return len(self.table) - 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float | None = None) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"a video pipeline's network takes clips (B, F, C, H, W), got shape {tuple(x.shape)}")
        if cond is None:
            cond = torch.full((len(x),), self.null_class, device=x.device, dtype=torch.long)
        cond = cond.to(self.table.device)
        t = t.expand(len(x)) if t.ndim == 0 else t
        if self.time_schedule is not None:
            t = self.time_schedule.model_time(t)
        if self.transformer_2 is not None and self.boundary is not None:
            low = t < self.boundary  # WanPipeline: timesteps below the boundary go to the low-noise expert
            if bool(low.any()) and not bool(low.all()):
                out = torch.empty_like(x)
                out[~low] = self._call(self.transformer, x[~low], t[~low], cond[~low], guidance)
                out[low] = self._call(self.transformer_2, x[low], t[low], cond[low], guidance)
                return out
            return self._call(self.transformer_2 if bool(low.all()) else self.transformer, x, t, cond, guidance)
        return self._call(self.transformer, x, t, cond, guidance)

    def _call(
        self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float | None
    ) -> torch.Tensor:
        emb = self.table[cond]
        h = x.to(self.net_dtype)
        f = self.family
        if f == "wan":
            ts = t
            if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per 2x2 patch token (all equal in text-to-video)
                n_tok = h.shape[1] * (h.shape[3] // 2) * (h.shape[4] // 2)
                ts = t[:, None].expand(len(x), n_tok)
            out = model(hidden_states=h.transpose(1, 2), timestep=ts, encoder_hidden_states=emb, return_dict=False)[0]
            out = out.transpose(1, 2)
        elif f == "ltx":
            nf, _, nh, nw = h.shape[1:]
            pt, p = int(model.config.patch_size_t), int(model.config.patch_size)
            tokens = _ltx_pack(h.transpose(1, 2), p, pt)
            out = model(
                hidden_states=tokens, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=self.mask[cond],
                num_frames=nf // pt, height=nh // p, width=nw // p, rope_interpolation_scale=self.rope_scale,
                return_dict=False,
            )[0]  # fmt: skip
            out = _ltx_unpack(out.float(), nf // pt, nh // p, nw // p, p, pt).transpose(1, 2)
        elif f == "hunyuan":  # guidance-distilled: the scale x 1000 is an input (HunyuanVideoPipeline)
            g = torch.full((len(x),), 1000.0 * float(1.0 if guidance is None else guidance), device=x.device)
            out = model(
                hidden_states=h.transpose(1, 2), timestep=t.to(torch.float32), encoder_hidden_states=emb,
                encoder_attention_mask=self.mask[cond], pooled_projections=self.pooled[cond], guidance=g.to(h.dtype),
                return_dict=False,
            )[0].transpose(1, 2)  # fmt: skip
        else:  # cogvideox: (B, F, C, H, W) in and out
            rope = None if self.rope_cos is None else (self.rope_cos, self.rope_sin)
            out = model(hidden_states=h, encoder_hidden_states=emb, timestep=t, image_rotary_emb=rope, return_dict=False)[0]
        return out.to(x.dtype)


def _ltx_pack(x: torch.Tensor, p: int, pt: int) -> torch.Tensor:
    """LTXPipeline._pack_latents: (B, C, F, H, W) -> (B, F/pt * H/p * W/p, C pt p p)."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def _ltx_unpack(x: torch.Tensor, f: int, h: int, w: int, p: int, pt: int) -> torch.Tensor:
    """LTXPipeline._unpack_latents: the inverse of :func:`_ltx_pack`, to (B, C, F, H, W)."""
    b = x.size(0)
    x = x.reshape(b, f, h, w, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _clips(video: torch.Tensor) -> torch.Tensor:
    """A VAE's (B, 3, F, H, W) output as bench clips (B, F, 3, H, W) in [-1, 1], float32 on the CPU."""
    return video.float().clamp(-1, 1).transpose(1, 2).cpu()


def _decoder(pipe: Any, family: str, device: str, drop_frames: int = 0, batch: int = 2) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents (N, F, C, H, W) -> clips (N, F', 3, H', W'), un-normalised as the pipeline does."""
    vae = pipe.vae
    cfg = vae.config

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        out = []
        for lo in range(0, len(latents), batch):
            z = latents[lo : lo + batch, drop_frames:].to(device=device, dtype=torch.float32).transpose(1, 2)  # (B, C, F, H, W)
            if family == "wan":
                mean = torch.tensor(cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
                std = torch.tensor(cfg.latents_std, device=device).view(1, -1, 1, 1, 1)
                z = z * std + mean  # WanPipeline: latents / (1 / std) + mean
                video = vae.decode(z.to(vae.dtype), return_dict=False)[0]
            elif family == "hunyuan":
                video = vae.decode((z / float(cfg.scaling_factor)).to(vae.dtype), return_dict=False)[0]
            elif family == "ltx":
                mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(device, torch.float32)
                std = vae.latents_std.view(1, -1, 1, 1, 1).to(device, torch.float32)
                z = z * std / float(cfg.scaling_factor) + mean
                temb = None
                if cfg.timestep_conditioning:  # LTXPipeline's defaults: decode_timestep 0, decode_noise_scale 0
                    temb = torch.zeros(len(z), device=device, dtype=vae.dtype)
                video = vae.decode(z.to(vae.dtype), temb, return_dict=False)[0]
            else:
                z = z / float(cfg.scaling_factor)  # CogVideoXPipeline.decode_latents
                video = vae.decode(z.to(vae.dtype)).sample
            out.append(_clips(video))
        return torch.cat(out)

    return decode


def video_bundle(
    pipe: Any,
    *,
    prompts: list[str],
    negative_prompt: str,
    height: int | None,
    width: int | None,
    num_frames: int | None,
    frame_rate: int | None,
    shift: str | float,
    device: str,
) -> ModelBundle:
    """The bundle of a loaded video pipeline (see the module docstring)."""
    name = type(pipe).__name__
    if name in NOT_YET:
        raise PipelineError(
            f"{name}: {NOT_YET[name]}; bench runs WanPipeline, LTXPipeline, CogVideoXPipeline and HunyuanVideoPipeline"
        )
    family = VIDEO_PIPELINES[name]
    model = pipe.transformer if pipe.transformer is not None else getattr(pipe, "transformer_2", None)
    if model is None or type(model).__name__ != TRANSFORMERS[family]:
        raise PipelineError(f"{name} needs a {TRANSFORMERS[family]} transformer, got {type(model).__name__}")
    for c in ("vae", "text_encoder", "tokenizer"):
        if getattr(pipe, c, None) is None:
            raise PipelineError(f"{name} without its {c}: bench needs the whole pipeline (text encoder, tokenizer, VAE)")
    if frame_rate is not None and family != "ltx":
        raise PipelineError("frame_rate is LTX-Video's RoPE conditioning; this pipeline has none")
    cfg_t = model.config
    if family == "wan":
        s_factor, t_factor = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
        patch_hw = int(cfg_t.patch_size[1])
    elif family == "hunyuan":
        s_factor, t_factor = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
        patch_hw = int(cfg_t.patch_size)
    elif family == "ltx":
        s_factor, t_factor = int(pipe.vae_spatial_compression_ratio), int(pipe.vae_temporal_compression_ratio)
        patch_hw = int(cfg_t.patch_size)
    else:
        s_factor, t_factor = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
        patch_hw = int(cfg_t.patch_size)
    if family == "cogvideox":  # CogVideoXPipeline: the transformer's sample size by default
        height = int(height or cfg_t.sample_height * s_factor)
        width = int(width or cfg_t.sample_width * s_factor)
        num_frames = int(num_frames or cfg_t.sample_frames)
    else:
        height = int(height or _call_default(pipe, "height", 480))
        width = int(width or _call_default(pipe, "width", 832))
        num_frames = int(num_frames or _call_default(pipe, "num_frames", 81))
    if height % (s_factor * patch_hw) or width % (s_factor * patch_hw):
        raise PipelineError(
            f"height and width must be multiples of {s_factor * patch_hw} (the VAE's downsampling x the patch size), "
            f"got {height}x{width}"
        )
    if num_frames < 1 or (num_frames - 1) % t_factor:
        raise PipelineError(
            f"num_frames must be 1 more than a multiple of {t_factor} (the VAE's temporal compression), e.g. "
            f"{(max(num_frames, 1) - 1) // t_factor * t_factor + 1}; got {num_frames}"
        )
    latent_f = (num_frames - 1) // t_factor + 1
    pad = 0
    if family == "cogvideox" and cfg_t.patch_size_t is not None and latent_f % int(cfg_t.patch_size_t):
        pad = int(cfg_t.patch_size_t) - latent_f % int(cfg_t.patch_size_t)  # CogVideoX 1.5: frames padded at the front
    latent_f += pad
    if family == "ltx" and latent_f % int(cfg_t.patch_size_t):
        raise PipelineError(f"LTX: the latent frames ({latent_f}) must be a multiple of the transformer's patch_size_t")
    latent_shape = (latent_f, int(cfg_t.in_channels), height // s_factor, width // s_factor)

    extra: dict[str, Any] = {"pipeline": name, "video": {"num_frames": num_frames, "height": height, "width": width}}
    weights = pipeline_hash(pipe)
    schedule: Any
    if family == "cogvideox":
        sch_cfg = dict(pipe.scheduler.config)
        kind = PREDICTION.get(sch_cfg.get("prediction_type", "epsilon"), "")
        if kind not in ("eps", "v", "x0") or not hasattr(pipe.scheduler, "alphas_cumprod"):
            raise PipelineError(
                f"CogVideoX with scheduler {type(pipe.scheduler).__name__} (prediction {sch_cfg.get('prediction_type')!r}): "
                "bench reads a discrete VP scheduler's alphas_cumprod (CogVideoXDDIMScheduler / CogVideoXDPMScheduler)"
            )
        if shift not in ("auto", "none"):
            raise PipelineError(f"shift applies to flow-matching pipelines; {name} samples a VP schedule (use auto or none)")
        schedule = vp_schedule_of_alphas(pipe.scheduler.alphas_cumprod)
        extra["snr_shift_scale"] = sch_cfg.get("snr_shift_scale")
    else:
        base, kind = schedule_of(pipe.scheduler)
        if kind != "flow":
            raise PipelineError(f"{name} with a {type(pipe.scheduler).__name__} scheduler: bench expects flow matching here")
        tokens = latent_shape[0] * latent_shape[2] * latent_shape[3]  # LTXPipeline's video_sequence_length
        m, how = time_shift_of(pipe.scheduler, tokens, shift)
        schedule = ShiftedFlowSchedule(base.num_train_timesteps, shift=m)
        extra["time_shift"] = {"shift": m, "how": how}
        terminal = dict(pipe.scheduler.config).get("shift_terminal")
        if terminal and shift == "auto":
            extra["time_shift"]["not_reproduced"] = (
                f"the scheduler's shift_terminal {terminal} (the shifted levels stretched so the last is {terminal}, "
                "depending on the number of steps): bench steps on the shifted levels without the stretch"
            )
        if m != 1.0:
            weights = hashlib.sha256(f"{weights}|time_shift={m!r}".encode()).hexdigest()[:16]

    pipe.to(device)
    neg = [negative_prompt] * len(prompts)
    ms = int(_call_default(pipe, "max_sequence_length", 226))
    mask = pooled = rope = rope_scale = None
    model_2 = boundary = None
    with torch.no_grad():
        if family == "hunyuan":  # its default prompt template; the negative prompt only for an unconditional row
            emb, pooled, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=ms)
            neg_emb, neg_pooled, neg_mask = pipe.encode_prompt([negative_prompt], device=device, max_sequence_length=ms)
            if neg_emb.shape[1] != emb.shape[1]:
                raise PipelineError("HunyuanVideo: the prompt and negative prompt encodings differ in length")
            pooled = torch.cat([pooled, neg_pooled]).to(model.dtype)
            mask = torch.cat([mask, neg_mask]).to(model.dtype)  # as the pipeline casts it
        elif family == "ltx":
            emb, m_pos, neg_emb, m_neg = pipe.encode_prompt(prompts, neg, True, max_sequence_length=ms, device=device)
            mask = torch.cat([m_pos, m_neg[:1]])
            rate = int(frame_rate or _call_default(pipe, "frame_rate", 25))
            rope_scale = (t_factor / rate, s_factor, s_factor)
            extra["video"]["frame_rate"] = rate
        else:
            emb, neg_emb = pipe.encode_prompt(prompts, neg, True, max_sequence_length=ms, device=device)
        if family == "cogvideox" and cfg_t.use_rotary_positional_embeddings:
            rope = pipe._prepare_rotary_positional_embeddings(height, width, latent_f, device)
    if family == "wan":
        ratio = pipe.config.get("boundary_ratio")
        if ratio is not None and getattr(pipe, "transformer_2", None) is not None and pipe.transformer is not None:
            model_2, boundary = pipe.transformer_2, float(ratio) * pipe.scheduler.config.num_train_timesteps
            extra["experts"] = {"boundary_timestep": boundary, "guidance_scale_2": "= guidance (the pipeline's default)"}
    table = torch.cat([emb, neg_emb[:1]]).to(model.dtype)
    net = VideoTextNet(
        model, family, table, latent_shape, mask=mask, pooled=pooled, schedule=schedule if isinstance(schedule, ShiftedFlowSchedule) else None,
        model_2=model_2, boundary=boundary, expand_timesteps=bool(pipe.config.get("expand_timesteps", False)),
        rope=rope, rope_scale=rope_scale,
    ).eval().requires_grad_(False)  # fmt: skip
    extra["decode"] = _decoder(pipe, family, device, drop_frames=pad)
    extra["prompts"] = list(prompts)
    embedded = name in EMBEDDED_GUIDANCE
    extra["guidance"] = "embedded (guidance-distilled: one pass per step)" if embedded else "classifier-free"
    return ModelBundle(
        name="diffusers",
        denoiser=Denoiser(net, kind, schedule, net.null_class, guidance_embedded=embedded),
        sample_shape=latent_shape,
        data="video",
        num_classes=len(prompts),
        dtype=torch.float32,
        weights_hash=weights,
        extra=extra,
        arch="video-dit",
    )


VIDEO_BACKEND.update(is_video=is_video_pipeline, bundle=video_bundle, capabilities=video_capabilities)
