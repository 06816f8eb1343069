"""Distribution Matching Distillation (Yin et al. 2024, arXiv 2311.18828, Algorithm 1): a one-step
generator trained so that its output distribution matches the teacher's, plus a regression to
teacher noise -> image pairs.

The pieces, as in the paper:

- the generator G: the teacher's network copied (:func:`bench.students.new_student`; an MLP for the
  analytic ``gmm``), evaluated once at the teacher sampler's start time: x = G(z). By default
  (``generator_output: x0``) it is read as x0 on an eps teacher and in the teacher's own
  parametrisation otherwise (:func:`bench.students.student_prediction`, as KD's students);
  ``generator_output: teacher`` keeps an eps teacher's parametrisation, so that a fresh generator
  is the teacher (its one step the teacher's DDIM step), as the paper initialises G. Its learning
  rate is given in x0 units: an eps output's is scaled by alpha_T / sigma_T
  (:func:`generator_lr`), since x0 = (x - sigma eps) / alpha moves 157 times faster than eps at
  t = 999 of the 1000-step linear schedule.
- the real score: the frozen teacher with classifier-free guidance at the job's scale w (Sec. 3.4:
  the real score carries the guidance; the student then runs with it embedded, one row per sample).
- the fake score: a second copy of the teacher, unguided, trained online on G's detached samples
  with the denoising loss (:func:`bench.students.denoising_loss`), one AdamW step after each
  generator step, inside the generator's loss function (its network and optimiser are checkpointed
  through ``fit(..., extra_state=...)``).
- the distribution-matching gradient (Sec. 3.2): t uniform in [0.02 T, 0.98 T],
  x_t = alpha_t x + sigma_t eps, and with the two denoisers' x0 estimates (Tweedie:
  s(x_t) = (alpha_t x0_hat - x_t) / sigma_t^2) the KL gradient with the paper's weighting
  w_t = sigma_t^2 / alpha_t * CS / ||x0_real - x||_1 is, per sample,

      w_t (s_fake - s_real) = (x0_fake - x0_real) / mean|x - x0_real|,

  applied through G by the stop-gradient form 0.5 * mean (x - sg(x - grad))^2, whose gradient with
  respect to x is grad / numel. The paper's gradient has a further factor alpha_t, which is 1 in
  its EDM (variance-exploding) setting; on the VP and flow schedules here it is left out, as the
  authors' code does for VP teachers (the x0 difference above).
- the regression loss (Sec. 3.3): lambda_reg ||G(z_ref) - y_ref|| over (noise, teacher ODE endpoint)
  pairs, lambda_reg = 0.25 as in the paper. The pairs are knowledge distillation's ``pairs``
  artifact (``kd``'s teacher_solver/teacher_steps/pairs knobs), so KD and DMD share them when those
  knobs agree; their teacher forwards are in the generator's cost chain.

Departures: the regression distance is the mean squared error, not LPIPS (its weights are not
available offline), at the paper's lambda_reg; the fake score's denoising loss is the teacher's own training loss in its
parametrisation (eps, v or flow targets) rather than an x0 error; the learning rates are those of a
CPU-sized budget (the paper's 2e-6 assumes hundreds of thousands of samples).
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
from bench.denoiser import Denoiser
from bench.flowmap import sample_flow_map
from bench.registry import METHODS
from bench.students import (
    denoising_loss,
    device_of,
    load_pairs,
    load_student,
    new_student,
    save_student,
    student_denoiser,
    student_prediction,
    uniform_times,
)
from bench.training import TrainConfig, fit

GRAD_CLIP = 1.0  # the fake score's gradient clipping (the shared loop clips the generator's at the same norm)


# --- the distribution-matching gradient ---------------------------------------------------------


def x0_of(den: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The denoiser's estimate of x0 at (x_t, t) (with classifier-free guidance at ``guidance``)."""
    return den.x0_eps(x_t, t, den(x_t, t, cond, guidance))[0]


def distribution_matching_loss(
    x: torch.Tensor,
    cond: torch.Tensor | None,
    real: Denoiser,
    fake: Denoiser,
    guidance: float,
    g: torch.Generator,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """DMD's distribution-matching loss of generated samples ``x`` (see the module docstring): its
    gradient with respect to x is (x0_fake - x0_real) / mean|x - x0_real| / x.numel(), the real
    score guided at ``guidance``, the fake score unguided. ``t`` (native times, default uniform in
    [0.02 T, 0.98 T]) and ``eps`` are drawn from ``g`` unless given."""
    with torch.no_grad():
        n = x.shape[0]
        t = uniform_times(real, n, g).to(x.device) if t is None else t
        eps = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device) if eps is None else eps
        a, s = real.alpha_sigma(t, x)
        x_t = a * x + s * eps
        x0_real = x0_of(real, x_t, t, cond, guidance)
        x0_fake = x0_of(fake, x_t, t, cond, 1.0)
        dims = tuple(range(1, x.ndim))
        weight = (x - x0_real).abs().mean(dims, keepdim=True)  # CS / ||x0_real - x||_1, per sample
        grad = torch.nan_to_num((x0_fake - x0_real) / weight)
    return 0.5 * F.mse_loss(x, (x - grad).detach())


# --- the fake score --------------------------------------------------------------------------------


class FakeScore:
    """The fake-score network of DMD and DMD2: a copy of the teacher's network (an MLP on ``gmm``)
    in the teacher's parametrisation, never guided, with its own AdamW over it and any module
    attached to it (DMD2's GAN head). ``losses`` keeps each update's loss (checkpointed)."""

    def __init__(self, bundle: ModelBundle, seed: int, lr: float, updates: int) -> None:
        self.net = new_student(bundle, seed + 1)  # seed + 1: an MLP fake score is not the MLP generator
        self.den = Denoiser(self.net, bundle.kind, bundle.denoiser.schedule)
        self.modules = nn.ModuleList([self.net])
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.losses = torch.full((updates,), float("nan"))
        self.done = torch.zeros((), dtype=torch.long)

    def attach(self, module: nn.Module) -> None:
        """Train ``module`` with the fake score (same optimiser, same steps, checkpointed with it)."""
        self.modules.append(module)
        params = [p for p in module.parameters() if p.requires_grad]
        self.params += params
        self.opt.add_param_group({"params": params})

    def step(self, loss: torch.Tensor) -> None:
        """One optimiser step of the fake score (and its extra modules) on ``loss``."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        if int(self.done) < len(self.losses):
            self.losses[int(self.done)] = float(loss.detach())
        self.done += 1

    def state(self) -> dict[str, Any]:
        """What ``fit`` checkpoints and restores beside the generator."""
        return {"fake_modules": self.modules, "fake_opt": self.opt, "fake_losses": self.losses, "fake_done": self.done}

    def summary(self) -> dict[str, float]:
        v = self.losses[~self.losses.isnan()]
        k = max(1, len(v) // 20)
        return {"fake_first_loss": float(v[:k].mean()), "fake_final_loss": float(v[-k:].mean())} if len(v) else {}


def random_labels(bundle: ModelBundle, n: int, g: torch.Generator) -> torch.Tensor | None:
    """Class labels uniform over the teacher's classes (None for an unconditional teacher)."""
    if bundle.num_classes is None:
        return None
    return torch.randint(0, bundle.num_classes, (n,), generator=g).to(device_of(bundle.denoiser.net))


def generator_x0(den: Denoiser, net: nn.Module, x: torch.Tensor, t: float, cond: torch.Tensor | None) -> torch.Tensor:
    """The generator's sample from x at native time ``t``: its network's output read as x0 in the
    student's parametrisation (with gradient)."""
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
    return den.x0_eps(x, tt, net(x, tt, cond))[0]


def generator_prediction(bundle: ModelBundle, output: str) -> str:
    """What the generator's output means: the teacher's parametrisation (``output`` "teacher": a fresh
    generator is then the teacher, its one step the teacher's DDIM/Euler step) or bench's one-step
    convention (``"x0"``: x0 on an eps teacher, see :func:`bench.students.student_prediction`). A
    teacher without weights (``gmm``) has an MLP generator that starts from nothing: x0 convention."""
    copy = any(True for _ in bundle.denoiser.net.parameters())
    return bundle.kind if output == "teacher" and copy else student_prediction(bundle.kind)


def generator_lr(bundle: ModelBundle, prediction: str, t_start: float, lr: float) -> float:
    """The generator's learning rate for ``lr`` given in x0 units at its start time. An eps output moves
    x0 = (x - sigma eps) / alpha by sigma / alpha per unit (157 at t = 999 of the 1000-step linear
    DDPM schedule), so its rate is scaled by alpha / sigma there; x0, v and flow outputs move x0 by at
    most one unit per unit and keep ``lr``."""
    if prediction != "eps":
        return lr
    a, s = bundle.denoiser.schedule.alpha_sigma(torch.tensor([float(t_start)], dtype=torch.float64))
    return lr * float(a[0] / s[0])


def output_knob(default: str) -> Knob:
    return Knob(
        "generator_output", str, default,
        "the generator's parametrisation: the teacher's (a fresh generator is the teacher) or x0 (bench's one-step "
        "convention for an eps teacher); on gmm, whose MLP generator starts from nothing, x0 either way",
        choices=("teacher", "x0"), trains=True,
    )  # fmt: skip


def guidance_of(bundle: ModelBundle, guidance: float | None, method: str) -> float:
    if bundle.num_classes is None:
        return 1.0
    if guidance is None:
        raise ValueError(f"{method} distils the teacher at one guidance scale: give the job's guidance")
    return float(guidance)


# --- the trainer ----------------------------------------------------------------------------------


class DMDTrainer:
    """Algorithm 1 as a loss for the shared loop: ``loss(G, g)`` is the generator's loss (distribution
    matching + lambda_reg * regression); after computing it, the fake score takes its step on the
    same detached samples."""

    def __init__(self, bundle: ModelBundle, knobs: Mapping[str, Any], w: float, pairs: Mapping[str, torch.Tensor]) -> None:
        self.bundle, self.c, self.w = bundle, dict(knobs), float(w)
        dev = device_of(bundle.denoiser.net)
        self.z_ref, self.y_ref = pairs["noise"].to(dev), pairs["x0"].to(dev)
        self.c_ref = pairs["labels"].to(dev) if bundle.num_classes else None
        self.t_start = float(pairs["t_start"][0])
        self.pred = generator_prediction(bundle, self.c["generator_output"])
        self.fake = FakeScore(bundle, self.c["seed"], self.c["fake_lr"], self.c["train_steps"])
        self.history = torch.full((self.c["train_steps"], 2), float("nan"))  # distribution matching, regression
        self.done = torch.zeros((), dtype=torch.long)

    def student(self, net: nn.Module) -> Denoiser:
        return Denoiser(net, self.pred, self.bundle.denoiser.schedule)

    def loss(self, net: nn.Module, g: torch.Generator) -> torch.Tensor:
        b, c, bundle = self.c["batch_size"], self.c, self.bundle
        den = self.student(net)
        z = torch.randn((b, *bundle.sample_shape), generator=g, dtype=bundle.dtype).to(self.z_ref.device)
        cond = random_labels(bundle, b, g)
        x = generator_x0(den, net, z, self.t_start, cond)
        l_dm = distribution_matching_loss(x, cond, bundle.denoiser, self.fake.den, self.w, g)
        idx = torch.randint(0, len(self.z_ref), (b,), generator=g)
        c_ref = self.c_ref[idx] if self.c_ref is not None else None
        l_reg = F.mse_loss(generator_x0(den, net, self.z_ref[idx], self.t_start, c_ref), self.y_ref[idx])
        # the fake score's update on G's samples (Algorithm 1: after the generator's loss, on sg(x))
        self.fake.step(denoising_loss(self.fake.den, self.fake.net, x.detach(), cond, g))
        i = int(self.done)
        if i < len(self.history):
            self.history[i] = torch.tensor([float(l_dm.detach()), float(l_reg.detach())])
        self.done += 1
        return l_dm + c["reg_weight"] * l_reg

    def state(self) -> dict[str, Any]:
        return {**self.fake.state(), "history": self.history, "done": self.done}

    def summary(self) -> dict[str, float]:
        h = self.history[~self.history[:, 0].isnan()]
        k = max(1, len(h) // 20)
        out = dict(self.fake.summary())
        if len(h):
            out |= {"dm_first_loss": float(h[:k, 0].mean()), "dm_final_loss": float(h[-k:, 0].mean())}
            out |= {"reg_first_loss": float(h[:k, 1].mean()), "reg_final_loss": float(h[-k:, 1].mean())}
        return out


# --- the method -----------------------------------------------------------------------------------

PAIR_KNOBS = ["teacher_solver", "teacher_steps", "pairs"]


def budget_knobs(default_steps: int, default_batch: int, default_lr: float, default_ema: float) -> tuple[Knob, ...]:
    """The training budget shared by DMD and DMD2 (each with its own defaults)."""
    return (
        Knob("train_steps", int, default_steps, "generator optimiser steps", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, default_batch, "generated samples per step", low=1, high=65536, trains=True),
        Knob("lr", float, default_lr, "generator AdamW learning rate in x0 units (warm-up, then cosine decay; an eps output's "
             "is scaled by alpha/sigma at the start time)", low=1e-8, high=1.0, trains=True),
        Knob("fake_lr", float, default_lr, "fake-score AdamW learning rate (constant)", low=1e-8, high=1.0, trains=True),
        Knob("ema", float, default_ema, "EMA decay of the generator's weights (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (noise, times, labels; MLP initialisation)", low=0, trains=True),
    )  # fmt: skip


def find_artifact(method: str, name: str, artifacts: Mapping[str, Artifact]) -> Artifact:
    art = next((a for a in artifacts.values() if a.record.get("method") == method and a.record.get("name") == name), None)
    if art is None:
        raise ValueError(f"{method}: its {name} artifact was not given; prepare(bundle, steps, guidance=w) builds it")
    return art


@register_method
class DMD(MethodAdapter):
    name = "dmd"
    family = "distillation"
    training = "finetune"
    paper = "Yin et al. 2024, One-step Diffusion with Distribution Matching Distillation, arXiv 2311.18828"
    description = (
        "one-step generator from the teacher; distribution-matching gradient (fake - real score, the real one the guided "
        "teacher, the fake one trained online) plus MSE regression to teacher noise-image pairs"
    )
    applies_to = Applies(prediction=("eps", "v", "x0", "flow"))
    steps_supported = (1,)
    knobs = (
        Knob("teacher_solver", str, "dpmpp_2m", "registered deterministic solver of the regression pairs (shared with kd)", trains=True),
        Knob("teacher_steps", int, 25, "steps of the teacher solver per pair", low=1, high=1000, trains=True),
        Knob("pairs", int, 2048, "(noise, teacher endpoint) pairs of the regression loss", low=1, high=10_000_000, trains=True),
        *budget_knobs(300, 32, 2e-4, 0.99),
        output_knob("x0"),
        Knob("reg_weight", float, 0.25, "lambda_reg: weight of the regression loss (the paper's 0.25)", low=0.0, high=1e6, trains=True),
    )  # fmt: skip

    def pairs_spec(self, bundle: ModelBundle, w: float) -> ArtifactSpec:
        c = self.config
        kd = METHODS.get("kd")(teacher_solver=c["teacher_solver"], teacher_steps=c["teacher_steps"], pairs=c["pairs"])
        return kd.pairs_spec(bundle, w)

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        w = guidance_of(bundle, guidance, self.name)
        c = self.config
        rows = c["train_steps"] * c["batch_size"] * (2 if w != 1.0 and bundle.num_classes else 1)  # the real score's
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"], "teacher_rows": rows}
        return [artifact_spec(self, bundle, "generator", {"guidance": w}, (self.pairs_spec(bundle, w),), budget)]

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c, bundle, w = self.config, ctx.bundle, float(spec.params["guidance"])
        trainer = DMDTrainer(bundle, c, w, load_pairs(ctx.parent("pairs")))
        student = new_student(bundle, c["seed"])
        steps = c["train_steps"]
        lr = generator_lr(bundle, trainer.pred, trainer.t_start, c["lr"])
        cfg = TrainConfig(steps, c["batch_size"], lr, min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))
        res = fit(student, trainer.loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v), trainer.state())
        save_student(ctx.out, res.model, {"prediction": trainer.pred, "t_start": trainer.t_start, "guidance": w})
        ctx.note_training(res)
        ctx.note(**trainer.summary())

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        net, info = load_student(find_artifact(self.name, "generator", artifacts), bundle, self.config["seed"])
        w = float(info["guidance"])
        den = student_denoiser(bundle, net, info["prediction"], w)
        times = [float(info["t_start"]), den.t_data]

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators)

        return Prepared(sampler, den, info={"distilled_guidance": w})
