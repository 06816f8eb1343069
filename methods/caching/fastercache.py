"""FasterCache (Lv et al. 2024, arXiv 2410.19355): attention reuse with extrapolation, plus CFG-Cache.

Two parts, both training-free:

* Dynamic feature reuse. Inside a timestep window (t < ``attn_t_high``) each attention layer runs
  only on every ``attn_interval``-th call; on the others its output is extrapolated from its two
  most recent computed outputs, ``F = F_a + w (F_a - F_b)`` (F_a the latest), with ``w`` rising
  from 0 to 1 over the denoising (``1 - t/1000``; or the fixed ``attn_weight``).
* CFG-Cache. On a full guided call both halves run and the difference of the unconditional and
  conditional outputs is stored in frequency space, split into a low-frequency disc (radius
  min(H, W) // 5 around the centred spectrum) and the high-frequency rest. Inside a window
  (t < ``cfg_t_high``), except every ``cfg_interval``-th call, only the conditional half is
  computed and the unconditional output is reconstructed as
  ``IFFT(FFT(cond) + w_low * dLF + w_high * dHF)``, with ``w_low = alpha_low`` for t in (99, 901)
  and ``w_high = alpha_high`` for t in (-1, 301), else 1 (the paper's Eq. 11 indicator weights).

Why not diffusers' ``apply_faster_cache``: its denoiser hook assumes an [uncond, cond] batch (bench's
guided forward is [cond, uncond], bench/denoiser.py), so it would compute the unconditional half and
reconstruct the conditional one; it splits only named kwargs (not Flux's ``pooled_projections``);
its FFT runs over the last two axes of the transformer output, which for Flux are (tokens, channels),
not the image plane; its attention hooks extrapolate from the last two outputs including
extrapolated ones, and its frequency weights compound from call to call. So both parts are written
here. The attention part is a set of named hooks on the transformer (diffusers' hook style). The
CFG part cannot be a hook inside the network and stay honest: ``ForwardCounter`` counts the rows
entering ``denoiser.net``, so a hook that dropped the unconditional rows inside it would still be
counted as 2B rows. It is a :class:`~bench.denoiser.Denoiser` subclass the solver samples through,
which calls the network with only the B conditional rows on a cached call: the harness counts B
rows, so NFE (rows / (n * 2)) drops by half a function evaluation per cached call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.hooks._common import _ATTENTION_CLASSES
from diffusers.hooks.hooks import ModelHook
from torch import nn

from bench.adapter import Knob, Sampler, register_method
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from methods.caching.base import SOLVER_KNOB, CacheAdapter, CacheHandle, block_lists, register, target_model
from methods.caching.pab import TIMESTEP_HOOK, TimestepHook, install_timestep_hook

ATTN_HOOK = "fastercache_attention"
LOW_WEIGHT_WINDOW = (99.0, 901.0)  # t where alpha_low applies (diffusers' reading of the paper's Eq. 11)
HIGH_WEIGHT_WINDOW = (-1.0, 301.0)  # t where alpha_high applies


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The (self/joint) attention layers of the transformer blocks, by name."""
    out = {}
    for bname, block in block_lists(model):
        for name, m in block.named_modules():
            if isinstance(m, _ATTENTION_CLASSES) and not getattr(m, "is_cross_attention", False):
                out[f"{bname}.{name}"] = m
    if not out:
        raise ValueError(
            f"{type(model).__name__} has no diffusers attention layers in its blocks; FasterCache targets diffusers DiTs"
        )
    return out


def _rows(x: Any, n: int) -> Any:
    return x[:n] if torch.is_tensor(x) else tuple(v[:n] for v in x)


def _nrows(x: Any) -> int:
    return x.shape[0] if torch.is_tensor(x) else x[0].shape[0]


def _extrapolate(a: Any, b: Any, w: float) -> Any:
    if torch.is_tensor(a):
        return a + w * (a - b)
    return tuple(x + w * (x - y) for x, y in zip(a, b, strict=True))


class AttentionReuseHook(ModelHook):
    """Computes the attention every ``interval`` calls inside the window; extrapolates between.

    Cached outputs keep all the rows they were computed on; a call needing fewer rows (the
    conditional half on a CFG-cached call: bench puts the conditional rows first) uses the first
    ones, a call needing more than the cache holds computes."""

    _is_stateful = True

    def __init__(self, clock: TimestepHook, interval: int, t_high: float, weight: float) -> None:
        super().__init__()
        self.clock, self.interval, self.t_high, self.weight = clock, interval, t_high, weight
        self.reset_state(None)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        t = self.clock()
        rows = next(v.shape[0] for v in (*args, *kwargs.values()) if torch.is_tensor(v))
        reuse = (
            self.interval > 1
            and t < self.t_high
            and self.iteration % self.interval != 0
            and len(self.computed) == 2
            and all(_nrows(c) >= rows for c in self.computed)
        )
        self.iteration += 1
        self.decisions.append(not reuse)
        if reuse:
            w = self.weight if self.weight >= 0 else 1.0 - t / 1000.0
            older, latest = (_rows(c, rows) for c in self.computed)
            return _extrapolate(latest, older, w)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.interval > 1:
            self.computed = [*self.computed[-1:], out]
        return out

    def reset_state(self, module: nn.Module | None) -> nn.Module | None:
        self.iteration = 0
        self.computed: list[Any] = []
        self.decisions: list[bool] = []  # per call: True = computed
        return module


def split_frequencies(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred 2-D spectrum of ``x`` (…, H, W) split into a low-frequency disc of radius
    min(H, W) // 5 and the high-frequency rest (FasterCache's split)."""
    h, w = x.shape[-2:]
    f = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    low = ((yy - h // 2) ** 2 + (xx - w // 2) ** 2) <= (min(h, w) // 5) ** 2
    return f * low, f * ~low


def merge_frequencies(f: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real


def _in(t: float, window: tuple[float, float]) -> bool:
    return window[0] < t < window[1]


class CFGCacheDenoiser(Denoiser):
    """A denoiser whose guided calls reconstruct the unconditional output on cached calls.

    Call k of a run (counted over guided calls) computes both halves when k == 0, when k is a
    multiple of ``interval``, or when t >= ``t_high``; then it stores the frequency-split
    uncond - cond difference. Otherwise it runs the network on the conditional rows only.
    ``interval`` 1 is the plain denoiser, bit for bit."""

    def __init__(self, base: Denoiser, interval: int, t_high: float, alpha_low: float, alpha_high: float) -> None:
        super().__init__(base.net, base.prediction, base.schedule, base.null_class, base.guidance_embedded)
        self.interval, self.t_high, self.alpha_low, self.alpha_high = interval, t_high, alpha_low, alpha_high
        self.reset()

    def reset(self) -> None:
        self.call = 0
        self.delta: tuple[torch.Tensor, torch.Tensor] | None = None
        self.decisions: list[bool] = []  # per guided call: True = both halves computed

    def weights(self, t: float) -> tuple[float, float]:
        return (
            self.alpha_low if _in(t, LOW_WEIGHT_WINDOW) else 1.0,
            self.alpha_high if _in(t, HIGH_WEIGHT_WINDOW) else 1.0,
        )

    def reconstruct_uncond(self, c: torch.Tensor, t: float) -> torch.Tensor:
        """``IFFT(FFT(c) + w_low dLF + w_high dHF)`` from the stored difference."""
        lo, hi = split_frequencies(c)
        w_low, w_high = self.weights(t)
        d_lo, d_hi = self.delta
        return merge_frequencies(lo + w_low * d_lo + hi + w_high * d_hi).to(c.dtype)

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None, guidance: float = 1.0
    ) -> torch.Tensor:
        if cond is None or guidance == 1.0 or self.null_class is None or self.interval == 1 or self.guidance_embedded:
            return super().__call__(x, t, cond, guidance)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tt = float(t.flatten()[0])
        k, self.call = self.call, self.call + 1
        cached = (
            k > 0
            and k % self.interval != 0
            and tt < self.t_high
            and self.delta is not None
            and self.delta[0].shape[0] == x.shape[0]
        )
        self.decisions.append(not cached)
        if cached:
            c = self.net(x, t, cond)
            u = self.reconstruct_uncond(c, tt)
            return u + guidance * (c - u)
        null = torch.full_like(cond, self.null_class)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        c, u = out.chunk(2)
        (c_lo, c_hi), (u_lo, u_hi) = split_frequencies(c), split_frequencies(u)
        self.delta = (u_lo - c_lo, u_hi - c_hi)
        return u + guidance * (c - u)


@register_method
class FasterCache(CacheAdapter):
    name = "fastercache"
    paper = "Lv et al. 2024, FasterCache: Training-Free Video Diffusion Model Acceleration with High Quality, arXiv 2410.19355"
    applies_to = Applies(arch=("dit", "video-dit"))  # diffusers transformers and video DiTs (their blocks are what it caches)
    description = (
        "extrapolate attention outputs between full calls; CFG-Cache: conditional half only, uncond from the cached difference"
    )
    knobs = (
        SOLVER_KNOB,
        Knob("attn_interval", int, 2, "attention computed every N calls in its window (1: never reused)", low=1, high=100),
        Knob(
            "attn_t_high",
            float,
            681.0,
            "attention reuse only while t < this (scheduler timestep, 0..1000)",
            low=-1.0,
            high=1001.0,
        ),
        Knob(
            "attn_weight",
            float,
            -1.0,
            "extrapolation weight w (-1: 1 - t/1000, rising 0 -> 1 as in the paper)",
            low=-1.0,
            high=2.0,
        ),
        Knob(
            "cfg_interval",
            int,
            5,
            "both CFG halves computed every N guided calls in its window (1: no CFG-Cache)",
            low=1,
            high=100,
        ),
        Knob("cfg_t_high", float, 641.0, "CFG-Cache only while t < this (scheduler timestep, 0..1000)", low=-1.0, high=1001.0),
        Knob("alpha_low", float, 1.1, "weight of the low-frequency difference for t in (99, 901)", low=0.0, high=3.0),
        Knob("alpha_high", float, 1.1, "weight of the high-frequency difference for t in (-1, 301)", low=0.0, high=3.0),
    )

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        c = self.config
        layers = attention_layers(model)
        clock = install_timestep_hook(model)
        self.attention_hooks = {}
        for name, layer in layers.items():
            hook = AttentionReuseHook(clock, c["attn_interval"], c["attn_t_high"], c["attn_weight"])
            register(layer, hook, ATTN_HOOK)
            self.attention_hooks[name] = hook
        return CacheHandle(model, [TIMESTEP_HOOK, ATTN_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return attention_layers(model)

    def cfg_denoiser(self, base: Denoiser) -> CFGCacheDenoiser:
        c = self.config
        return CFGCacheDenoiser(base, c["cfg_interval"], c["cfg_t_high"], c["alpha_low"], c["alpha_high"])

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Any]) -> Sampler:
        den = self.cfg_denoiser(bundle.denoiser)
        inner = self.solver(dataclasses.replace(bundle, denoiser=den), steps, artifacts)
        model = target_model(bundle.denoiser.net)
        self.units(model)
        self.cfg = den

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            den.reset()
            with self.installed(model, steps):
                return inner(noise, cond, guidance, generators)

        return sampler
