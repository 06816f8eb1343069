"""Released students as methods (methods/released) on tiny random-weight stand-ins of the real
classes: an LCM UNet (guidance as input), a random LoRA (LCM-LoRA), UNet state-dict files (DMD2,
SDXL-Lightning) and a whole pipeline (SDXL-Turbo) paired with the tiny Stable Diffusion teacher.

Each sampler is checked against the diffusers pipeline run as the authors' model cards say (same
latents, same generator states), the timesteps against values computed by hand, and the harness's
NFE against the student's own network."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipelines import PROMPTS, sd_dir  # noqa: F401  (the tiny SD teacher fixture)

from bench.accounting import ForwardCounter
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise


@pytest.fixture(scope="module")
def teacher(sd_dir):  # noqa: F811
    return build_model("diffusers", pipeline=str(sd_dir), prompts=PROMPTS, device="cpu")


def perturbed(unet: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A copy of ``unet`` with every weight moved by seeded noise: a different network of the same architecture."""
    out = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def make_students(d: Path, pipe_dir: Path, pipeline_cls: type) -> Path:
    """Stand-ins of each released form for the teacher pipeline in ``pipe_dir``, saved in ``d`` as the
    authors publish them: an LCM UNet, a random LoRA, UNet state-dict files, a whole pipeline."""
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = pipeline_cls.from_pretrained(pipe_dir)
    unet = pipe.unet
    # an LCM UNet: the teacher's architecture plus the guidance-scale input (time_cond_proj_dim)
    torch.manual_seed(1)
    UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": 8}).save_pretrained(d / "lcm" / "unet")
    # a random LoRA on the attention projections, saved the way diffusers' training scripts save one
    lora_unet = copy.deepcopy(unet)
    torch.manual_seed(2)
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    lora_unet.add_adapter(config)
    layers = get_peft_model_state_dict(lora_unet)
    pipeline_cls.save_lora_weights(d / "lora", unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    # UNet state dicts of the teacher's architecture: DMD2's torch .bin, Lightning's safetensors
    (d / "dmd2").mkdir()
    torch.save(perturbed(unet, 3).state_dict(), d / "dmd2" / "dmd2_sdxl_4step_unet_fp16.bin")
    torch.save(perturbed(unet, 4).state_dict(), d / "dmd2" / "dmd2_sdxl_1step_unet_fp16.bin")
    (d / "lightning").mkdir()
    for n in (1, 2):
        sd = {k: v.contiguous() for k, v in perturbed(unet, 10 + n).state_dict().items()}
        save_file(sd, d / "lightning" / f"sdxl_lightning_{n}step_unet.safetensors")
    # a whole pipeline (SDXL-Turbo's form): other weights, its own scheduler (Euler ancestral, trailing)
    pipe.unet = perturbed(unet, 5)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.save_pretrained(d / "turbo")
    return d


@pytest.fixture(scope="module")
def students(sd_dir, tmp_path_factory):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    return make_students(tmp_path_factory.mktemp("students"), sd_dir, StableDiffusionPipeline)


def start(b, n: int = 2, seed: int = 0):
    """Per-sample generators and the start latents drawn from them (bench's harness order), and a
    second set of generators in the same state for the pipeline."""
    gens = generators(seed, range(n), "cpu")
    z = noise(gens, b.sample_shape, torch.float32, "cpu")
    theirs = generators(seed, range(n), "cpu")
    noise(theirs, b.sample_shape, torch.float32, "cpu")
    return z, gens, theirs


def run_counted(prepared, z, cond, gens):
    """The prepared sampler under the harness's forward counter on its denoiser's network, and the
    timesteps the network was called at."""
    seen: list[float] = []
    net = prepared.denoiser.net
    h = net.register_forward_pre_hook(lambda m, a: seen.append(float(a[1].flatten()[0])))
    try:
        with ForwardCounter(net) as counter:
            counter.arm()
            x = prepared(z, cond, 7.5, gens)  # the suite's guidance is not the student's: it is ignored
    finally:
        h.remove()
    return x, counter, seen


def lcm_timesteps_by_hand(steps: int, original: int = 50, T: int = 1000) -> list[int]:
    """LCM's skipping-step grid (Luo et al. 2023, Sec. 4.2): t = k*c - 1 for k = 1..N with c = T/N,
    from the noisiest, taking `steps` of them at evenly spaced positions floor(i * N / steps)."""
    c = T // original
    grid = [k * c - 1 for k in range(original, 0, -1)]
    return [grid[math.floor(i * original / steps)] for i in range(steps)]


def test_lcm_timesteps_by_hand():
    assert lcm_timesteps_by_hand(4) == [999, 759, 499, 259]
    assert lcm_timesteps_by_hand(2) == [999, 499]
    assert lcm_timesteps_by_hand(1) == [999]


@pytest.mark.parametrize("steps", [2, 4])
def test_lcm_unet_follows_lcm_sampling_and_the_pipeline(teacher, students, sd_dir, steps):  # noqa: F811
    """An LCM UNet with guidance as input: the network is called at LCM's timesteps (by hand), once
    per step and one row per sample (w embedded, no CFG half), and the result is the diffusers
    pipeline's with LCMScheduler at guidance_scale 8 from the same latents and generator states
    (LCM re-noises between steps, so this checks the per-sample generators are the pipeline's)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    m = METHODS.get("lcm_unet")(student=str(students / "lcm"))
    prep = m.prepare(teacher, steps)
    assert prep.info["student_timesteps"] == lcm_timesteps_by_hand(steps)
    assert prep.info["train_cost_source"] == "quoted" and math.isnan(prep.info["train_cost_quoted_gpu_h"])
    assert "not published" in prep.info["train_cost_citation"]
    assert prep.denoiser.net is not teacher.denoiser.net and prep.denoiser.rows_per_sample(7.5, True) == 1
    z, gens, theirs_g = start(teacher)
    cond = torch.tensor([0, 2])
    ours, counter, seen = run_counted(prep, z, cond, gens)
    assert seen == lcm_timesteps_by_hand(steps) and counter.calls == steps and counter.rows == 2 * steps

    unet = UNet2DConditionModel.from_pretrained(students / "lcm" / "unet")
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, unet=unet)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([PROMPTS[0], PROMPTS[2]], latents=z.clone(), num_inference_steps=steps, guidance_scale=8.0,
                  generator=theirs_g, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_lcm_lora_fuses_the_random_lora_into_a_copy_and_matches_the_pipeline(teacher, students, sd_dir):  # noqa: F811
    """LCM-LoRA: the LoRA fused into a copy of the teacher's UNet (W + B A alpha/r, checked by hand on
    one projection), the teacher's own weights untouched, and the samples those of the pipeline that
    loads and fuses the same LoRA (load_lora_weights, fuse_lora) with LCMScheduler at guidance 1."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    t_unet = teacher.denoiser.net.unet
    before = t_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
    prep = METHODS.get("lcm_lora")(student=str(students / "lora")).prepare(teacher, 4)
    s_unet = prep.denoiser.net.unet
    assert s_unet is not t_unet
    torch.testing.assert_close(t_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight, before)
    lora = load_file(students / "lora" / "pytorch_lora_weights.safetensors")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    A, B = lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"]
    by_hand = before + (4 / 2) * B @ A  # lora_alpha / r
    fused = s_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    torch.testing.assert_close(fused, by_hand, rtol=1e-5, atol=1e-6)
    assert not any("lora" in n for n, _ in s_unet.named_modules())  # fused and unloaded: no extra layers to count

    z, gens, theirs_g = start(teacher)
    ours, counter, seen = run_counted(prep, z, torch.tensor([1, 2]), gens)
    assert seen == lcm_timesteps_by_hand(4) and counter.rows == 2 * 4  # guidance 1: no unconditional half
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.load_lora_weights(students / "lora")
    pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([PROMPTS[1], PROMPTS[2]], latents=z.clone(), num_inference_steps=4, guidance_scale=1.0,
                  generator=theirs_g, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 4])
def test_dmd2_unet_runs_at_the_authors_timesteps(teacher, students, sd_dir, steps):  # noqa: F811
    """DMD2: the UNet state dict (a torch .bin, read with weights_only) swapped in for the teacher's,
    LCMScheduler at the README's timesteps [999, 749, 499, 249] / [399], no guidance; the pipeline
    with the same UNet and timesteps gives the same latents."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    prep = METHODS.get("dmd2_sdxl")(student=str(students / "dmd2")).prepare(teacher, steps)
    want = {4: [999, 749, 499, 249], 1: [399]}[steps]
    assert prep.info["student_timesteps"] == want
    z, gens, theirs_g = start(teacher)
    ours, counter, seen = run_counted(prep, z, torch.tensor([0, 1]), gens)
    assert seen == want and counter.rows == 2 * steps
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.unet.load_state_dict(torch.load(students / "dmd2" / f"dmd2_sdxl_{steps}step_unet_fp16.bin", weights_only=True))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([PROMPTS[0], PROMPTS[1]], latents=z.clone(), num_inference_steps=steps, timesteps=want,
                  guidance_scale=0.0, generator=theirs_g, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2])
def test_lightning_unet_runs_euler_trailing_and_x0_at_one_step(teacher, students, sd_dir, steps):  # noqa: F811
    """SDXL-Lightning: the N-step UNet file, EulerDiscreteScheduler with trailing spacing (and x0
    prediction for the 1-step model), no guidance: the model card's pipeline gives the same latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    prep = METHODS.get("sdxl_lightning")(student=str(students / "lightning")).prepare(teacher, steps)
    assert prep.denoiser.prediction == ("x0" if steps == 1 else "eps")
    z, gens, _ = start(teacher)
    ours, counter, seen = run_counted(prep, z, torch.tensor([2, 0]), gens)
    trailing = [999.0] if steps == 1 else [999.0, 499.0]
    assert seen == pytest.approx(trailing) and counter.rows == 2 * steps
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.unet.load_state_dict(load_file(students / "lightning" / f"sdxl_lightning_{steps}step_unet.safetensors"))
    extra = {"prediction_type": "sample"} if steps == 1 else {}
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", **extra)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([PROMPTS[2], PROMPTS[0]], latents=z.clone(), num_inference_steps=steps, guidance_scale=0.0,
                  output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_student_pipeline_runs_with_its_own_scheduler(teacher, students):
    """SDXL-Turbo's form: a whole pipeline, built with the teacher's options, stepped by its own
    scheduler (Euler ancestral, trailing: stochastic, drawing from the per-sample generators); the
    pipeline itself gives the same latents."""
    from diffusers import StableDiffusionPipeline

    prep = METHODS.get("sdxl_turbo")(student=str(students / "turbo")).prepare(teacher, 2)
    assert prep.denoiser.net.unet is not teacher.denoiser.net.unet
    z, gens, theirs_g = start(teacher)
    ours, counter, seen = run_counted(prep, z, torch.tensor([0, 1]), gens)
    assert seen == pytest.approx([999.0, 499.0]) and counter.rows == 2 * 2
    pipe = StableDiffusionPipeline.from_pretrained(students / "turbo")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([PROMPTS[0], PROMPTS[1]], latents=z.clone(), num_inference_steps=2, guidance_scale=0.0,
                  generator=theirs_g, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_absent_weights_name_the_hub_id_and_the_fetch_command(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from methods.released.base import ReleasedWeightsError

    with pytest.raises(ReleasedWeightsError, match=r"`hf download tianweiy/DMD2 dmd2_sdxl_4step_unet_fp16.bin`"):
        METHODS.get("dmd2_sdxl")().prepare(teacher, 4)
    with pytest.raises(ReleasedWeightsError, match=r"`hf download latent-consistency/lcm-lora-sdxl pytorch_lora_weights"):
        METHODS.get("lcm_lora")().prepare(teacher, 4)
    with pytest.raises(Exception, match=r"`hf download stabilityai/sdxl-turbo`"):
        METHODS.get("sdxl_turbo")().prepare(teacher, 1)
    with pytest.raises(ReleasedWeightsError, match=r"`hf download SimianLuo/LCM_Dreamshaper_v7`"):
        METHODS.get("lcm_unet")().prepare(teacher, 4)
    with pytest.raises(ReleasedWeightsError, match=r"`hf download ByteDance/Hyper-SD Hyper-SDXL-2steps-lora.safetensors`"):
        METHODS.get("hyper_sd")().prepare(teacher, 2)
    with pytest.raises(ReleasedWeightsError, match="no such file or directory"):
        METHODS.get("sdxl_lightning")(student=str(tmp_path / "nowhere")).prepare(teacher, 4)
    with pytest.raises(Exception, match="runs at 1/4 steps"):
        METHODS.get("dmd2_sdxl")().prepare(teacher, 2)


def test_quoted_costs_are_cited_or_not_published():
    """Every quote carries its citation; a checkpoint no source costs is NaN, 'not published'."""
    from methods.released.base import ReleasedStudent, quoted_cost

    names = [e.name for e in METHODS if isinstance(e.obj, type) and issubclass(e.obj, ReleasedStudent)]
    assert sorted(names) == sorted(
        ["lcm_unet", "lcm_lora", "sdxl_turbo", "sdxl_lightning", "hyper_sd", "dmd2_sdxl", "flux_schnell"]
    )
    lcm = METHODS.get("lcm_unet")
    q = quoted_cost(lcm.quotes, "SimianLuo/LCM_Dreamshaper_v7")
    assert q.gpu_hours == 32.0 and "2310.04378" in q.citation
    for n in names:
        cls = METHODS.get(n)
        for student, quote in cls.quotes.items():
            assert quote.published and quote.citation, (n, student)
        default = cls().config["student"]
        q = quoted_cost(cls.quotes, default)
        assert q.published or (np.isnan(q.gpu_hours) and "not published" in q.citation)
