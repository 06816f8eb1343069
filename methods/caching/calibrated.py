"""Calibrated feature caches (TeaCache, MagCache): what they share.

Both reuse the residual of the whole transformer block stack (image-token output of the last
block minus image-token input of the first) on the network calls they skip, and both decide when
to skip from numbers measured once per (model, solver, steps) on a *calibration run*: the
uncached solver sampled on a few seeds of its own, with recording hooks on the first block,
the last block and the model. One run records, per network call,

* TeaCache's pairs, per batch row: the relative L1 change of the first block's timestep-
  modulated input (``norm1(hidden_states, emb=temb)``) and of the model output since the
  previous call;
* MagCache's magnitude ratio: the mean over rows and tokens of ||r_t|| / ||r_{t-1}|| of the
  block-stack residuals r of successive calls (1.0 for the first call).

The calibration is an artifact (:mod:`bench.artifacts`, ``$BENCH_HOME/artifacts``): built once by
the harness before the jobs that use it, shared by every job and by ``bench calibrate``, its cost
(wall time, teacher forwards counted by the harness) recorded with it and reported as the
method's training cost. Its key holds the code version of the method's module, so an edit to
what a calibration records rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.hooks import ModelHook
from torch import nn

from bench.adapter import Knob, Sampler
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import ModelBundle
from bench.seeds import generators, noise
from methods.caching.base import CacheAdapter, CacheHandle, block_lists, register, remove_hooks, snapshot, target_model

CALIB_SEED = 2**31 - 11  # calibration noise seeds, disjoint from any suite's sample seeds
CALIB_FILE = "calibration.json"
REC_HEAD, REC_TAIL, REC_ROOT = "calib_rec_head", "calib_rec_tail", "calib_rec_root"

CALIB_KNOBS = (
    Knob("calib_samples", int, 8, "seeds of the calibration run (its own seeds, classes cycling)", low=1, high=1024, trains=True),
    Knob("calib_guidance", float, 2.0, "guidance scale of the calibration run", low=0.0, high=100.0, trains=True),
)


# --- transformer-block plumbing (diffusers' block metadata) -----------------------------------


def block_meta(block: nn.Module) -> TransformerBlockMetadata:
    """diffusers' description of a block's hidden-state argument and return layout."""
    try:
        return TransformerBlockRegistry.get(type(block))
    except ValueError:
        raise ValueError(
            f"{type(block).__name__} is not in diffusers' TransformerBlockRegistry; TeaCache/MagCache hook diffusers "
            "transformer blocks (Flux, SD3, Wan, ...): use a registered transformer or register its block metadata"
        ) from None


def block_hidden_in(meta: TransformerBlockMetadata, args: tuple, kwargs: dict) -> torch.Tensor:
    return meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)


def block_hidden_out(meta: TransformerBlockMetadata, out: Any) -> torch.Tensor:
    # a one-stream block (BasicTransformerBlock: PixArt, DiT) returns its tensor, not a tuple
    return (
        out if meta.return_hidden_states_index is None or isinstance(out, torch.Tensor) else out[meta.return_hidden_states_index]
    )


def block_result(meta: TransformerBlockMetadata, args: tuple, kwargs: dict, hidden: torch.Tensor) -> Any:
    """What the block returns, with ``hidden`` as its hidden states and its encoder states passed through."""
    if meta.return_encoder_hidden_states_index is None:
        return hidden
    enc = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
    out: list[Any] = [None] * (max(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) + 1)
    out[meta.return_hidden_states_index] = hidden
    out[meta.return_encoder_hidden_states_index] = enc
    return tuple(out)


def stack_residual(out_hidden: torch.Tensor, in_hidden: torch.Tensor) -> torch.Tensor:
    """Block-stack residual on the image tokens (a fused text+image output keeps the image tokens last)."""
    if out_hidden.shape == in_hidden.shape:
        return out_hidden - in_hidden
    if out_hidden.ndim == 3 and out_hidden.shape[0] == in_hidden.shape[0] and out_hidden.shape[1] > in_hidden.shape[1]:
        return out_hidden[:, -in_hidden.shape[1] :] - in_hidden
    raise ValueError(f"block stack output {tuple(out_hidden.shape)} does not match its input {tuple(in_hidden.shape)}")


def modulated_input(block: nn.Module, meta: TransformerBlockMetadata, args: tuple, kwargs: dict) -> torch.Tensor:
    """TeaCache's indicator input: the first block's timestep-modulated hidden states, ``norm1(h, emb=temb)[0]``."""
    norm = getattr(block, "norm1", None) or getattr(block, "norm", None)
    try:
        temb = meta._get_parameter_from_args_kwargs("temb", args, kwargs)
    except (ValueError, IndexError, KeyError):
        temb = None
    if norm is None or temb is None:
        raise ValueError(
            f"TeaCache needs a first block with a timestep-modulated norm (norm1 or norm called with emb=temb, as "
            f"Flux's); {type(block).__name__} has none: use a Flux-style diffusers transformer"
        )
    try:
        out = norm(block_hidden_in(meta, args, kwargs), emb=temb)
    except TypeError as e:  # a norm that is not modulated this way (Wan's FP32LayerNorm, CogVideoX's, LTX's RMSNorm)
        raise ValueError(
            f"TeaCache needs a first block whose norm1 takes the timestep embedding (norm1(h, emb=temb), as Flux's); "
            f"{type(block).__name__}.{type(norm).__name__} does not ({e}): use first_block_cache or magcache on this model"
        ) from None
    return out[0] if isinstance(out, tuple) else out


def rel_l1(a: torch.Tensor, b: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """Relative L1 change of ``a`` from ``b``, per leading index (``dims=1``) or over everything (``dims=0``)."""
    a, b = a.float(), b.float()
    if dims == 0:
        return (a - b).abs().mean() / b.abs().mean()
    return (a - b).abs().flatten(1).mean(1) / b.abs().flatten(1).mean(1)


def per_sample(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """Block hidden states as one row per sample of a ``batch``-row model call: a video DiT's blocks
    see each frame of a clip as a row (B*F, N, D), the frames of one sample being consecutive."""
    if hidden.shape[0] == batch:
        return hidden
    if hidden.shape[0] % batch:
        raise ValueError(f"block rows {hidden.shape[0]} are not a multiple of the model call's batch {batch}")
    return hidden.reshape(batch, -1)


def magnitude_ratio(cur: torch.Tensor, prev: torch.Tensor) -> float:
    """MagCache's ratio: mean over rows and tokens of ||cur|| / ||prev|| (norms over the feature axis)."""
    return float((cur.float().norm(dim=-1) / (prev.float().norm(dim=-1) + 1e-8)).mean())


# --- the calibration run ---------------------------------------------------------------------


class Recorder:
    """Per-call statistics of an uncached run (see the module docstring); filled by the hooks below."""

    def __init__(self) -> None:
        self.calls = 0
        self.tea_x: list[list[float]] = []  # per call from the second: per-row rel. L1 change of the modulated input
        self.tea_y: list[list[float]] = []  # ... and of the model output
        self.mag_ratios: list[float] = []  # per call: magnitude ratio of the block-stack residual (first: 1.0)
        self._mod = self._head_in = self._res = None
        self._prev_mod = self._prev_out = self._prev_res = None

    def head(self, hidden: torch.Tensor, modulated: torch.Tensor | None) -> None:
        self._head_in, self._mod = hidden.detach(), None if modulated is None else modulated.detach()

    def tail(self, hidden_out: torch.Tensor) -> None:
        self._res = stack_residual(hidden_out.detach(), self._head_in)

    def output(self, out: torch.Tensor) -> None:
        """End of a network call: turn what the head and tail saw into this call's numbers."""
        out = out.detach()
        if self._res is None:
            raise RuntimeError("calibration: the model returned without running its last transformer block")
        self.mag_ratios.append(1.0 if self._prev_res is None else magnitude_ratio(self._res, self._prev_res))
        if self._prev_out is not None and self._mod is not None:
            self.tea_x.append(rel_l1(per_sample(self._mod, len(out)), per_sample(self._prev_mod, len(out))).tolist())
            self.tea_y.append(rel_l1(out, self._prev_out).tolist())
        self._prev_mod, self._prev_out, self._prev_res = self._mod, out, self._res
        self._mod = self._head_in = self._res = None
        self.calls += 1


class _RecHead(ModelHook):
    def __init__(self, rec: Recorder, meta: TransformerBlockMetadata, modulation: bool) -> None:
        super().__init__()
        self.rec, self.meta, self.modulation = rec, meta, modulation

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        mod = modulated_input(module, self.meta, args, kwargs) if self.modulation else None
        self.rec.head(block_hidden_in(self.meta, args, kwargs), mod)
        return self.fn_ref.original_forward(*args, **kwargs)


class _RecTail(ModelHook):
    def __init__(self, rec: Recorder, meta: TransformerBlockMetadata) -> None:
        super().__init__()
        self.rec, self.meta = rec, meta

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.rec.tail(block_hidden_out(self.meta, out))
        return out


class _RecRoot(ModelHook):
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = self.fn_ref.original_forward(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        self.rec.output(first)
        return out


def record_run(model: nn.Module, run: Any, modulation: bool) -> Recorder:
    """Call ``run()`` with recording hooks on ``model`` (a diffusers transformer); the model is left as it was."""
    blocks = block_lists(model)
    (_, head), (_, tail) = blocks[0], blocks[-1]
    rec = Recorder()
    before = snapshot(model)
    register(tail, _RecTail(rec, block_meta(tail)), REC_TAIL)
    register(head, _RecHead(rec, block_meta(head), modulation), REC_HEAD)  # outermost on a one-block model
    register(model, _RecRoot(rec), REC_ROOT)
    try:
        run()
    finally:
        remove_hooks(CacheHandle(model, [REC_ROOT, REC_HEAD, REC_TAIL], before))
    return rec


def fit_rescale(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    """TeaCache's rescaling polynomial: least squares (``numpy.polyfit``) of output change on input change."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"fit_rescale: {x.size} input changes but {y.size} output changes")
    if np.unique(x).size <= degree:
        raise ValueError(
            f"fit_rescale: {np.unique(x).size} distinct points cannot fit a degree-{degree} polynomial; "
            "calibrate on more steps or seeds, or lower the degree"
        )
    return np.polyfit(x, y, degree)


def params_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of a model's weights (first and last parameter tensors), beside its weights hash."""
    params = list(model.parameters())
    h = hashlib.sha256()
    for p in (params[0], params[-1]) if params else ():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --- the adapter base --------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A loaded calibration: the artifact (None when given by hand) and what the run recorded."""

    artifact: Artifact | None
    data: dict[str, Any]

    @property
    def n_calls(self) -> int:
        return int(self.data["n_calls"])


class CalibratedCache(CacheAdapter):
    """A cache whose skip rule needs a calibration run (training class ``calibration``).

    Its artifact is the calibration of (model, weights, solver, steps, the knobs marked ``trains``):
    built once by the harness (:meth:`build`: the uncached solver on the calibration seeds with the
    recording hooks), loaded by :meth:`make` into :attr:`calibration` for :meth:`apply`. Tests and
    tools may set :attr:`calibration` by hand (:meth:`use`) to install the hooks on a bare transformer.
    """

    training = "calibration"
    modulation: ClassVar[bool] = False  # whether the calibration records TeaCache's modulated input

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.calibration: Calibration | None = None

    # what a subclass provides
    def fit(self, rec: Recorder) -> dict[str, Any]:
        """The method's calibration from a recorded run (JSON-serialisable)."""
        raise NotImplementedError

    def calibration_spec(self, bundle: ModelBundle, steps: int) -> ArtifactSpec:
        n, g = self.config["calib_samples"], self.config["calib_guidance"]
        rows = n * int(steps) * (2 if g != 1.0 and bundle.num_classes else 1)  # about: solvers with more NFE per step spend more
        params = {"solver": self.config["solver"], "steps": int(steps), "net": params_fingerprint(bundle.denoiser.net)}
        inner = tuple(self.solver_adapter().artifacts(bundle, steps, None))  # e.g. a GITS schedule under the solver
        return artifact_spec(self, bundle, "calibration", params, parents=inner, budget={"teacher_rows": rows})

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        return [*super().artifacts(bundle, steps, guidance), self.calibration_spec(bundle, steps)]

    @torch.no_grad()
    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        if spec.name != "calibration":
            return super().build(spec, ctx)
        c, bundle = self.config, ctx.bundle
        net = bundle.denoiser.net
        self.units(target_model(net))  # a clear error for a model this cache cannot hook
        device = next(net.parameters()).device
        n = c["calib_samples"]
        gens = generators(CALIB_SEED, range(n), device)
        x = noise(gens, bundle.sample_shape, bundle.dtype, device)
        cond = (torch.arange(n) % bundle.num_classes).to(device) if bundle.num_classes else None
        inner = self.solver(bundle, int(spec.params["steps"]), {a.key: a for a in ctx.parents.values()})
        rec = record_run(target_model(net), lambda: inner(x, cond, c["calib_guidance"], gens), self.modulation)
        data = {"n_calls": rec.calls, **self.fit(rec)}
        (ctx.out / CALIB_FILE).write_text(json.dumps(data, indent=1))
        ctx.note(samples_drawn=n)

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Sampler:
        spec = self.calibration_spec(bundle, steps)
        if spec.key not in artifacts:
            raise ValueError(f"{self.name}: its calibration {spec.label} was not given; prepare(bundle, steps) builds it")
        art = artifacts[spec.key]
        self.calibration = Calibration(art, json.loads((art.path / CALIB_FILE).read_text()))
        return super().make(bundle, steps, artifacts)

    def calibrate(self, bundle: ModelBundle, steps: int) -> Calibration:
        """Get (or build, once) this configuration's calibration and keep it for :meth:`apply`."""
        self.prepare(bundle, steps)
        assert self.calibration is not None
        return self.calibration

    def use(self, data: dict[str, Any]) -> None:
        """Use a calibration given by hand (``n_calls`` plus the method's fields), without the store."""
        self.calibration = Calibration(None, data)

    def need_calibration(self) -> Calibration:
        if self.calibration is None:
            raise ValueError(f"{self.name}: no calibration loaded; call prepare(bundle, steps) or calibrate(bundle, steps) first")
        return self.calibration
