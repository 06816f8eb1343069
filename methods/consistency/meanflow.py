"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, arXiv 2505.13447): a network for the average
velocity u(z_t, r, t) over [r, t], trained from data through the MeanFlow identity; one-step
z_0 = z_1 - u(z_1, 0, 1) and few-step sampling.

In bench's flow frame (z_t = (1 - t) x + t eps, t = 1 noise, native time 1000 t) the average
velocity moves z_t to z_r = z_t - (t - r) u(z_t, r, t). Differentiating (t - r) u = integral of v
over [r, t] in t gives the paper's eq. 6, u = v - (t - r) du/dt with the total derivative
du/dt = v d_z u + d_t u (eq. 8); the training target (eq. 10, Algorithm 1) is

    u_tgt = v - (t - r) (v d_z u_theta + d_t u_theta),  stop-gradient,  v = eps - x,

the directional derivative computed by ``torch.func.jvp`` with tangents (v, 0, 1) on (z, r, t)
(forward-mode; scaled-dot-product attention runs its math kernel there, the fused CPU kernels have
no forward derivative). Times (t, r): two logit-normal draws (mean -0.4, std 1.0, the paper's
ImageNet setting), t the larger; a fraction 1 - ``flow_map_fraction`` of the rows has r = t (the
paper's 75%), where the target is v itself (flow matching) and no JVP is spent. Loss: the adaptive
weighting of Sec. 4.3, w = 1 / (||Delta||^2 + c)^p with c = 1e-3 and p = ``weight_p`` (1, the
paper's), ||Delta||^2 the mean squared error of a sample, L = mean(sg(w) ||Delta||^2).

The network is the teacher architecture with a second time r added (:class:`ExtraInputs` with
``("s",)``, r in native units), run as a flow-map network (``Denoiser(second_time=True)``): the
sampler's jump from t to s is z_s = z_t - (t - s) u(z_t, s, t) exactly (the DDIM step of a flow
prediction). N-step sampling uses the uniform grid 1, (N-1)/N, ..., 0.

Two registrations, one algorithm:

- ``meanflow`` (training ``full``): the paper's setting, trained from scratch on data (the teacher
  architecture re-initialised; the mixture's MLP). Its cost is the whole training.
- ``meanflow_ft`` (training ``finetune``): the same objective and data, started from the teacher's
  weights with the r input zero-initialised, so the fresh network is u(z, r, t) = v_teacher(z, t).
  Not the paper's protocol: it is what fits a CPU budget (on digits-dit one step costs ~1.75x a
  flow-matching step, the JVP being taken on the r < t quarter of the batch only; the teacher
  itself took 3000 flow-matching steps, 25 minutes).

Departures: the recorded loss is the unweighted mean squared error of the r = t rows, whose target v
does not depend on the network. The adaptive loss is ~1 per sample whenever ||Delta||^2 >> c, so its
value says nothing, and the error to the r < t target need not fall: the target carries
(t - r) v d_z u, the noisy conditional velocity through the network's Jacobian, whose variance grows
as the network learns the flow's contraction (on the mixture it rises 3 -> 15 while the one-step map
converges). No classifier-free guidance in training (the paper's guided target, eq. 13, is not
implemented), so the network runs at guidance 1 only. Flow models only (the paper's setting;
``applies_to`` prediction=flow): the identity needs the straight interpolation's velocity v = eps - x
as the tangent, which an eps teacher's VP path does not provide without a change of frame.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.adapter import Knob, MethodAdapter, Prepared, register_method
from bench.artifacts import Artifact, ArtifactSpec, BuildContext, artifact_spec
from bench.bundle import Applies, ModelBundle
from bench.flowmap import sample_flow_map
from bench.io import WeightsError, load_weights
from bench.models.students import ExtraInputs
from bench.students import device_of, new_student, save_student, student_denoiser
from bench.training import TrainConfig, fit

T_NATIVE = 1000.0  # native time of pure noise on a flow schedule
WEIGHT_C = 1e-3  # the adaptive weighting's c (paper, Sec. 4.3)

# u(z, r, t) with r, t in [0, 1] per row
AverageVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def new_meanflow_net(bundle: ModelBundle, seed: int = 0, scratch: bool = False) -> ExtraInputs:
    """The teacher's network (an MLP for the analytic mixture) with a zero-initialised second time;
    ``scratch``: every weight re-initialised (seeded) first."""
    inner = new_student(bundle, seed)
    if scratch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in inner.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    return ExtraInputs(inner, ("s",))


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def meanflow_target(u_fn: AverageVelocity, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
    """``(u, du/dt, u_tgt)``: the network's u(z, r, t), its total derivative along the flow
    (v d_z u + d_t u, by ``torch.func.jvp`` with tangents (v, 0, 1)) and the MeanFlow target
    v - (t - r) du/dt (eq. 10), all without gradient."""
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        u, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return u, dudt, v - _bc(t - r, z) * dudt


def sample_times(
    n: int, g: torch.Generator, flow_map_fraction: float, mu: float = -0.4, sd: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) in [0, 1], float64: two logit-normal draws sorted (t >= r); a fraction
    1 - ``flow_map_fraction`` of the rows (drawn) gets r = t."""
    a = torch.sigmoid(mu + sd * torch.randn(n, generator=g, dtype=torch.float64))
    b = torch.sigmoid(mu + sd * torch.randn(n, generator=g, dtype=torch.float64))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.rand(n, generator=g, dtype=torch.float64) >= flow_map_fraction
    return torch.where(same, t, r), t


def meanflow_loss(
    net: nn.Module,
    x: torch.Tensor,
    cond: torch.Tensor | None,
    g: torch.Generator,
    flow_map_fraction: float,
    weight_p: float,
) -> torch.Tensor:
    """One batch of the MeanFlow objective (module docstring). Its gradient is the adaptively weighted
    loss's; its value, what the training record shows, is the unweighted mean squared error of the
    r = t rows (see the module docstring)."""
    n = x.shape[0]
    r, t = sample_times(n, g, flow_map_fraction)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    z = (1 - _bc(t, x)) * x + _bc(t, x) * eps
    v = eps - x
    u_tgt = v.clone()
    jump = (t > r).nonzero().flatten()
    if len(jump):
        c = cond[jump] if cond is not None else None

        def u_fn(zz: torch.Tensor, rr: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return net(zz, tt * T_NATIVE, c, s=rr * T_NATIVE)

        dt = x.dtype
        _, _, tgt = meanflow_target(u_fn, z[jump], r[jump].to(dt), t[jump].to(dt), v[jump])
        u_tgt[jump] = tgt.to(u_tgt.dtype)
    u = net(z, (t * T_NATIVE).to(x.dtype), cond, s=(r * T_NATIVE).to(x.dtype))
    delta2 = (u - u_tgt).pow(2).flatten(1).mean(1)
    weighted = (delta2 / (delta2.detach() + WEIGHT_C) ** weight_p).mean()
    fixed = t == r  # rows whose target v does not move with the network: the value recorded
    shown = delta2[fixed].mean() if fixed.any() else delta2.mean()
    return shown.detach() + weighted - weighted.detach()


def flow_times(steps: int, t_start: float = T_NATIVE) -> list[float]:
    """``steps + 1`` uniform native times from noise to data."""
    return [float(v) for v in np.linspace(t_start, 0.0, steps + 1)]


@register_method
class MeanFlow(MethodAdapter):
    name = "meanflow"
    family = "consistency"
    training = "full"
    paper = "Geng, Deng, Bai, Kolter & He 2025, Mean Flows for One-step Generative Modeling, arXiv 2505.13447"
    description = (
        "average velocity u(z,r,t) trained from data from scratch with the JVP identity target "
        "v - (t-r)(v d_z u + d_t u); one-step z0 = z1 - u(z1,0,1), few-step sampling"
    )
    applies_to = Applies(prediction=("flow",))
    from_teacher = False
    knobs = (
        Knob("train_steps", int, 800, "optimiser steps", low=1, high=10_000_000, trains=True),
        Knob("batch_size", int, 64, "samples per optimiser step", low=2, high=65536, trains=True),
        Knob("lr", float, 2e-4, "AdamW learning rate (warm-up, then cosine decay)", low=1e-7, high=1.0, trains=True),
        Knob("ema", float, 0.995, "EMA decay of the weights sampled with (0: none)", low=0.0, high=0.99999, trains=True),
        Knob("seed", int, 0, "seed of the training (batches, times, noise) and of a from-scratch initialisation", low=0,
             trains=True),
        Knob("flow_map_fraction", float, 0.25, "fraction of rows with r < t (the rest: r = t, flow matching); paper 0.25",
             low=0.0, high=1.0, trains=True),
        Knob("weight_p", float, 1.0, "power p of the adaptive loss weight 1/(||Delta||^2 + 1e-3)^p (0: plain MSE)",
             low=0.0, high=2.0, trains=True),
    )  # fmt: skip

    def artifacts(self, bundle: ModelBundle, steps: int, guidance: float | None) -> list[ArtifactSpec]:
        if guidance is not None and float(guidance) != 1.0:
            raise ValueError(f"{self.name} is trained without classifier-free guidance; it runs at guidance 1, not {guidance:g}")
        c = self.config
        budget = {"optimizer_steps": c["train_steps"], "batch_size": c["batch_size"]}
        return [artifact_spec(self, bundle, "student", {"init": "teacher" if self.from_teacher else "scratch"}, (), budget)]

    def _net(self, bundle: ModelBundle, seed: int) -> ExtraInputs:
        return new_meanflow_net(bundle, seed, scratch=not self.from_teacher)

    def build(self, spec: ArtifactSpec, ctx: BuildContext) -> None:
        c = self.config
        bundle = ctx.bundle
        draw = training_data(bundle)
        net = self._net(bundle, c["seed"]).to(device_of(bundle.denoiser.net)).train().requires_grad_(True)
        steps = c["train_steps"]
        cfg = TrainConfig(steps, c["batch_size"], c["lr"], min(100, steps // 10), c["ema"], ckpt_every=max(1, steps // 20))

        def loss(net: nn.Module, g: torch.Generator) -> torch.Tensor:
            x, y = draw(c["batch_size"], g)
            return meanflow_loss(net, x, y, g, c["flow_map_fraction"], c["weight_p"])

        res = fit(net, loss, cfg, c["seed"], ctx, lambda s, n, v: ctx.progress(s, n, v))
        save_student(ctx.out, res.model, {"prediction": "flow", "init": spec.params["init"]})
        ctx.note_training(res)

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Artifact]) -> Prepared:
        art = next((a for a in artifacts.values() if a.record.get("method") == self.name), None)
        if art is None:
            raise ValueError(f"{self.name}: its student artifact was not given; prepare(bundle, steps, guidance=1) builds it")
        fix = f"rebuild the artifact: delete {art.path} and run again"
        net = load_weights(self._net(bundle, self.config["seed"]), art.path / "student.safetensors", fix)
        try:
            json.loads((art.path / "student.json").read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"{art.path / 'student.json'} is missing or corrupt ({e}); {fix}") from e
        net = net.eval().requires_grad_(False).to(device_of(bundle.denoiser.net))
        den = student_denoiser(bundle, net, "flow", 1.0, second_time=True)
        times = flow_times(steps, bundle.t_start)

        def sampler(
            noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]
        ) -> torch.Tensor:
            return sample_flow_map(den, noise, times, cond, guidance, generators)

        return Prepared(sampler, den)


@register_method
class MeanFlowFinetune(MeanFlow):
    name = "meanflow_ft"
    training = "finetune"
    description = (
        "MeanFlow's objective on data, started from the teacher (zero-initialised r input: u(z,r,t) = v_teacher(z,t) "
        "at the start); one-step and few-step sampling"
    )
    from_teacher = True


def training_data(bundle: ModelBundle) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]:
    """``draw(n, g) -> (x, labels)``: training samples of the model's data (the digits' training
    split; the analytic mixture's exact samples), drawn with the generator ``g``."""
    mix = bundle.extra.get("mixture")
    if mix is not None:
        return lambda n, g: (mix.sample(n, g).to(bundle.dtype), None)
    if bundle.name in ("digits-unet", "digits-dit"):
        from bench.data import digits

        xs, ys = digits("train")

        def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
            idx = torch.randint(0, len(xs), (n,), generator=g)
            return xs[idx].to(bundle.dtype), ys[idx]

        return draw
    raise ValueError(f"{bundle.name}: trained from data, which bench has only for the digits models and the mixture")
