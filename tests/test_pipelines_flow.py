"""The flow pipelines' time shift: SD3's static shift and FLUX's resolution-dependent (dynamic) one,
read from the scheduler config, so bench's `euler` at the pipeline's steps equals the pipeline's own
loop; the `shift` option (auto | none | a number) and its place in the bundle's identity; every
transformer cache, FirstBlockCache included, on SD3."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipelines import PROMPTS, euler_at_guidance_3, flux_dir, sd3_dir  # noqa: F401  (fixtures)
from tiny_pipelines import run_applicable_caches

from bench.models import build_model
from bench.models.pipelines import ShiftedFlowSchedule


def with_scheduler(src: Path, dst: Path, **cfg) -> Path:
    """A copy of the pipeline at ``src`` whose scheduler config has ``cfg`` set."""
    shutil.copytree(src, dst)
    path = dst / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **cfg}))
    return dst


@pytest.fixture(scope="module")
def sd3_shifted(sd3_dir, tmp_path_factory) -> Path:  # noqa: F811
    return with_scheduler(sd3_dir, tmp_path_factory.mktemp("sd3-shift") / "pipe", shift=3.0)


@pytest.fixture(scope="module")
def flux_dynamic(flux_dir, tmp_path_factory) -> Path:  # noqa: F811
    """FLUX.1's scheduler config (dynamic shifting), its token counts scaled to the tiny images:
    16x16 pixels are 16 packed tokens, 32x32 are 64."""
    return with_scheduler(
        flux_dir, tmp_path_factory.mktemp("flux-dyn") / "pipe", use_dynamic_shifting=True, shift=3.0,
        base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15,
    )  # fmt: skip


def test_sd3_static_shift_euler_equals_the_pipeline(sd3_shifted):
    """shift 3 from the scheduler config: bench's uniform 4-step grid in its own time is the
    pipeline's sigmas linspace(1, 1/4, 4) after the scheduler shifts them, and the network sees
    the shifted timesteps (1000 s)."""
    from diffusers import StableDiffusion3Pipeline

    b = build_model("diffusers", pipeline=str(sd3_shifted), prompts=PROMPTS, device="cpu")
    sch = b.denoiser.schedule
    assert isinstance(sch, ShiftedFlowSchedule) and sch.shift == 3.0
    assert b.extra["time_shift"] == {"shift": 3.0, "how": "static (scheduler config)"}
    seen_model: list[float] = []
    h = b.denoiser.net.transformer.register_forward_pre_hook(
        lambda m, a, k: seen_model.append(float(k["timestep"].flatten()[0])), with_kwargs=True
    )
    try:
        ours, z, seen = euler_at_guidance_3(b)
    finally:
        h.remove()
    assert seen == pytest.approx([1000, 750, 500, 250])  # bench's time u
    s = np.array([1, 0.75, 0.5, 0.25])
    assert seen_model == pytest.approx(list(1000 * 3 * s / (1 + 2 * s)), rel=1e-6)  # the network's: shifted
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_shifted, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=z.clone(), sigmas=list(np.linspace(1, 1 / 4, 4)), guidance_scale=3.0,
        height=16, width=16, output_type="latent",
    ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # shift: none is the unshifted flow (what bench did before): another result, another identity
    plain = build_model("diffusers", pipeline=str(sd3_shifted), prompts=PROMPTS, device="cpu", shift="none")
    assert plain.denoiser.schedule.shift == 1.0 and plain.weights_hash != b.weights_hash
    assert not torch.allclose(euler_at_guidance_3(plain)[0], ours, atol=1e-3)
    given = build_model("diffusers", pipeline=str(sd3_shifted), prompts=PROMPTS, device="cpu", shift=3)
    assert given.weights_hash == b.weights_hash and torch.equal(euler_at_guidance_3(given)[0], ours)


def test_flux_dynamic_shift_euler_equals_the_pipelines_default_loop(flux_dynamic):
    """FLUX.1's resolution-dependent shift: mu linear in the image's token count, m = exp(mu);
    bench's euler at 4 steps is FluxPipeline's default loop (no sigmas given) from the same
    latents, and a larger image gets a larger shift."""
    from diffusers import FluxPipeline

    from bench.models.digits_nets import pack, unpack

    b = build_model("diffusers", pipeline=str(flux_dynamic), prompts=PROMPTS, device="cpu", height=16)
    mu = 0.5 + (16 - 4) * (1.15 - 0.5) / (64 - 4)  # 16x16 pixels: 8x8 latents, 4x4 packed tokens
    assert b.denoiser.schedule.shift == pytest.approx(math.exp(mu))
    assert b.extra["time_shift"]["how"].startswith("dynamic")
    ours, z, _ = euler_at_guidance_3(b)
    pipe = FluxPipeline.from_pretrained(flux_dynamic)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        [PROMPTS[0], PROMPTS[2]], latents=pack(z.clone()), num_inference_steps=4, guidance_scale=3.0,
        height=16, width=16, output_type="latent",
    ).images  # fmt: skip
    torch.testing.assert_close(ours, unpack(theirs, *b.sample_shape), rtol=1e-4, atol=1e-5)
    big = build_model("diffusers", pipeline=str(flux_dynamic), prompts=PROMPTS, device="cpu", height=32)
    assert big.denoiser.schedule.shift == pytest.approx(math.exp(1.15))  # 64 tokens: max_shift


def test_every_dit_cache_runs_on_sd3_first_block_cache_included(sd3_shifted, tmp_path, monkeypatch):
    """SD3's last joint block ends the text stream (returns None for it): diffusers' FirstBlockCache
    hook used to fail there. Every transformer cache runs on the shifted SD3 now, and the network
    is unchanged (plain Euler before and after, bit for bit)."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    b = build_model("diffusers", pipeline=str(sd3_shifted), prompts=PROMPTS, device="cpu")
    out = run_applicable_caches(b, 6, 2.0, [0, 1])
    assert "first_block_cache" in out and "fora" in out and len(out) >= 10, sorted(out)
    assert out["fora"]["fraction"] < 1


# pndm's F-PNDM warm-up takes its midpoints' times linearly in s (core.Frame): a smaller error, within the bound
SOLVERS = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "pndm", "deis", "dpm_solver"]


@pytest.fixture(scope="module")
def shift_errors(sd3_shifted) -> dict[str, tuple[float, float]]:
    """Per solver at 8 steps, guidance 2: the largest error from a 50-step Heun solution, with
    shift none and on the shifted schedule (the same ODE: the shift only moves the grid)."""
    import methods.solvers  # noqa: F401
    from bench.registry import METHODS
    from bench.seeds import generators, noise

    out: dict[str, list[float]] = {m: [] for m in SOLVERS}
    ref = None
    for shift in ("none", "auto"):
        b = build_model("diffusers", pipeline=str(sd3_shifted), prompts=PROMPTS, device="cpu", shift=shift)
        g = generators(0, range(2), "cpu")
        z, c = noise(g, b.sample_shape, torch.float32, "cpu"), torch.tensor([0, 2])
        if ref is None:
            ref = METHODS.get("heun")().prepare(b, 50)(z, c, 2.0, g)
        for m in out:
            out[m].append(float((METHODS.get(m)().prepare(b, 8)(z, c, 2.0, g) - ref).abs().max()))
    return {m: (v[0], v[1]) for m, v in out.items()}


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_on_the_shifted_schedule_solve_the_same_ode(shift_errors, solver):
    """Moving the grid does not change the ODE: on the shifted schedule every solver stays within a
    small factor of its unshifted error. DEIS (its flow coefficients) and singlestep DPM-Solver (its
    intermediate points) ask the schedule for the shift; before they did, they were off by 1e3-1e4."""
    plain, shifted = shift_errors[solver]
    assert shifted < max(0.5, 10 * plain), (plain, shifted)
