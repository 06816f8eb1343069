"""Block Caching (Wimbauer et al. 2024, arXiv 2312.03209): per-block schedules from a calibration run.

Calibration: the uncached solver runs on a few samples while a hook on every transformer block
records, per network call t, the relative L1 change of the block's output since the previous
call, ``L1rel(i, t) = |r_t - r_(t-1)|_1 / |r_t|_1`` (averaged over the calibration batch by
summing over it). The automatic schedule (the paper's rule, Sec. 3.3): call 0 computes every
block; afterwards block i accumulates L1rel(i, t) since its last computation and is recomputed
at the first call where the sum exceeds ``threshold`` (the sum then restarts), else its cached
output is reused. The change table is an artifact (built once by the harness, shared by every
threshold, job and process; its cost recorded with it); each threshold's schedule is computed from
it when a job is prepared.

What a block "output" is here: a transformer block adds its output to the residual stream
(``y = x + f(x)``), and the paper caches the block's own output f(x) with the skip connection
still live. So L1rel is measured on f(x) = y - x, and a cached call returns the fresh x plus the
stored f(x). Departures: the optional scale-shift adjustment (a learned per-channel scale and
shift of cached outputs) is left out, so this is the paper's training-free variant; the paper
targets UNet blocks (ResBlocks/SpatialTransformers), this implementation diffusers transformer
blocks (applies to the flow transformers here); the schedule is indexed by network call, so a
calibration is per solver and steps (both in the artifact spec). Threshold 0 computes every block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers.hooks.hooks import ModelHook, StateManager
from torch import nn

from bench.adapter import Knob, Sampler, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.seeds import generators, noise
from methods.caching.base import (
    SOLVER_KNOB,
    CacheAdapter,
    CacheHandle,
    StepClockHook,
    block_lists,
    new_state,
    register,
    remove_hooks,
    snapshot,
    target_model,
)
from methods.caching.delta_dit import BlockIO, Streams, sub

CLOCK_HOOK = "block_caching_clock"
BLOCK_HOOK = "block_caching_block"
CALIB_HOOK = "block_caching_calibrate"
CALIB_SAMPLES = 8
CALIB_SEED = 1_000_003  # calibration seeds, disjoint from the suites' evaluation seeds (0, 1, ...)


def l1(s: Streams) -> torch.Tensor:
    return sum(t.abs().double().sum() for t in s if t is not None)


class ChangeRecorder(ModelHook):
    """Calibration hook on a block: the relative L1 change of its output f(x) = y - x per call."""

    def __init__(self, store: list[float]) -> None:
        super().__init__()
        self.changes = store
        self.prev: Streams | None = None
        self.io: BlockIO | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.io = BlockIO.of(module)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = self.io.inputs(args, kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        r = sub(self.io.outputs(out), x)
        if self.prev is None:
            self.changes.append(float("inf"))  # call 0: nothing to compare with (always computed)
        else:
            self.changes.append(float(l1(sub(r, self.prev)) / max(float(l1(r)), 1e-12)))
        self.prev = tuple(t.detach() if t is not None else None for t in r)
        return out


def change_table(bundle: ModelBundle, steps: int, solver: Sampler, guidance: float, n: int = CALIB_SAMPLES) -> np.ndarray:
    """``[blocks, calls]`` relative L1 change of each block's output over one uncached run of
    ``solver`` on ``n`` calibration samples (column 0 is inf: the first call)."""
    model = target_model(bundle.denoiser.net)
    blocks = block_lists(model)
    rows: list[list[float]] = [[] for _ in blocks]
    device = next(model.parameters()).device
    handle = CacheHandle(model, [CALIB_HOOK], snapshot(model))
    for (_, block), store in zip(blocks, rows, strict=True):
        register(block, ChangeRecorder(store), CALIB_HOOK)
    try:
        gens = generators(CALIB_SEED, range(n), device)
        z = noise(gens, bundle.sample_shape, bundle.dtype, device)
        cond = torch.arange(n, device=device) % bundle.num_classes if bundle.num_classes else None
        with torch.no_grad():
            solver(z, cond, guidance if cond is not None else 1.0, gens)
    finally:
        remove_hooks(handle)
    return np.array(rows, dtype=np.float64)


def build_schedule(change: np.ndarray, threshold: float) -> np.ndarray:
    """``[blocks, calls]`` booleans, True = compute: call 0 always; then a block is recomputed at the
    first call where its change accumulated since its last computation exceeds ``threshold``
    (the accumulator then restarts); ``threshold`` 0 computes everything."""
    change = np.asarray(change, dtype=np.float64)
    out = np.ones(change.shape, dtype=bool)
    if threshold <= 0:
        return out
    for i in range(change.shape[0]):
        acc = 0.0
        for t in range(1, change.shape[1]):
            acc += change[i, t]
            if acc > threshold:
                acc = 0.0
            else:
                out[i, t] = False
    return out


class BlockCacheHook(ModelHook):
    """On block ``index``: compute it where the schedule says (storing f(x) = y - x), else return the
    fresh input plus the stored f(x). Calls beyond the schedule compute."""

    _is_stateful = True

    def __init__(self, state: StateManager, compute: np.ndarray) -> None:
        super().__init__()
        self.state_manager = state  # the clock's StepState: call index
        self.compute = compute
        self.cached: Streams | None = None
        self.io: BlockIO | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.io = BlockIO.of(module)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = self.state_manager.get_state().call
        x = self.io.inputs(args, kwargs)
        if self.cached is not None and call < len(self.compute) and not self.compute[call]:
            # a block that ends the text stream (SD3's last) returns None for it: so does its reuse
            ehs = x[1] + self.cached[1] if x[1] is not None and self.cached[1] is not None else None
            return self.io.build(x[0] + self.cached[0], ehs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if call + 1 < len(self.compute) and not self.compute[call + 1 :].all():  # a reuse is still to come
            self.cached = sub(self.io.outputs(out), x)
        return out

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.cached = None
        return module


def weights_identity(bundle: ModelBundle) -> str:
    """The bundle's weights hash, or (random-weight test models) a hash of the parameters."""
    if bundle.weights_hash and bundle.weights_hash != "random":
        return bundle.weights_hash
    h = hashlib.sha256()
    for k, v in target_model(bundle.denoiser.net).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "params-" + h.hexdigest()[:16]


@register_method
class BlockCaching(CacheAdapter):
    name = "block_caching"
    training = "calibration"
    paper = "Wimbauer et al. 2024, Cache Me if You Can: Accelerating Diffusion Models through Block Caching, arXiv 2312.03209"
    applies_to = Applies(arch=("dit",))  # diffusers transformers (their blocks are what it caches)
    description = "calibrated per-block schedule: recompute a block once its accumulated relative change exceeds a threshold"
    knobs = (
        SOLVER_KNOB,
        Knob(
            "threshold",
            float,
            0.3,
            "delta: accumulated relative L1 change that forces a recompute (0: never cache)",
            low=0.0,
            high=100.0,
        ),
        Knob("calib_guidance", float, 2.0, "guidance scale of the calibration run", low=0.0, high=50.0, trains=True),
    )

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.schedule: np.ndarray | None = None
        self.change: np.ndarray | None = None

    def change_spec(self, bundle: ModelBundle, steps: int) -> ArtifactSpec:
        """The change table of (model, solver, steps, calibration guidance): shared by every threshold."""
        g = self.config["calib_guidance"]
        params = {"solver": self.config["solver"], "steps": int(steps), "samples": CALIB_SAMPLES, "seed": CALIB_SEED}
        params["net"] = weights_identity(bundle)
        inner = tuple(self.solver_adapter().artifacts(bundle, steps, None))
        rows = CALIB_SAMPLES * int(steps) * (2 if g != 1.0 and bundle.num_classes else 1)
        return artifact_spec(self, bundle, "change-table", params, parents=inner, budget={"teacher_rows": rows})

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        return [*super().artifacts(bundle, steps, guidance), self.change_spec(bundle, steps)]

    @torch.no_grad()
    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        bundle, steps = ctx.bundle, int(spec.params["steps"])
        block_lists(target_model(bundle.denoiser.net))  # a clear error for a model without transformer blocks
        solver = self.solver(bundle, steps, {a.key: a for a in ctx.parents.values()})
        table = change_table(bundle, steps, solver, self.config["calib_guidance"])
        np.save(ctx.out / "change.npy", table)
        ctx.note(samples_drawn=CALIB_SAMPLES)

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Sampler:
        spec = self.change_spec(bundle, steps)
        if spec.key not in artifacts:
            raise ValueError(f"block_caching: its calibration {spec.label} was not given; prepare(bundle, steps) builds it")
        self.change = np.load(artifacts[spec.key].path / "change.npy")
        self.schedule = build_schedule(self.change, self.config["threshold"])  # the automatic schedule (Sec. 3.3)
        return super().make(bundle, steps, artifacts)

    def calibrate(self, bundle: ModelBundle, steps: int) -> np.ndarray:
        """Get (or build, once) the change table and this threshold's schedule; returns the schedule."""
        self.prepare(bundle, steps)
        assert self.schedule is not None
        return self.schedule

    def apply(self, model: nn.Module, steps: int) -> CacheHandle:
        if self.schedule is None:
            raise RuntimeError("block_caching: no schedule; call prepare(bundle, steps) (it calibrates) before apply")
        blocks = block_lists(model)
        if self.schedule.shape[0] != len(blocks):
            raise ValueError(f"block_caching: the schedule has {self.schedule.shape[0]} blocks, the model {len(blocks)}")
        state = new_state()
        register(model, StepClockHook(state, lambda i: True), CLOCK_HOOK)
        for i, (_, block) in enumerate(blocks):
            register(block, BlockCacheHook(state, self.schedule[i]), BLOCK_HOOK)
        return CacheHandle(model, [CLOCK_HOOK, BLOCK_HOOK])

    def units(self, model: nn.Module) -> dict[str, nn.Module]:
        return dict(block_lists(model))
