"""CausVid (Yin et al. 2025, "From Slow Bidirectional to Fast Autoregressive Video Diffusion Models",
arXiv 2412.07772): a bidirectional video teacher distilled into a block-causal, few-step student that
generates a clip chunk by chunk with a KV cache, so the first frames are final long before the last.

The student network (:class:`CausalLatte`) is the teacher's Latte stack (its modules copied, not
changed: a fresh student has the teacher's weights, as in the paper) run with two differences:

- **block-causal temporal attention**: the frames are split into chunks of ``chunk_frames``; a frame
  attends (in the temporal self-attention, the only layer that mixes frames) to every frame of its own
  chunk and of earlier chunks, never to a later chunk (:func:`block_causal_mask`). The spatial
  self-attention and the cross-attention to the class token work within one frame and are unchanged.
- **per-frame times** (diffusion forcing): each chunk has its own noise level. The spatial blocks and
  the output layer are modulated per frame already (their ada-norm-single rows are frames); the
  temporal blocks' ada-norm-single modulates a whole token sequence (one row = the frames of one patch
  position) with one time, so :func:`temporal_block` reimplements that block's computation with its
  own modules (norms, attention projections, feed-forward, scale-shift table) and modulates each frame
  of the sequence by its own time. With one time for all frames and no mask it is the teacher's
  computation operation for operation (tests: bit for bit).

Generation (:func:`causal_sample`): chunk after chunk, each denoised in ``steps`` steps over the
trailing grid 1000 -> 0 (the student predicts the flow velocity; x0 = x_t - s v), re-noising the x0
estimate to the next level with fresh noise between steps (DMD2's multistep sampling, which CausVid
uses, ``gamma`` = 1; ``gamma`` = 0 moves deterministically along the prediction). The finished chunk
is then run once more at t = 0 to put its keys and values into the cache (a clean context, as at the
paper's inference), and the next chunk attends to the cache. Earlier chunks are never recomputed.

Training, in the paper's two stages (each an artifact):

1. ``ode_init``: regression of the causal student on teacher ODE trajectories (``trajectories``: the
   guided teacher's Euler trajectories from noise, with the states at the student's grid times kept):
   each chunk of a training clip is put at an independently drawn grid time (its trajectory state at
   that time), and the student's x0 estimate of every frame, under the block-causal mask, regresses to
   the trajectory's endpoint.
2. ``generator``: DMD (:func:`methods.distillation.dmd.distribution_matching_loss`,
   :class:`~methods.distillation.dmd.FakeScore`): starting from ``ode_init``, the student denoises
   clips whose chunks are at independently drawn grid times (the teacher's endpoints noised with fresh
   noise; a chunk at t = 1000 is pure noise) in one causal forward; the clips of x0 estimates get the
   distribution-matching gradient with the guided bidirectional teacher as the real score and an
   online-trained bidirectional fake score (a copy of the teacher: the asymmetric distillation).

NFE of a chunked sampler: the harness counts each forward of the student network on a chunk as one
row per sample, so a job's ``nfe`` is chunk forwards per sample: ``chunks * steps + chunks - 1`` (the
last chunk's cache pass is skipped). One chunk forward processes ``chunk_frames / F`` of the clip's
tokens, so full-clip-equivalent evaluations are ``nfe * chunk_frames / F`` (19 chunk forwards = 4.75
full-clip evaluations at 4 steps and 4 chunks of 2 frames); the ``flops`` column counts them exactly.

Departures from the paper, stated:

- chunks of 2 frames of an 8-frame clip (4 chunks) by default; the paper's chunks are several latent
  frames of a VAE-compressed video. Steps per chunk 1, 2 or 4 (the paper: 4) on the trailing grid
  1000/750/500/250 of bench's flow teachers (the paper's grid is its teacher's own timesteps).
- per-chunk times enter the temporal blocks' ada-norm-single modulation per frame (reimplemented,
  above); Latte's temporal blocks take one time per token sequence, the paper's DiT needs no change.
- the teacher trajectories are the guided teacher's Euler-16 solutions (256 of them by default), the
  ODE-initialisation regresses x0 with the mean squared error.
- the DMD stage's generator inputs are the teacher's ODE endpoints forward-noised to per-chunk grid
  times (diffusion forcing), not the student's own rollouts (the later Self Forcing's change); the
  endpoints stand in for the paper's data, since the teacher is the only source here. One fake-score
  update per generator update (DMD's schedule); no GAN term; no regression in the DMD stage
  (``reg_weight`` 0 by default; the ODE regression can be added beside DMD with it).
- the real score is the teacher guided at the job's scale, so the student embeds that scale (one
  network row per sample; a job at another scale is refused).
- budgets are sized for a shared CPU core (600 ODE steps and 400 DMD steps at batch 16, learning rate
  2e-4 then 5e-5, EMA 0.99); the paper trains for thousands of GPU steps.
- the finished chunk is run once more at t = 0 to fill the KV cache (one extra chunk forward per chunk
  but the last); the cache could instead keep the keys and values of the last denoising step (cheaper,
  but a noisy context the student did not see in training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bench.adapter import Knob, MethodAdapter, MethodNotApplicable, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from bench.io import load_weights
from bench.seeds import generators as seeded_generators
from bench.seeds import noise, noise_like
from bench.students import PAIR_SEED, FixedGuidanceNet, denoising_loss, device_of, save_student
from bench.training import TrainConfig, fit
from methods.distillation.dmd import FakeScore, budget_knobs, distribution_matching_loss, find_artifact, guidance_of

TRAJ_FILE = "trajectories.safetensors"
TRAJ_CHUNK = 64
STEPS = (1, 2, 4)


# --- the block-causal student network ----------------------------------------------------------


def block_causal_mask(frames: int, chunk_frames: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(frames, frames) bool: entry [i, j] is True when frame i may attend to frame j, i.e. when j's
    chunk (of ``chunk_frames`` frames) is i's or an earlier one."""
    if chunk_frames < 1 or frames % chunk_frames:
        raise ValueError(f"chunk_frames must divide the {frames} frames of a clip, got {chunk_frames}")
    chunk = torch.arange(frames, device=device) // chunk_frames
    return chunk[None, :] <= chunk[:, None]


@dataclass
class KVCache:
    """The temporal attention's keys and values of the finished chunks, per layer: tensors
    (B * patches, heads, cached frames, head dim). ``frames`` is how many frames are cached."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0


def _check_latte(net: nn.Module) -> None:
    blocks = getattr(getattr(net, "transformer", None), "transformer_blocks", None)
    if blocks is None or not all(hasattr(b, "spatial") and hasattr(b, "temporal") for b in blocks):
        raise MethodNotApplicable(
            "causvid needs a Latte video transformer of spatio-temporal blocks (net.transformer.transformer_blocks[i] with "
            ".spatial and .temporal, as moving-digits-dit has); this network has none: use a solver or cache on it"
        )


def temporal_block(
    blk: nn.Module,
    h: torch.Tensor,
    temb: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    layer: int,
    store: bool,
) -> torch.Tensor:
    """diffusers' ``BasicTransformerBlock`` (ada-norm-single, self-attention only) on ``h``
    (rows, frames, D), each frame modulated by its own row of ``temb`` (rows, frames, 6 D), the
    self-attention's keys and values preceded by layer ``layer`` of ``cache`` (and, with ``store``,
    appended to it); ``mask`` (frames, cached + frames) bool, or None for full attention."""
    rows, f, d = h.shape
    mod = blk.scale_shift_table[None, None] + temb.reshape(rows, f, 6, d)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m[:, :, 0] for m in mod.chunk(6, dim=2))
    nh = blk.norm1(h) * (1 + scale_msa) + shift_msa
    attn = blk.attn1
    q, k, v = attn.to_q(nh), attn.to_k(nh), attn.to_v(nh)
    hd = k.shape[-1] // attn.heads
    q, k, v = (z.view(rows, -1, attn.heads, hd).transpose(1, 2) for z in (q, k, v))
    if cache is not None and layer < len(cache.keys):
        k = torch.cat([cache.keys[layer], k], dim=2)
        v = torch.cat([cache.values[layer], v], dim=2)
    if store:
        assert cache is not None
        if layer < len(cache.keys):
            cache.keys[layer], cache.values[layer] = k, v
        else:
            cache.keys.append(k)
            cache.values.append(v)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).reshape(rows, -1, attn.heads * hd).to(q.dtype)
    o = attn.to_out[1](attn.to_out[0](o)) / attn.rescale_output_factor
    h = gate_msa * o + h
    ff = blk.ff(blk.norm2(h) * (1 + scale_mlp) + shift_mlp)
    return gate_mlp * ff + h


class CausalLatte(nn.Module):
    """The causal student: ``net(x, t, cond, cache=None, start=0, store=False) -> velocity`` on the
    frames ``x`` (B, f, C, H, W) that start at clip frame ``start``; ``t`` one time per sample (B,) or
    per frame (B, f). Without a cache, the f frames attend block-causally among themselves; with one,
    they form one chunk that attends to itself and to the cached earlier frames (``store``: its keys
    and values are added). Its parameters are the teacher's network's (the same state dict)."""

    arch = "video-dit"

    def __init__(self, teacher_net: nn.Module, chunk_frames: int) -> None:
        super().__init__()
        _check_latte(teacher_net)
        self.transformer = teacher_net.transformer
        self.class_token = teacher_net.class_token
        self.null_class = self.class_token.num_embeddings - 1
        self.frames = int(self.transformer.config.video_length)
        block_causal_mask(self.frames, chunk_frames)  # checks the chunk size
        self.chunk_frames = int(chunk_frames)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None,
        cache: KVCache | None = None,
        start: int = 0,
        store: bool = False,
    ) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"the causal student takes frames (B, f, C, H, W), got shape {tuple(x.shape)}")
        tr = self.transformer
        b, f, c, height, width = x.shape
        if cache is not None and cache.frames != start:
            raise ValueError(f"the cache holds {cache.frames} frames but this chunk starts at frame {start}")
        if start + f > self.frames:
            raise ValueError(f"frames {start}..{start + f} exceed the clip's {self.frames}")
        if cond is None:
            cond = torch.full((b,), self.null_class, dtype=torch.long, device=x.device)
        t = torch.as_tensor(t, device=x.device).to(x.dtype)
        t = t.expand(b) if t.ndim == 0 else t
        tf = t.reshape(b, -1).expand(b, f) if t.ndim == 1 or t.shape[-1] == 1 else t
        if tf.shape != (b, f):
            raise ValueError(f"t must be one time per sample ({b},) or per frame ({b}, {f}), got shape {tuple(t.shape)}")
        h = tr.pos_embed(x.reshape(b * f, c, height, width))
        n, d = h.shape[1], h.shape[2]
        cond_kw = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "hidden_dtype": h.dtype}
        if bool((tf == tf[:, :1]).all()):  # one time per sample: embedded once per sample, as the teacher does
            temb, embedded = tr.adaln_single(tf[:, 0], batch_size=b, **cond_kw)
            temb, embedded = temb.repeat_interleave(f, dim=0), embedded.repeat_interleave(f, dim=0)
        else:
            temb, embedded = tr.adaln_single(tf.reshape(-1), batch_size=b * f, **cond_kw)
        context = tr.caption_projection(self.class_token(cond)[:, None])
        context = context.repeat_interleave(f, dim=0).view(-1, context.shape[-2], context.shape[-1])
        temb_temporal = temb.reshape(b, 1, f, -1).expand(b, n, f, temb.shape[-1]).reshape(b * n, f, -1)
        if cache is None:
            full = block_causal_mask(self.frames, self.chunk_frames, x.device)[start : start + f, start : start + f]
            mask = None if bool(full.all()) else full
        else:
            mask = None  # one chunk: itself and every cached (earlier) frame
        for i, block in enumerate(tr.transformer_blocks):
            h = block.spatial(h, None, context, None, temb, None, None)
            h = h.reshape(b, f, n, d).permute(0, 2, 1, 3).reshape(b * n, f, d)
            if block.temporal_position:
                h = h + tr.temp_pos_embed[:, start : start + f].to(h.dtype)
            h = temporal_block(block.temporal, h, temb_temporal, mask, cache, i, store)
            h = h.reshape(b, n, f, d).permute(0, 2, 1, 3).reshape(b * f, n, d)
        shift, scale = (tr.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        h = tr.proj_out(tr.norm_out(h) * (1 + scale) + shift)
        p = tr.config.patch_size
        gh, gw = height // p, width // p
        h = h.reshape(-1, gh, gw, p, p, tr.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", h).reshape(-1, tr.out_channels, gh * p, gw * p)
        return out.reshape(b, f, tr.out_channels, gh * p, gw * p)


def causal_student(bundle: ModelBundle, chunk_frames: int) -> CausalLatte:
    """A trainable causal student initialised from (a copy of) the teacher's network."""
    import copy

    net = bundle.denoiser.net
    _check_latte(net)
    return CausalLatte(copy.deepcopy(net), chunk_frames).train().requires_grad_(True)


# --- generation --------------------------------------------------------------------------------


def student_grid(steps: int, t_max: float = 1000.0) -> list[float]:
    """The ``steps + 1`` descending native times of a chunk's denoising (trailing, uniform)."""
    return [t_max * (1 - i / steps) for i in range(steps + 1)]


@torch.no_grad()
def causal_sample(
    net: Callable[..., torch.Tensor],
    z: torch.Tensor,
    cond: torch.Tensor | None,
    steps: int,
    chunk_frames: int,
    generators: list[torch.Generator] | None,
    gamma: float = 1.0,
    t_max: float = 1000.0,
) -> torch.Tensor:
    """Chunk-by-chunk generation from the clip noise ``z`` (B, F, C, H, W) with a flow-velocity
    student ``net(x, t, cond, cache=, start=, store=)`` (see the module docstring): each chunk
    denoised in ``steps`` steps attending to the KV cache of the finished chunks, then cached."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    b, frames = z.shape[:2]
    grid = student_grid(steps, t_max)
    cache = KVCache()
    chunks = []
    for lo in range(0, frames, chunk_frames):
        x = z[:, lo : lo + chunk_frames]
        for t, t_next in zip(grid, grid[1:], strict=False):
            s, s_next = t / t_max, t_next / t_max
            tt = torch.full((b,), t, dtype=torch.float64, device=z.device)
            x0 = x - s * net(x, tt, cond, cache=cache, start=lo, store=False)
            if t_next == 0:
                x = x0
            elif gamma == 1.0:  # re-noise the estimate to the next level (DMD2 / CausVid)
                x = (1 - s_next) * x0 + s_next * noise_like(x0, generators)
            else:  # eps read from the prediction, mixed with fresh noise (gamma 0: deterministic)
                eps = (x - (1 - s) * x0) / s
                fresh = noise_like(x0, generators) if gamma > 0 else torch.zeros_like(x0)
                x = (1 - s_next) * x0 + s_next * (math.sqrt(1 - gamma**2) * eps + gamma * fresh)
        chunks.append(x)
        if lo + chunk_frames < frames:  # the finished chunk's keys and values, at t = 0, for the next chunks
            zero = torch.zeros((b,), dtype=torch.float64, device=z.device)
            net(x, zero, cond, cache=cache, start=lo, store=True)
    return torch.cat(chunks, dim=1)


# --- teacher trajectories -----------------------------------------------------------------------


@torch.no_grad()
def teacher_trajectories(ctx: BuildContext, teacher_steps: int, steps: int, n: int, guidance: float) -> None:
    """``n`` guided teacher Euler trajectories (``teacher_steps`` uniform steps from t = 1000, seeds
    ``PAIR_SEED``, classes cycling), keeping the states at the student's ``steps``-step grid times and
    the endpoint: ``states`` (n, steps + 1, F, C, H, W), ``labels``; checkpointed in chunks."""
    bundle = ctx.bundle
    den = bundle.denoiser
    if teacher_steps % steps:
        raise ValueError(f"teacher_steps ({teacher_steps}) must be a multiple of the student's steps ({steps})")
    dev = device_of(den.net)
    grid = student_grid(teacher_steps)
    keep = list(range(0, teacher_steps + 1, teacher_steps // steps))
    state = ctx.resume() or {"done": 0, "states": []}
    done, kept = int(state["done"]), list(state["states"])
    while done < n:
        hi = min(done + TRAJ_CHUNK, n)
        gens = seeded_generators(PAIR_SEED, range(done, hi), dev)
        x = noise(gens, bundle.sample_shape, bundle.dtype, dev)
        cond = (torch.arange(done, hi) % bundle.num_classes).to(dev) if bundle.num_classes else None
        traj = [x]
        for t, t_next in zip(grid, grid[1:], strict=False):
            x = x + (t_next - t) / 1000.0 * den(x, t, cond, guidance)
            traj.append(x)
        kept.append(torch.stack([traj[i] for i in keep], dim=1).cpu())
        done = hi
        ctx.checkpoint({"done": done, "states": kept}, done)
        ctx.progress(done, n, what="trajectories")
    states = torch.cat(kept)
    if not torch.isfinite(states).all():
        raise ValueError("the teacher's trajectories contain NaN/inf; lower the guidance or raise teacher_steps")
    labels = torch.arange(n) % bundle.num_classes if bundle.num_classes else torch.full((n,), -1)
    save_file({"states": states.contiguous(), "labels": labels}, str(ctx.out / TRAJ_FILE))
    ctx.note(samples_drawn=n)


def load_trajectories(art: Artifact) -> dict[str, torch.Tensor]:
    return load_file(str(art.path / TRAJ_FILE))


# --- the two training stages ---------------------------------------------------------------------


class CausVidTrainer:
    """Both stages' losses for the shared loop. ``ode_loss``: per-chunk grid times, the trajectory
    states as inputs, the endpoints as targets. ``dmd_loss``: per-chunk grid times, the endpoints
    noised as inputs, DMD's gradient on the x0 clip (the fake score steps after it)."""

    def __init__(
        self, bundle: ModelBundle, knobs: Mapping[str, Any], w: float, steps: int, traj: Mapping[str, torch.Tensor]
    ) -> None:
        self.bundle, self.c, self.w, self.steps = bundle, dict(knobs), float(w), int(steps)
        dev = device_of(bundle.denoiser.net)
        self.states = traj["states"].to(dev)
        self.labels = traj["labels"].to(dev) if bundle.num_classes else None
        self.grid = torch.tensor(student_grid(steps)[:-1], dtype=torch.float64)  # the times a chunk is denoised at
        self.frames = int(bundle.sample_shape[0])
        self.fake: FakeScore | None = None
        self.history = torch.full((self.c["train_steps"] + self.c["ode_steps"], 2), float("nan"))
        self.done = torch.zeros((), dtype=torch.long)

    def _batch(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Trajectory indices, per-chunk grid indices expanded to frames (B, F), labels, times (B, F)."""
        b, k = self.c["batch_size"], self.c["chunk_frames"]
        idx = torch.randint(0, len(self.states), (b,), generator=g)
        level = torch.randint(0, self.steps, (b, self.frames // k), generator=g).repeat_interleave(k, dim=1)
        cond = self.labels[idx] if self.labels is not None else None
        return idx, level, cond, self.grid[level].to(self.states.device)

    @staticmethod
    def _x0(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        s = (t / 1000.0).to(x.dtype)[:, :, None, None, None]
        return x - s * net(x, t, cond)

    def _record(self, col: int, value: torch.Tensor) -> None:
        i = int(self.done)
        if i < len(self.history):
            self.history[i, col] = float(value.detach())
        self.done += 1

    def ode_loss(self, net: nn.Module, g: torch.Generator) -> torch.Tensor:
        idx, level, cond, t = self._batch(g)
        loss = self.regression(net, g)
        self._record(1, loss)
        return loss

    def regression(self, net: nn.Module, g: torch.Generator) -> torch.Tensor:
        """The ODE initialisation's loss on one batch (each chunk at its trajectory state at its time)."""
        idx, level, cond, t = self._batch(g)
        traj = self.states[idx]  # (B, steps + 1, F, C, H, W)
        frame = torch.arange(self.frames)[None, :]
        x = traj[torch.arange(len(idx))[:, None], level.to(traj.device), frame]  # (B, F, C, H, W)
        return F.mse_loss(self._x0(net, x, t, cond), traj[:, -1])

    def dmd_loss(self, net: nn.Module, g: torch.Generator) -> torch.Tensor:
        assert self.fake is not None
        idx, _, cond, t = self._batch(g)
        y = self.states[idx, -1]
        eps = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
        s = (t / 1000.0).to(y.dtype)[:, :, None, None, None]
        x = self._x0(net, (1 - s) * y + s * eps, t, cond)
        l_dm = distribution_matching_loss(x, cond, self.bundle.denoiser, self.fake.den, self.w, g)
        loss = l_dm
        if self.c["reg_weight"] > 0:
            loss = loss + self.c["reg_weight"] * self.regression(net, g)
        self.fake.step(denoising_loss(self.fake.den, self.fake.net, x.detach(), cond, g))
        self._record(0, l_dm)
        return loss

    def state(self) -> dict[str, Any]:
        st: dict[str, Any] = {"history": self.history, "done": self.done}
        if self.fake is not None:
            st |= self.fake.state()
        return st

    def summary(self, col: int, name: str) -> dict[str, float]:
        h = self.history[:, col]
        h = h[~h.isnan()]
        k = max(1, len(h) // 20)
        out = dict(self.fake.summary()) if self.fake is not None and col == 0 else {}
        if len(h):
            out |= {f"{name}_first_loss": float(h[:k].mean()), f"{name}_final_loss": float(h[-k:].mean())}
        return out


def load_causal(path: Any, bundle: ModelBundle, chunk_frames: int, fix: str) -> CausalLatte:
    """A causal student with the weights ``path`` (a ``.safetensors`` file) on the teacher's device."""
    net = causal_student(bundle, chunk_frames)
    load_weights(net, path, fix)
    return net.eval().requires_grad_(False).to(device_of(bundle.denoiser.net))


# --- the method ---------------------------------------------------------------------------------


@register_method
class CausVid(MethodAdapter):
    name = "causvid"
    family = "distillation"
    training = "finetune"
    paper = "Yin et al. 2025, From Slow Bidirectional to Fast Autoregressive Video Diffusion Models, arXiv 2412.07772"
    description = (
        "block-causal few-step video student from the bidirectional teacher (its weights as initialisation): ODE "
        "initialisation on teacher trajectories with per-chunk noise levels, then DMD with the guided bidirectional "
        "teacher as real score; generates chunk by chunk with a KV cache (steps = steps per chunk)"
    )
    applies_to = Applies(arch=("video-dit",), data=("video",), prediction=("flow",))
    steps_supported = STEPS
    knobs = (
        Knob("chunk_frames", int, 2, "frames per causal chunk (must divide the clip's frames)", low=1, high=1024, trains=True),
        Knob("teacher_steps", int, 16, "Euler steps of the guided teacher's ODE trajectories (a multiple of 4)", low=4,
             high=1000, trains=True),
        Knob("trajectories", int, 256, "teacher ODE trajectories (ODE initialisation inputs and DMD's clean clips)", low=1,
             high=10_000_000, trains=True),
        Knob("ode_steps", int, 600, "optimiser steps of the ODE initialisation", low=1, high=10_000_000, trains=True),
        Knob("ode_lr", float, 2e-4, "AdamW learning rate of the ODE initialisation (warm-up, cosine)", low=1e-8, high=1.0,
             trains=True),
        *budget_knobs(400, 16, 5e-5, 0.99),
        Knob("reg_weight", float, 0.0, "weight of the ODE regression beside DMD in the second stage (the paper: 0)",
             low=0.0, high=1e6, trains=True),
        Knob("gamma", float, 1.0, "sampling: 1 re-noises each x0 estimate with fresh noise (the paper), 0 moves "
             "deterministically along the prediction", low=0.0, high=1.0),
    )  # fmt: skip

    def _check(self, bundle: ModelBundle) -> None:
        _check_latte(bundle.denoiser.net)
        frames = int(bundle.sample_shape[0])
        if frames % self.config["chunk_frames"]:
            raise MethodNotApplicable(f"chunk_frames {self.config['chunk_frames']} does not divide the clip's {frames} frames")

    def traj_spec(self, bundle: ModelBundle, w: float, steps: int) -> ArtifactSpec:
        c = self.config
        rows = c["trajectories"] * c["teacher_steps"] * (2 if w != 1.0 and bundle.num_classes else 1)
        return artifact_spec(self, bundle, "trajectories", {"guidance": w, "steps": int(steps)}, (),
                             {"teacher_rows": rows}, knobs=["teacher_steps", "trajectories"])  # fmt: skip

    def ode_spec(self, bundle: ModelBundle, w: float, steps: int) -> ArtifactSpec:
        c = self.config
        budget = {"optimizer_steps": c["ode_steps"], "batch_size": c["batch_size"], "teacher_rows": 0}
        names = ["chunk_frames", "teacher_steps", "trajectories", "ode_steps", "ode_lr", "batch_size", "seed", "ema"]
        return artifact_spec(self, bundle, "ode_init", {"guidance": w, "steps": int(steps)},
                             (self.traj_spec(bundle, w, steps),), budget, knobs=names)  # fmt: skip

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        self._check(bundle)
        w = guidance_of(bundle, guidance, self.name)
        c = self.config
        rows = c["train_steps"] * c["batch_size"] * (2 if w != 1.0 and bundle.num_classes else 1)
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
        parents = (self.traj_spec(bundle, w, steps), self.ode_spec(bundle, w, steps))
        return [artifact_spec(self, bundle, "generator", {"guidance": w, "steps": int(steps)}, parents, budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c, bundle = self.config, ctx.bundle
        w, steps = float(spec.params["guidance"]), int(spec.params["steps"])
        if spec.name == "trajectories":
            teacher_trajectories(ctx, c["teacher_steps"], steps, c["trajectories"], w)
            return
        trainer = CausVidTrainer(bundle, c, w, steps, load_trajectories(ctx.parent("trajectories")))
        student = causal_student(bundle, c["chunk_frames"])
        info = {"prediction": "flow", "guidance": w, "steps": steps, "chunk_frames": c["chunk_frames"]}
        if spec.name == "ode_init":
            n, loss, lr = c["ode_steps"], trainer.ode_loss, c["ode_lr"]
        else:
            fix = "rebuild it: delete the artifact directory and run again"
            load_weights(student, ctx.parent("ode_init").path / "student.safetensors", fix)
            trainer.done.fill_(c["ode_steps"])
            trainer.fake = FakeScore(bundle, c["seed"], c["fake_lr"], c["train_steps"])
            n, loss, lr = c["train_steps"], trainer.dmd_loss, c["lr"]
        cfg = TrainConfig(n, c["batch_size"], lr, min(100, n // 10), c["ema"], ckpt_every=max(1, n // 20))
        res = fit(student, loss, cfg, c["seed"], ctx, lambda s, m, v: ctx.progress(s, m, v), trainer.state())
        save_student(ctx.out, res.model, info)
        ctx.note_training(res)
        ctx.note(**(trainer.summary(1, "ode") if spec.name == "ode_init" else trainer.summary(0, "dm")))

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        self._check(bundle)
        art = find_artifact(self.name, "generator", artifacts)
        net = load_causal(art.path / "student.safetensors", bundle, self.config["chunk_frames"],
                          f"rebuild the artifact: delete {art.path} and run again")  # fmt: skip
        w = float(art.record.get("params", {}).get("guidance", 1.0))
        return causal_prepared(bundle, net, w, steps, self.config["gamma"])


def causal_prepared(bundle: ModelBundle, net: CausalLatte, w: float, steps: int, gamma: float = 1.0) -> Prepared:
    """The job a causal student runs: its network (guidance ``w`` embedded) as the counted denoiser,
    and the chunk-by-chunk sampler calling it."""
    conditional = bundle.num_classes is not None
    wrapped = FixedGuidanceNet(net, w) if conditional else net
    den = Denoiser(wrapped, "flow", bundle.denoiser.schedule, None, guidance_embedded=conditional)
    chunk = net.chunk_frames

    def call(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float, **kw: Any) -> torch.Tensor:
        return wrapped(x, t, cond, guidance, **kw) if conditional else wrapped(x, t, cond, **kw)

    def sampler(z: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]) -> torch.Tensor:
        return causal_sample(lambda x, t, c, **kw: call(x, t, c, guidance, **kw), z, cond, steps, chunk, generators, gamma)

    frames = int(bundle.sample_shape[0])
    full_clip = (frames // chunk * steps + frames // chunk - 1) * chunk / frames
    return Prepared(sampler, den, info={"distilled_guidance": w, "full_clip_nfe": full_clip})


def committed_student(bundle: ModelBundle, record: Mapping[str, Any], weights: Any) -> Prepared:
    """A committed causal student (``weights``: its safetensors; ``record``: its JSON) as a job."""
    net = load_causal(
        weights, bundle, int(record["chunk_frames"]), f"restore {weights} from git or rebuild it ({record.get('command')})"
    )
    return causal_prepared(bundle, net, float(record["guidance"]), int(record["steps"]), float(record.get("gamma", 1.0)))
