"""Score identity Distillation (SiD; Zhou et al. 2024, arXiv 2404.04057): a one-step generator
trained, without data, so that the teacher's score of its samples matches the score of its own
output distribution, through score identities; a fake-score network trained online estimates
the latter.

One artifact, the ``student`` (the generator), built by alternating two updates per optimiser
step (the paper's Algorithm 1):

1. **fake score**: the network f_psi (initialised from the teacher; a seeded MLP for the analytic
   ``gmm``) takes one AdamW step of the teacher's own denoising loss
   (:func:`bench.students.denoising_loss`, the teacher's parametrisation, uniform times) on
   generator samples x_g = G_theta(sigma_init z, c), detached.
2. **generator**: x_g drawn afresh, noised to x_t = alpha_t x_g + sigma_t eps at a noise level
   sigma_bar = sigma_t / alpha_t drawn as the authors' code draws EDM's sigma (rho = 7 spacing
   between sigma_min = 0.002 and sigma_max = 80, at a uniform fraction of it up to ``tmax``/1000),
   and G_theta takes a step of the loss of the paper's Eq. (23)::

       L_theta = (1 - alpha) ||f_phi(x_t) - f_psi(x_t)||^2 + (f_phi(x_t) - f_psi(x_t))^T (f_psi(x_t) - x_g)
               = (f_phi - f_psi)^T ((f_phi - x_g) - alpha (f_phi - f_psi))

   summed over dimensions and weighted per sample by 1 / mean_d |x_g - f_phi(x_t)| (the paper's
   omega(t) / sigma_t^4 choice, stop-gradient), averaged over the batch. f_phi is the frozen
   teacher's x0 prediction with classifier-free guidance at the job's scale w (one cond + uncond
   pass), f_psi the fake score's; the gradient reaches theta through x_g, both directly and
   through x_t in f_phi and f_psi (whose weights do not move in this step).

The generator G_theta is the teacher's network, copied, evaluated once at the noise level
``init_sigma`` (sigma_bar; the paper's sigma_init = 2.5) on pure noise sigma_t z, so a fresh
generator is exactly the teacher's one-step denoiser there; it keeps the teacher's
parametrisation (an eps teacher's generator would switch to x0 only if ``init_sigma`` put it where
alpha < 0.1). A conditional generator is trained at one guidance scale and runs with it embedded
(one network row per sample). Per-sample seeds, NFE and timing are the harness's.

Departures from the paper, all for a CPU budget of minutes or for the core's shapes:
- the fake score's loss is the teacher's own denoising loss (bench's), not EDM's lognormal-sigma,
  lambda-weighted x0 loss;
- the generator's optimiser is the core's AdamW (betas 0.9, 0.999; warm-up then cosine decay, EMA,
  gradient clipping at norm 1) where the paper uses Adam with betas (0, 0.999) and a constant
  learning rate of 1e-5 at batch 256 for hundreds of thousands of images; the fake score's optimiser
  is Adam-style with the paper's betas (0, 0.999), clipped at norm 1 like every network the core
  trains;
- sigma is clamped to the teacher's trained range (sigma_bar at native time 0 on a VP model);
- the real score is the teacher with CFG at the job's guidance (the paper distils EDM models
  without guidance; guidance of the real score is the paper's follow-up, SiD-LSG).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from bench import schedules as S
from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser, Schedule
from bench.flowmap import sample_flow_map
from bench.students import denoising_loss, load_student, new_student, save_student, student_denoiser, student_prediction
from bench.training import TrainConfig, fit

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM's noise range and spacing, as SiD's code samples sigma


def sid_generator_loss(x_g: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD's generator loss (Eq. 23 with its weighting): per sample, the sum over dimensions of
    (f_real - f_fake) * ((f_real - x_g) - alpha (f_real - f_fake)), divided by the stop-gradient
    mean_d |x_g - f_real|; averaged over the batch. Equal to
    (1 - alpha) ||f_real - f_fake||^2 + (f_real - f_fake) . (f_fake - x_g), so weighted."""
    dims = tuple(range(1, x_g.ndim))
    with torch.no_grad():
        weight = (x_g - real_x0).abs().mean(dims, keepdim=True).clamp_min(1e-5)
    diff = real_x0 - fake_x0
    per = (diff * ((real_x0 - x_g) - alpha * diff) / weight).sum(dims)
    return per.mean()


def sid_times(schedule: Schedule, n: int, g: torch.Generator, tmax: float) -> torch.Tensor:
    """``n`` native times whose noise levels sigma_bar are drawn as SiD's code draws EDM's sigma:
    u ~ U[0, tmax / 1000], sigma = (s_max^(1/rho) + (1 - u)(s_min^(1/rho) - s_max^(1/rho)))^rho,
    clamped to the teacher's trained range."""
    u = torch.rand(n, generator=g, dtype=torch.float64) * (tmax / 1000.0)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    sb = (hi + (1 - u) * (lo - hi)) ** RHO
    sb_lo, sb_hi = S.sigma_range(schedule)
    sb = sb.clamp(sb_lo, sb_hi)
    return torch.as_tensor(np.asarray(S.time_of_sigma_bar(schedule, sb.numpy())), dtype=torch.float64)


def init_time(bundle: ModelBundle, init_sigma: float) -> float:
    """The native time whose sigma_bar is ``init_sigma`` (the teacher's start time if it is noisier)."""
    sch = bundle.denoiser.schedule
    if init_sigma >= float(S.sigma_bar(sch, bundle.t_start)):
        return bundle.t_start
    return float(S.time_of_sigma_bar(sch, init_sigma))


def generator_prediction(bundle: ModelBundle, t_init: float) -> str:
    """The teacher's parametrisation, unless an eps generator would start where alpha < 0.1."""
    a = float(S.alpha_sigma(bundle.denoiser.schedule, t_init)[0])
    return bundle.kind if a >= 0.1 else student_prediction(bundle.kind)


def real_fake_x0(
    teacher: Denoiser, fake: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, w: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """f_phi(x_t): the teacher's x0 with CFG at ``w``; f_psi(x_t): the fake score's x0 (no guidance)."""
    real = teacher.x0_eps(x_t, t, teacher(x_t, t, cond, w))[0]
    fake_x0 = fake.x0_eps(x_t, t, fake(x_t, t, cond))[0]
    return real, fake_x0


def generate(gen_den: Denoiser, net: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor | None, t_init: float) -> torch.Tensor:
    """x_g = G(sigma_init z): the generator's x0 at ``t_init`` on pure noise sigma_t z."""
    t = torch.full((z.shape[0],), t_init, dtype=torch.float64)
    x = gen_den.alpha_sigma(t, z)[1] * z
    return gen_den.x0_eps(x, t, net(x, t, cond))[0]


@register_method
class ScoreIdentityDistillation(MethodAdapter):
    name = "sid"
    family = "distillation"
    training = "finetune"
    paper = (
        "Zhou et al. 2024, Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion "
        "Models for One-Step Generation, arXiv 2404.04057"
    )
    description = (
        "data-free one-step generator: score identity loss with alpha weighting against the CFG teacher and an "
        "online fake score; initialised from the teacher"
    )
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    steps_supported = (1,)
    knobs = (
        Knob("alpha", float, 1.2, "SiD's alpha: weight of -||f_real - f_fake||^2 in the generator loss", low=-10.0,
             high=10.0, trains=True),
        Knob("tmax", float, 800.0, "noise levels of the generator loss up to this fraction (of 1000) of EDM's rho-spacing",
             low=1.0, high=1000.0, trains=True),
        Knob("init_sigma", float, 2.5, "sigma_bar at which the one-step generator reads its noise", low=0.01,
             high=1e6, trains=True),
        Knob("train_steps", int, 300, "optimiser steps (each: one fake-score step, one generator step)", low=1,
             high=10_000_000, trains=True),
        Knob("batch_size", int, 32, "generator samples per step (each update draws its own)", low=1, high=65536,
             trains=True),
        Knob("lr", float, 1e-4, "generator AdamW learning rate (warm-up, then cosine decay)", low=1e-8, high=1.0,
             trains=True),
        Knob("fake_lr", float, 1e-4, "fake-score learning rate (constant; betas 0, 0.999)", low=1e-8, high=1.0,
             trains=True),
        Knob("ema", float, 0.99, "EMA decay of the generator's weights (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (noise, classes, times; MLP initialisations)", low=0, trains=True),
    )  # fmt: skip

    # --- artifacts -----------------------------------------------------------------------------

    def _guidance(self, bundle: ModelBundle, guidance: float | None) -> float:
        if bundle.num_classes is None:
            return 1.0
        if guidance is None:
            raise ValueError("sid distils the teacher at one guidance scale: give the job's guidance")
        return float(guidance)

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = self._guidance(bundle, guidance)
        c = self.config
        rows = c["train_steps"] * c["batch_size"] * (2 if w != 1.0 and bundle.num_classes else 1)
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
        return [artifact_spec(self, bundle, "student", {"guidance": w}, (), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        teacher = bundle.denoiser
        w = float(spec.params["guidance"])
        bs, steps = c["batch_size"], c["train_steps"]
        t_init = init_time(bundle, c["init_sigma"])
        pred = generator_prediction(bundle, t_init)
        gen = new_student(bundle, c["seed"])
        gen_den = Denoiser(gen, pred, teacher.schedule)
        fake = new_student(bundle, c["seed"] + 1)
        fake_den = Denoiser(fake, teacher.prediction, teacher.schedule)
        fake_opt = torch.optim.AdamW(fake.parameters(), lr=c["fake_lr"], betas=(0.0, 0.999), weight_decay=0.0)
        fake_losses = torch.full((steps,), float("nan"), dtype=torch.float64)  # restored with checkpoints
        done = torch.zeros(1, dtype=torch.long)
        shape, dtype = bundle.sample_shape, bundle.dtype

        def draw(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
            z = torch.randn((bs, *shape), generator=g, dtype=dtype)
            cond = torch.randint(0, bundle.num_classes, (bs,), generator=g) if bundle.num_classes else None
            return z, cond

        def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
            # 1. the fake score learns the generator's current distribution (its samples detached)
            z, cond = draw(g)
            with torch.no_grad():
                x_g = generate(gen_den, net, z, cond, t_init)
            fake.requires_grad_(True).train()
            fake_opt.zero_grad(set_to_none=True)
            lf = denoising_loss(fake_den, fake, x_g, cond, g)
            lf.backward()
            torch.nn.utils.clip_grad_norm_(list(fake.parameters()), 1.0)
            fake_opt.step()
            fake.requires_grad_(False).eval()
            i = int(done[0])
            if i < steps:
                fake_losses[i] = float(lf.detach())
            done[0] = i + 1
            # 2. the generator's score identity loss on fresh samples
            z, cond = draw(g)
            x_g = generate(gen_den, net, z, cond, t_init)
            t = sid_times(teacher.schedule, bs, g, c["tmax"])
            eps = torch.randn(x_g.shape, generator=g, dtype=x_g.dtype)
            a, s = teacher.alpha_sigma(t, x_g)
            real, fake_x0 = real_fake_x0(teacher, fake_den, a * x_g + s * eps, t, cond, w)
            return sid_generator_loss(x_g, real, fake_x0, c["alpha"])

        cfg = TrainConfig(steps, bs, c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(10, steps // 20))
        extra = {"fake": fake, "fake_opt": fake_opt, "fake_losses": fake_losses, "done": done}
        res = fit(gen, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), extra_state=extra)
        save_student(ctx.out, res.model, {"prediction": pred, "t_start": t_init, "guidance": w})
        ctx.note_training(res)
        fl = fake_losses[torch.isfinite(fake_losses)].tolist()
        head, tail = fl[: max(1, len(fl) // 20)], fl[-max(1, len(fl) // 20) :]
        ctx.note(
            samples_drawn=2 * steps * bs,
            fake_first_loss=sum(head) / len(head) if head else float("nan"),
            fake_final_loss=sum(tail) / len(tail) if tail else float("nan"),
            fake_loss_curve=[round(v, 6) for v in fl[:: max(1, len(fl) // 50)]],
        )

    # --- the job --------------------------------------------------------------------------------

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next(
            (a for a in artifacts.values() if a.record.get("method") == self.name and a.record.get("name") == "student"), None
        )
        if art is None:
            raise ValueError("sid: its student artifact was not given; prepare(bundle, 1, guidance=w) builds it")
        net, info = load_student(art, bundle, self.config["seed"])
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, info["prediction"], w)
        t_init = float(info["t_start"])

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            x = den.alpha_sigma(t_init, noise)[1] * noise  # pure noise at sigma_init: G(sigma_init z)
            return sample_flow_map(den, x, [t_init, den.t_data], cond, guidance, generators)

        return Prepared(sampler, den, info={"distilled_guidance": w})
