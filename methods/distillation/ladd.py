"""Latent Adversarial Diffusion Distillation (LADD; Sauer et al. 2024, arXiv 2403.12015): a 1-4 step
student trained only adversarially, against a discriminator built from the frozen teacher's own
generative features, on synthetic data the teacher made.

Two artifacts, a chain:

1. ``pairs`` (knowledge distillation's artifact, shared with ``kd`` when their knobs agree):
   ``pairs`` teacher samples x_0 made by a registered solver (``teacher_solver`` at
   ``teacher_steps``) at the job's guidance w, classes cycling. LADD trains on such synthetic
   data rather than on real images.
2. ``student``: the teacher's network, copied (same parametrisation: a fresh student is the teacher),
   trained with the shared loop. Each optimiser step:

   - a batch of teacher samples x_0 with their classes c; a student time t_hat drawn uniformly from the
     student's grid (``student_steps`` uniform native times from the noisiest, ADD's
     {999, 749, 499, 249} at 4); the student denoises x_t_hat = alpha x_0 + sigma eps to x_hat_0;
   - both x_0 and x_hat_0 are re-noised to one level t per sample, drawn from LADD's logit-normal
     pi(t; m, s) over the rectified-flow time, i.e. log sigma_bar ~ N(m, s^2), mapped to the teacher's
     schedule by its noise level sigma_bar = sigma / alpha (``disc_t_mean``, ``disc_t_std``);
   - the frozen teacher runs on them (conditioned on c, no guidance) and forward hooks take its
     intermediate features: every down block and the mid block of a UNet, the image tokens of
     every transformer block of a DiT (laid out on their 2-D grid). One small trainable head per
     feature map (3x3 conv, noise-level embedding, SiLU, 1x1 conv to a logit map averaged over
     positions, plus a projection on the class embedding) gives a logit;
   - the heads take a step of the hinge loss mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))
     (averaged over heads), then the student a step of the generator's hinge loss -mean(D(fake))
     through the frozen teacher features and the just-updated heads (whose weights do not move in
     this step). No distillation (score or regression) loss: LADD trains on synthetic teacher data
     with the adversarial loss alone.

A job at 1, 2 or 4 steps samples the student as ADD/LADD do: denoise from the noisiest level, re-noise
to the next time of the grid and denoise again (:func:`bench.flowmap.sample_flow_map` with gamma 1).
Its grid at ``steps`` must be part of the trained grid (1 and 2 of 4). A conditional student runs at
the guidance of its synthetic data with the guidance embedded (one network row per sample).

Departures from the paper, for a CPU budget of minutes and the embedded teachers: pixel-space
digits (the teachers have no VAE; "latent" is the data space); class labels instead of text
(projection on a learned class embedding instead of the pooled text embedding); the heads'
architecture is a minimal one (LADD's heads are deeper); no R1 penalty; the core's AdamW for the
student (warm-up then cosine decay, EMA, gradient clipping at norm 1); Adam (betas 0.5, 0.999)
for the heads at ``disc_lr``; the student timesteps are drawn uniformly (ADD); the pairs' teacher
solver stands in for the paper's sampling of the teacher with prompts; the discriminator's noise
defaults to m = 0, s = 1 (LADD shifts it towards high noise for its latents; on the 16x16 pixel
digits, m = 1 with a 5x slower head learning rate made the one-step student worse, m = 0 better).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import methods.distillation.kd  # noqa: F401  (its pairs artifact is this method's parent)
from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from bench.flowmap import sample_flow_map, student_times
from bench.models.students import time_features
from bench.registry import METHODS
from bench.students import load_pairs, load_student, new_student, save_student, student_denoiser
from bench.training import TrainConfig, fit

PAIR_KNOBS = ("teacher_solver", "teacher_steps", "pairs")
HEAD_WIDTH = 64
TIME_DIM = 32


# --- the discriminator: frozen teacher features, small trainable heads ------------------------------


class _Stop(Exception):
    """Raised by the last feature hook: the rest of the teacher's forward is not needed."""


def _as_map(out: object, image_item: int) -> torch.Tensor:
    """A hooked block's output as a (B, C, H, W) feature map: a tuple's image item; tokens (B, N, D)
    laid out on their square grid (or a 1 x N row)."""
    if isinstance(out, tuple | list):
        out = out[image_item]
    assert isinstance(out, torch.Tensor)
    if out.ndim == 3:
        b, n, d = out.shape
        h = math.isqrt(n)
        out = out.transpose(1, 2).reshape(b, d, h, n // h) if h * h == n else out.transpose(1, 2).reshape(b, d, 1, n)
    return out


def feature_taps(net: nn.Module) -> list[tuple[nn.Module, int]]:
    """The teacher's blocks whose outputs are the discriminator's features, in execution order, each with
    the item of its output that holds the image features."""
    unet = getattr(net, "unet", None)
    if unet is not None and hasattr(unet, "down_blocks"):
        return [(m, 0) for m in unet.down_blocks] + [(unet.mid_block, 0)]
    tr = getattr(net, "transformer", None)
    if tr is not None and hasattr(tr, "transformer_blocks"):
        blocks = list(tr.transformer_blocks) + list(getattr(tr, "single_transformer_blocks", []))
        return [(m, 1) for m in blocks]
    raise ValueError(f"{type(net).__name__}: no UNet blocks or transformer blocks to take discriminator features from")


class TeacherFeatures:
    """``features(x, t, cond)``: the frozen teacher's intermediate feature maps at (x, t), by forward
    hooks registered for the call only (the teacher is left as it was). The forward stops after the
    last tapped block. Gradients flow to x, never to the teacher's weights (they are frozen)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.taps = feature_taps(net)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> list[torch.Tensor]:
        maps: list[torch.Tensor] = []
        last = len(self.taps) - 1

        def hook(i: int, item: int) -> Callable[..., None]:
            def fn(module: nn.Module, args: tuple, out: object) -> None:
                maps.append(_as_map(out, item))
                if i == last:
                    raise _Stop

            return fn

        handles = [m.register_forward_hook(hook(i, item)) for i, (m, item) in enumerate(self.taps)]
        try:
            self.net(x, t, cond)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return maps


class FeatureHead(nn.Module):
    """One discriminator head on a (B, C, H, W) feature map: 3x3 conv plus a noise-level embedding,
    SiLU, a 1x1 conv to a logit map averaged over positions, plus a projection on the class embedding."""

    def __init__(self, channels: int, num_classes: int | None, width: int = HEAD_WIDTH) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.t_proj = nn.Linear(TIME_DIM, width)
        self.out = nn.Conv2d(width, 1, 1)
        self.embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.width = width

    def forward(self, f: torch.Tensor, temb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.conv(f.float()) + self.t_proj(temb)[:, :, None, None])
        logit = self.out(h).mean((2, 3))[:, 0]
        if self.embed is not None and cond is not None:
            logit = logit + (h.mean((2, 3)) * self.embed(cond)).sum(1) / math.sqrt(self.width)
        return logit


class Discriminator(nn.Module):
    """The trainable heads, one per teacher feature map: ``disc(maps, t, cond) -> (B, heads)`` logits."""

    def __init__(self, channels: list[int], num_classes: int | None) -> None:
        super().__init__()
        self.heads = nn.ModuleList(FeatureHead(c, num_classes) for c in channels)

    def forward(self, maps: list[torch.Tensor], t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        temb = time_features(t.to(maps[0].device), TIME_DIM)
        return torch.stack([h(f, temb, cond) for h, f in zip(self.heads, maps, strict=True)], 1)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's hinge loss: -mean(D(fake))."""
    return -fake_logits.mean()


def disc_times(schedule: object, n: int, g: torch.Generator, m: float, s: float) -> torch.Tensor:
    """LADD's logit-normal noise levels: log sigma_bar ~ N(m, s^2) (the rectified-flow time's logit),
    as native times of ``schedule``, clamped to its trained range."""
    sb = torch.exp(m + s * torch.randn(n, generator=g, dtype=torch.float64))
    lo, hi = S.sigma_range(schedule)  # type: ignore[arg-type]
    sb = sb.clamp(lo, hi)
    return torch.as_tensor(np.asarray(S.time_of_sigma_bar(schedule, sb.numpy())), dtype=torch.float64)  # type: ignore[arg-type]


class LADDLosses:
    """The two losses of one LADD step on a batch, for the build and for tests.

    ``fake(net, x0, cond, g)``: the student's x_hat_0 from x_0 noised at a student time;
    ``features(x0, t, cond, eps)``: teacher features of x0 noised to t with eps;
    ``d_loss(...)`` / ``g_loss(...)``: the hinge losses on those features."""

    def __init__(self, bundle: ModelBundle, prediction: str, grid: list[float], disc: Discriminator) -> None:
        self.teacher = bundle.denoiser
        self.gen = Denoiser(nn.Identity(), prediction, self.teacher.schedule)  # conversions only
        self.grid = torch.tensor(grid, dtype=torch.float64)
        self.features = TeacherFeatures(self.teacher.net)
        self.disc = disc

    def fake(self, net: nn.Module, x0: torch.Tensor, cond: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
        t_hat = self.grid[torch.randint(0, len(self.grid), (x0.shape[0],), generator=g)]
        a, s = self.gen.alpha_sigma(t_hat, x0)
        x = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        return self.gen.x0_eps(x, t_hat, net(x, t_hat, cond))[0]

    def noised_features(self, x0: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, eps: torch.Tensor):
        a, s = self.teacher.alpha_sigma(t, x0)
        return self.features(a * x0 + s * eps, t, cond)

    def d_loss(self, real_maps, fake_maps, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return hinge_d_loss(
            self.disc([f.detach() for f in real_maps], t, cond), self.disc([f.detach() for f in fake_maps], t, cond)
        )

    def g_loss(self, fake_maps, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return hinge_g_loss(self.disc(fake_maps, t, cond))


def new_discriminator(bundle: ModelBundle, seed: int) -> Discriminator:
    """Heads sized by the teacher's feature maps (one probe forward of one sample), seeded."""
    net = bundle.denoiser.net
    x = torch.zeros((1, *bundle.sample_shape), dtype=bundle.dtype)
    cond = torch.zeros(1, dtype=torch.long) if bundle.num_classes else None
    with torch.no_grad():
        maps = TeacherFeatures(net)(x, torch.full((1,), bundle.t_start / 2, dtype=torch.float64), cond)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Discriminator([int(f.shape[1]) for f in maps], bundle.num_classes)


@register_method
class LatentAdversarialDiffusionDistillation(MethodAdapter):
    name = "ladd"
    family = "distillation"
    training = "finetune"
    paper = (
        "Sauer et al. 2024, Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation, arXiv 2403.12015"
    )
    description = (
        "1-4 step student trained adversarially (hinge) against heads on the frozen teacher's features at "
        "re-noised teacher-generated and student samples; initialised from the teacher"
    )
    applies_to = Applies(arch=("unet", "dit"), prediction=("eps", "v", "x0", "flow"))
    steps_supported = (1, 2, 4)
    knobs = (
        Knob("teacher_solver", str, "dpmpp_2m", "registered deterministic solver that makes the synthetic data",
             trains=True),
        Knob("teacher_steps", int, 25, "steps of the teacher solver per synthetic sample", low=1, high=1000, trains=True),
        Knob("pairs", int, 2048, "synthetic teacher samples (kd's pairs artifact)", low=1, high=10_000_000, trains=True),
        Knob("student_steps", int, 4, "the student's time grid: this many uniform times from the noisiest", low=1,
             high=64, trains=True),
        Knob("disc_t_mean", float, 0.0, "m of the discriminator's logit-normal noise level (log sigma_bar mean)",
             low=-10.0, high=10.0, trains=True),
        Knob("disc_t_std", float, 1.0, "s of the discriminator's logit-normal noise level", low=0.0, high=10.0,
             trains=True),
        Knob("train_steps", int, 300, "optimiser steps (each: one head step, one student step)", low=1,
             high=10_000_000, trains=True),
        Knob("batch_size", int, 32, "synthetic samples per step", low=1, high=65536, trains=True),
        Knob("lr", float, 5e-5, "student AdamW learning rate (warm-up, then cosine decay)", low=1e-8, high=1.0,
             trains=True),
        Knob("disc_lr", float, 1e-3, "discriminator heads' Adam learning rate (constant)", low=1e-8, high=1.0,
             trains=True),
        Knob("ema", float, 0.99, "EMA decay of the student's weights (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (batches, times, noise; the heads' initialisation)", low=0,
             trains=True),
    )  # fmt: skip

    # --- artifacts -----------------------------------------------------------------------------

    def _guidance(self, bundle: ModelBundle, guidance: float | None) -> float:
        if bundle.num_classes is None:
            return 1.0
        if guidance is None:
            raise ValueError("ladd distils the teacher at one guidance scale: give the job's guidance")
        return float(guidance)

    def pairs_spec(self, bundle: ModelBundle, guidance: float) -> ArtifactSpec:
        kd = METHODS.get("kd")(**{k: self.config[k] for k in PAIR_KNOBS})
        return kd.pairs_spec(bundle, guidance)

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = self._guidance(bundle, guidance)
        c = self.config
        rows = 2 * c["train_steps"] * c["batch_size"]  # teacher feature passes: real and fake
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
        return [artifact_spec(self, bundle, "student", {"guidance": w}, (self.pairs_spec(bundle, w),), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        teacher = bundle.denoiser
        pairs = load_pairs(ctx.parent("pairs"))
        data = pairs["x0"].to(bundle.dtype)
        labels = pairs["labels"] if bundle.num_classes else None
        t0 = bundle.t_start  # the noisiest level (pure noise on a flow model), as every sampler starts
        grid = student_times(teacher, c["student_steps"], t0)[:-1]
        gen = new_student(bundle, c["seed"])
        disc = new_discriminator(bundle, c["seed"])
        disc_opt = torch.optim.Adam(disc.parameters(), lr=c["disc_lr"], betas=(0.5, 0.999))
        losses = LADDLosses(bundle, teacher.prediction, grid, disc)
        bs, steps = c["batch_size"], c["train_steps"]
        d_losses = torch.full((steps,), float("nan"), dtype=torch.float64)  # restored with checkpoints
        done = torch.zeros(1, dtype=torch.long)

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(data), (bs,), generator=g)
            x0 = data[idx]
            cond = labels[idx] if labels is not None else None
            x_hat = losses.fake(net, x0, cond, g)
            t = disc_times(teacher.schedule, bs, g, c["disc_t_mean"], c["disc_t_std"])
            eps_r = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            eps_f = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            with torch.no_grad():
                real_maps = losses.noised_features(x0, t, cond, eps_r)
            fake_maps = losses.noised_features(x_hat, t, cond, eps_f)
            # the heads' step (features detached: nothing else moves)
            disc.requires_grad_(True)
            disc_opt.zero_grad(set_to_none=True)
            ld = losses.d_loss(real_maps, fake_maps, t, cond)
            ld.backward()
            disc_opt.step()
            disc.requires_grad_(False)
            i = int(done[0])
            if i < steps:
                d_losses[i] = float(ld.detach())
            done[0] = i + 1
            # the student's step: through the frozen teacher features and the updated heads
            return losses.g_loss(fake_maps, t, cond)

        cfg = TrainConfig(steps, bs, c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(10, steps // 20))
        extra = {"disc": disc, "disc_opt": disc_opt, "d_losses": d_losses, "done": done}
        res = fit(gen, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), extra_state=extra)
        w = float(spec.params["guidance"])
        save_student(ctx.out, res.model, {"prediction": teacher.prediction, "t_start": t0, "grid": grid, "guidance": w})
        ctx.note_training(res)
        dl = d_losses[torch.isfinite(d_losses)].tolist()
        head, tail = dl[: max(1, len(dl) // 20)], dl[-max(1, len(dl) // 20) :]
        ctx.note(
            disc_first_loss=sum(head) / len(head) if head else float("nan"),
            disc_final_loss=sum(tail) / len(tail) if tail else float("nan"),
            disc_loss_curve=[round(v, 6) for v in dl[:: max(1, len(dl) // 50)]],
        )

    # --- the job --------------------------------------------------------------------------------

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next(
            (a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "student"), None
        )
        if art is None:
            raise ValueError("ladd: its student artifact was not given; prepare(bundle, steps, guidance=w) builds it")
        net, info = load_student(art, bundle, self.config["seed"])
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, info["prediction"], w)
        times = student_times(den, steps, float(info["t_start"]))
        trained = [float(t) for t in info["grid"]]
        if any(min(abs(t - u) for u in trained) > 1e-6 for t in times[:-1]):
            raise ValueError(
                f"ladd: {steps} steps need the times {times[:-1]}, not all on the trained grid {trained} "
                f"(student_steps={len(trained)}); use a step count that divides it"
            )

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators, gamma=1.0)

        return Prepared(sampler, den, info={"distilled_guidance": w, "times": times})
