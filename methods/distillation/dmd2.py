"""Improved Distribution Matching Distillation, DMD2 (Yin et al. 2024b, arXiv 2405.14867): a one- or
few-step generator trained by distribution matching and a GAN, without DMD's regression loss.

What changes from DMD (:mod:`methods.distillation.dmd`, whose distribution-matching gradient and
fake score it reuses):

- no regression loss, so no teacher noise -> image pairs (Sec. 4.1);
- the two time-scale update rule (Sec. 4.2): the fake score takes ``fake_updates`` optimiser steps
  (5, the paper's ImageNet ratio) per generator step, each on freshly generated samples;
- a GAN (Sec. 4.3): a small classifier head on the fake-score network's bottleneck features (a
  UNet's mid block output; a transformer's image tokens after its last block, pooled; an MLP's last
  hidden layer) tells real training data from generated samples, both noised at the same t
  (uniform in [0.02 T, 0.98 T]). The fake score and the head minimise
  softplus(D(fake)) + softplus(-D(real)) (weight ``gan_d_weight`` beside the denoising loss); the
  generator adds the non-saturating softplus(-D(G(z))) (weight ``gan_weight``) to distribution
  matching, with the fake score and head frozen while it does;
- the generator is the teacher's network in the teacher's parametrisation (``generator_output:
  teacher``), so that a fresh generator is the teacher (its one step the teacher's DDIM/Euler
  step), as the authors' code keeps an eps teacher's output and reads x0 from it (without a
  regression loss nothing else would teach an x0 head from scratch); its learning rate is in x0
  units (an eps output's scaled by alpha_T / sigma_T, :func:`methods.distillation.dmd.generator_lr`);
  ``generator_output: x0`` gives the x0 output of DMD's and KD's students instead;
- a multi-step generator (Sec. 4.4) on the student grid of ``steps`` + 1 native times from the
  teacher's start to the data (1000 -> 750 -> 500 -> 250 -> 0 for 4 steps), sampled as consistency
  models are: predict x0, re-noise to the next time (``sample_flow_map`` with gamma = 1). Training
  uses backward simulation: a step k is drawn per batch, the generator's input at t_k is made by
  running the current generator from pure noise through the first k steps of that same sampler (no
  gradient), and the generator's x0 prediction at t_k (with gradient) is what the losses see.

Departures: the classifier head is a small conv (or MLP) stack sized for the digits networks; the
GAN weights are per sample means on 256-pixel digits (see the ``gan_weight`` knob); real data are
the training digits (``bench.data.digits("train")``) or, on ``gmm``, exact draws of the mixture;
learning rates are those of a CPU-sized budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.data import IMAGE_SIZE, NUM_CLASSES
from bench.denoiser import Denoiser
from bench.flowmap import sample_flow_map, student_times
from bench.students import (
    denoising_loss,
    device_of,
    load_student,
    new_student,
    save_student,
    student_denoiser,
    uniform_times,
)
from bench.training import TrainConfig, fit
from methods.distillation.dmd import (
    FakeScore,
    budget_knobs,
    distribution_matching_loss,
    find_artifact,
    generator_lr,
    generator_prediction,
    generator_x0,
    guidance_of,
    output_knob,
    random_labels,
)

STEPS = (1, 2, 4)

# --- the GAN ---------------------------------------------------------------------------------------


class _Features(Exception):
    """Carries the bottleneck features out of a forward that need not run past them."""

    def __init__(self, h: torch.Tensor) -> None:
        super().__init__("features")
        self.h = h


def feature_site(net: nn.Module) -> tuple[nn.Module, bool]:
    """Where ``net``'s bottleneck features are read: (module, whether they are its input rather than
    its output). A UNet's mid block output; a transformer's image tokens entering its output norm
    (after the last block); an MLP's last hidden layer entering its output layer."""
    if hasattr(net, "unet") and hasattr(net.unet, "mid_block"):
        return net.unet.mid_block, False
    if hasattr(net, "transformer") and hasattr(net.transformer, "norm_out"):
        return net.transformer.norm_out, True
    if isinstance(getattr(net, "mlp", None), nn.Sequential):
        return net.mlp[-1], True
    raise ValueError(f"dmd2: no bottleneck features known for a {type(net).__name__} (a UNet, a transformer or an MLP)")


def bottleneck_features(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The fake-score network's bottleneck features at (x_t, t, cond); the forward stops there."""
    site, is_input = feature_site(net)

    def stop(module: nn.Module, args: tuple, out: Any = None) -> None:
        raise _Features(args[0] if is_input else out)

    handle = site.register_forward_pre_hook(stop) if is_input else site.register_forward_hook(stop)
    try:
        net(x_t, t, cond)
    except _Features as f:
        return f.h
    finally:
        handle.remove()
    raise RuntimeError(f"dmd2: the forward of {type(net).__name__} never reached its bottleneck")


class TokenPool(nn.Module):
    """(B, N, D) tokens -> (B, D) by their mean."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(1)


def gan_head(features: torch.Tensor) -> nn.Module:
    """The classifier head for features shaped like ``features``: one realism logit per sample."""
    if features.ndim == 4:  # (B, C, H, W): a conv, then pooled
        ch = features.shape[1]
        return nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(min(8, ch), ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(ch, 1),
        )  # fmt: skip
    dim = features.shape[-1]
    pool: list[nn.Module] = [TokenPool()] if features.ndim == 3 else []
    return nn.Sequential(*pool, nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))


def realism_logits(
    fake: FakeScore, head: nn.Module, x0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """The head's logit that clean samples ``x0``, noised to ``t`` with ``eps``, are real."""
    a, s = fake.den.alpha_sigma(t, x0)
    h = bottleneck_features(fake.net, a * x0 + s * eps, t, cond)
    return head(h.float()).reshape(-1)


def discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """The classifier's loss: -log sigmoid(D(real)) - log sigmoid(-D(fake))."""
    return (F.softplus(-logit_real) + F.softplus(logit_fake)).mean()


def generator_gan_loss(logit_fake: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating GAN loss: -log sigmoid(D(G(z)))."""
    return F.softplus(-logit_fake).mean()


class RealData:
    """Real samples for the GAN: the training digits (with their labels) or exact mixture draws."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.mixture = bundle.extra.get("mixture")
        self.dev = device_of(bundle.denoiser.net)
        self.dtype = bundle.dtype
        if self.mixture is None:
            if tuple(bundle.sample_shape) != (1, IMAGE_SIZE, IMAGE_SIZE) or bundle.num_classes != NUM_CLASSES:
                raise ValueError(
                    f"dmd2: its GAN needs real training data; bench has them for the digits models and gmm, not {bundle.name!r}"
                )
            from bench.data import digits

            self.x, self.y = digits("train")

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mixture is not None:
            return self.mixture.sample(n, g).to(self.dtype).to(self.dev), None
        idx = torch.randint(0, len(self.x), (n,), generator=g)
        return self.x[idx].to(self.dtype).to(self.dev), self.y[idx].to(self.dev)


# --- backward simulation ----------------------------------------------------------------------------


@torch.no_grad()
def backward_simulation(
    den: Denoiser,
    z: torch.Tensor,
    times: list[float],
    k: int,
    cond: torch.Tensor | None,
    guidance: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """The generator's input at step k of its sampler: pure noise ``z`` for k = 0, else the state the
    multistep sampler (predict x0, re-noise; gamma = 1) reaches at ``times[k]`` from ``z``."""
    if k == 0:
        return z
    return sample_flow_map(den, z, times[: k + 1], cond, guidance, generators, gamma=1.0)


def sample_generators(n: int, g: torch.Generator) -> list[torch.Generator]:
    """One generator per sample, seeded from ``g`` (the sampler's re-noising draws from them)."""
    return [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**62, (n,), generator=g)]


# --- the trainer ------------------------------------------------------------------------------------


class DMD2Trainer:
    """DMD2 as a loss for the shared loop: ``loss(G, g)`` takes ``fake_updates`` steps of the fake
    score and GAN head on fresh generator samples, then returns the generator's loss (distribution
    matching + gan_weight * non-saturating GAN), built with the fake score and head frozen."""

    def __init__(self, bundle: ModelBundle, knobs: Mapping[str, Any], w: float, steps: int) -> None:
        self.bundle, self.c, self.w = bundle, dict(knobs), float(w)
        self.pred = generator_prediction(bundle, self.c["generator_output"])
        self.times = student_times(bundle.denoiser, steps, bundle.t_start)
        self.real = RealData(bundle)
        self.dev = device_of(bundle.denoiser.net)
        self.fake = FakeScore(bundle, self.c["seed"], self.c["fake_lr"], self.c["train_steps"] * self.c["fake_updates"])
        with torch.no_grad():  # the head is sized by the features of two real samples
            x, c = self.real.sample(2, torch.Generator().manual_seed(0))
            h = bottleneck_features(self.fake.net, x, torch.full((2,), bundle.t_start / 2, dtype=torch.float64), c)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.c["seed"] + 2)
            self.head = gan_head(h).to(self.dev)
        self.fake.attach(self.head)
        self.history = torch.full((self.c["train_steps"], 3), float("nan"))  # dm, gan (generator), discriminator
        self.done = torch.zeros((), dtype=torch.long)

    def student(self, net: nn.Module) -> Denoiser:
        """The generator as the denoiser its sampler runs (guidance embedded)."""
        return student_denoiser(self.bundle, net, self.pred, self.w)

    def generate(self, net: nn.Module, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generated x0 of ``n`` samples with gradient through the generator's last step: a step k
        drawn for the batch, its input made by backward simulation from pure noise."""
        bundle = self.bundle
        z = torch.randn((n, *bundle.sample_shape), generator=g, dtype=bundle.dtype).to(self.dev)
        cond = random_labels(bundle, n, g)
        k = int(torch.randint(0, len(self.times) - 1, (1,), generator=g))
        gens = sample_generators(n, g)
        x = backward_simulation(self.student(net), z, self.times, k, cond, self.w, gens)
        den = Denoiser(net, self.pred, bundle.denoiser.schedule)
        return generator_x0(den, net, x, self.times[k], cond), cond

    def fake_update(self, net: nn.Module, g: torch.Generator) -> float:
        """One step of the fake score (denoising loss on generated samples) and of the GAN head with it
        (the classifier loss, real against generated); returns the classifier loss."""
        b = self.c["batch_size"]
        with torch.no_grad():
            x0, cond = self.generate(net, b, g)
        l_fake = denoising_loss(self.fake.den, self.fake.net, x0, cond, g)
        x_real, c_real = self.real.sample(b, g)
        t = uniform_times(self.fake.den, b, g).to(self.dev)  # the same t for real and generated rows
        e_real = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(self.dev)
        e_fake = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(self.dev)
        l_d = discriminator_loss(
            realism_logits(self.fake, self.head, x_real, c_real, t, e_real),
            realism_logits(self.fake, self.head, x0, cond, t, e_fake),
        )
        self.fake.step(l_fake + self.c["gan_d_weight"] * l_d)
        return float(l_d.detach())

    def generator_loss(self, net: nn.Module, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(distribution matching, non-saturating GAN) losses of a fresh batch; only the generator
        receives their gradient (the fake score and head are frozen while the graph is built)."""
        b = self.c["batch_size"]
        x0, cond = self.generate(net, b, g)
        l_dm = distribution_matching_loss(x0, cond, self.bundle.denoiser, self.fake.den, self.w, g)
        t = uniform_times(self.fake.den, b, g).to(self.dev)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(self.dev)
        self.fake.modules.requires_grad_(False)
        try:
            l_gan = generator_gan_loss(realism_logits(self.fake, self.head, x0, cond, t, eps))
        finally:
            self.fake.modules.requires_grad_(True)
        return l_dm, l_gan

    def loss(self, net: nn.Module, g: torch.Generator) -> torch.Tensor:
        d = [self.fake_update(net, g) for _ in range(self.c["fake_updates"])]  # the two time-scale rule
        l_dm, l_gan = self.generator_loss(net, g)
        i = int(self.done)
        if i < len(self.history):
            self.history[i] = torch.tensor([float(l_dm.detach()), float(l_gan.detach()), sum(d) / len(d)])
        self.done += 1
        return l_dm + self.c["gan_weight"] * l_gan

    def state(self) -> dict[str, Any]:
        return {**self.fake.state(), "history": self.history, "done": self.done}

    def summary(self) -> dict[str, float]:
        h = self.history[~self.history[:, 0].isnan()]
        k = max(1, len(h) // 20)
        out = dict(self.fake.summary())
        for j, name in enumerate(("dm", "gan_g", "gan_d")):
            if len(h):
                out |= {f"{name}_first_loss": float(h[:k, j].mean()), f"{name}_final_loss": float(h[-k:, j].mean())}
        return out


# --- the method -------------------------------------------------------------------------------------


@register_method
class DMD2(MethodAdapter):
    name = "dmd2"
    family = "distillation"
    training = "finetune"
    paper = "Yin et al. 2024b, Improved Distribution Matching Distillation for Fast Image Synthesis, arXiv 2405.14867"
    description = (
        "1/2/4-step generator from the teacher: distribution matching with a fake score updated 5x per generator step, "
        "a GAN head on the fake score's bottleneck, backward simulation; no regression loss"
    )
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"), conditioning=("class", "none"))
    steps_supported = STEPS
    knobs = (
        *budget_knobs(100, 32, 2e-4, 0.99),
        Knob("fake_updates", int, 5, "fake-score (and GAN head) updates per generator update: the two time-scale rule",
             low=1, high=100, trains=True),
        Knob("gan_weight", float, 0.1, "weight of the generator's non-saturating GAN loss beside distribution matching "
             "(about DMD2's ImageNet 3e-3 scaled from 12288 to 256 values per sample)", low=0.0, high=1e6, trains=True),
        output_knob("teacher"),
        Knob("gan_d_weight", float, 0.01, "weight of the classifier loss beside the fake score's denoising loss (the paper's 1e-2)",
             low=0.0, high=1e6, trains=True),
    )  # fmt: skip

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = guidance_of(bundle, guidance, self.name)
        c = self.config
        rows = c["train_steps"] * c["batch_size"] * (2 if w != 1.0 and bundle.num_classes else 1)  # the real score's
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
        return [artifact_spec(self, bundle, "generator", {"guidance": w, "steps": int(steps)}, (), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c, bundle = self.config, ctx.bundle
        w, steps = float(spec.params["guidance"]), int(spec.params["steps"])
        trainer = DMD2Trainer(bundle, c, w, steps)
        student = new_student(bundle, c["seed"])
        n = c["train_steps"]
        lr = generator_lr(bundle, trainer.pred, bundle.t_start, c["lr"])
        cfg = TrainConfig(n, c["batch_size"], lr, min(100, n // 10), c["ema"], ckpt_every=max(1, n // 20))
        res = fit(student, trainer.loss, cfg, c["seed"], ctx, lambda s, m, v: ctx.progress(s, m, v), trainer.state())
        info = {"prediction": trainer.pred, "t_start": bundle.t_start, "guidance": w, "times": trainer.times}
        save_student(ctx.out, res.model, info)
        ctx.note_training(res)
        ctx.note(samples_drawn=n * c["batch_size"] * (c["fake_updates"] + 1), **trainer.summary())

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        net, info = load_student(find_artifact(self.name, "generator", artifacts), bundle, self.config["seed"])
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, info["prediction"], w)
        times = [float(t) for t in info["times"]]
        if len(times) != steps + 1:
            raise ValueError(f"dmd2: this generator was trained for {len(times) - 1} steps, not {steps}")

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators, gamma=1.0)

        return Prepared(sampler, den, info={"distilled_guidance": w, "times": times})
