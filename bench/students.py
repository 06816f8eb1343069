"""What trained methods share about students: making one from a teacher, teacher ODE pairs, and
loading a finished student as the denoiser a job runs.

- :func:`new_student`: a trainable copy of the teacher's network (the students of distillation
  start from the teacher's weights), or a small MLP for a teacher without weights (the analytic
  ``gmm``).
- :func:`student_prediction`: what the student's output means. A one-step student maps the noisiest
  level to data; an eps prediction there is ill-conditioned (x0 = (x - sigma eps) / alpha with
  alpha ~ 0.006 on a 1000-step DDPM schedule), so an eps teacher's student predicts x0 directly;
  v, x0 and flow students keep the teacher's parametrisation (well-conditioned at that level).
- :func:`teacher_pairs`: noise -> teacher ODE endpoint pairs from a registered solver, in chunks
  with checkpoints (a killed build resumes), their teacher forwards counted by the harness.
- :class:`FixedGuidanceNet`: a student distilled at one guidance scale runs once per evaluation
  (the denoiser's ``guidance_embedded``: one row per sample) and refuses any other scale.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bench.accounting import ForwardCounter
from bench.artifacts import Artifact, BuildContext
from bench.bundle import ModelBundle
from bench.denoiser import Denoiser
from bench.io import WeightsError, atomic_write, load_weights, write_json
from bench.models.students import MLPStudent
from bench.seeds import generators, noise

PAIRS_FILE = "pairs.safetensors"
PAIR_CHUNK = 128
PAIR_SEED = 2**31 - 101  # seeds of training noise: disjoint from every suite's evaluation seeds (seed, k)


def new_student(bundle: ModelBundle, seed: int = 0) -> nn.Module:
    """A trainable student for ``bundle``: a copy of its network, or an MLP (seeded) for a teacher
    without parameters."""
    net = bundle.denoiser.net
    if any(True for _ in net.parameters()):
        return copy.deepcopy(net).train().requires_grad_(True)
    if bundle.data != "vector":
        raise ValueError(f"{bundle.name}: a teacher without parameters needs a vector model for its MLP student")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLPStudent(int(bundle.sample_shape[0]))


def student_prediction(teacher: str) -> str:
    """The parametrisation of a student that jumps from the noisiest level (see the module docstring)."""
    return "x0" if teacher == "eps" else teacher


def device_of(net: nn.Module) -> torch.device:
    for t in (*net.parameters(), *net.buffers()):
        return t.device
    return torch.device("cpu")


class FixedGuidanceNet(nn.Module):
    """A student distilled at guidance ``w``: ``net(x, t, cond, guidance)`` runs the inner network once
    (guidance is in its weights); asked for another scale, it raises rather than answer for it."""

    def __init__(self, inner: nn.Module, w: float) -> None:
        super().__init__()
        self.inner = inner
        self.w = float(w)
        self.arch = getattr(
            inner, "arch", "unet" if hasattr(inner, "unet") else "dit" if hasattr(inner, "transformer") else "other"
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float | None = None, **kw: Any
    ) -> torch.Tensor:
        if guidance is not None and abs(float(guidance) - self.w) > 1e-9:
            raise ValueError(f"this student was distilled at guidance {self.w:g}; it cannot run at {float(guidance):g}")
        return self.inner(x, t, cond, **kw)


def student_denoiser(
    bundle: ModelBundle, net: nn.Module, prediction: str, guidance: float, second_time: bool = False
) -> Denoiser:
    """The denoiser a job runs for a student of ``bundle`` distilled at ``guidance``: one pass per
    evaluation (a conditional student's guidance is embedded), the teacher's schedule."""
    conditional = bundle.num_classes is not None
    wrapped = FixedGuidanceNet(net, guidance) if conditional else net
    return Denoiser(wrapped, prediction, bundle.denoiser.schedule, None, guidance_embedded=conditional, second_time=second_time)


def save_student(out: Path, net: nn.Module, info: dict[str, Any]) -> None:
    """The student's weights (``student.safetensors``) and how to run it (``student.json``)."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(out / "student.safetensors", lambda p: save_file(state, str(p)))
    write_json(out / "student.json", info)


def load_student(art: Artifact, bundle: ModelBundle, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The student of artifact ``art`` on the teacher's device, and its ``student.json``."""
    fix = f"rebuild the artifact: delete {art.path} and run again"
    net = new_student(bundle, seed)
    load_weights(net, art.path / "student.safetensors", fix)
    try:
        info = json.loads((art.path / "student.json").read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{art.path / 'student.json'} is missing or corrupt ({e}); {fix}") from e
    return net.eval().requires_grad_(False).to(device_of(bundle.denoiser.net)), info


@torch.no_grad()
def teacher_pairs(ctx: BuildContext, solver: str, steps: int, n: int, guidance: float, parents: Mapping[str, Artifact]) -> None:
    """Noise -> teacher ODE endpoint pairs: ``n`` draws (seeds ``PAIR_SEED``, classes cycling) sampled
    by the registered ``solver`` at ``steps`` steps and ``guidance`` on ``ctx.bundle``, written to
    ``ctx.out/pairs.safetensors`` (noise, x0, labels, and t_start: the time the teacher's sampler
    started from). Chunks are checkpointed; the harness counts the teacher's forwards."""
    from bench.registry import METHODS

    bundle = ctx.bundle
    prepared = METHODS.get(solver)().prepare(bundle, steps, dict(parents), guidance)
    dev = device_of(bundle.denoiser.net)
    state = ctx.resume() or {"done": 0, "noise": [], "x0": [], "t_start": torch.tensor(float("nan"))}
    done = int(state["done"])
    zs, xs = list(state["noise"]), list(state["x0"])
    t_start = state["t_start"]
    while done < n:
        hi = min(done + PAIR_CHUNK, n)
        gens = generators(PAIR_SEED, range(done, hi), dev)
        z = noise(gens, bundle.sample_shape, bundle.dtype, dev)
        cond = (torch.arange(done, hi) % bundle.num_classes).to(dev) if bundle.num_classes else None
        with ForwardCounter(prepared.denoiser.net, keep_first=True) as first:
            first.arm()
            x0 = prepared(z, cond, guidance, gens)
        t_start = first.first_inputs[0][1].flatten()[0].double().cpu()
        zs.append(z.cpu())
        xs.append(x0.cpu())
        done = hi
        ctx.checkpoint({"done": done, "noise": zs, "x0": xs, "t_start": t_start}, done)
        ctx.progress(done, n, what="pairs")
    labels = torch.arange(n) % bundle.num_classes if bundle.num_classes else torch.full((n,), -1)
    pairs = {"noise": torch.cat(zs), "x0": torch.cat(xs), "labels": labels, "t_start": t_start.reshape(1)}
    if not torch.isfinite(pairs["x0"]).all():
        raise ValueError(f"the teacher's {solver} endpoints contain NaN/inf; raise teacher_steps or lower the guidance")
    save_file({k: v.contiguous() for k, v in pairs.items()}, str(ctx.out / PAIRS_FILE))
    ctx.note(samples_drawn=n)


def load_pairs(art: Artifact) -> dict[str, torch.Tensor]:
    return load_file(str(art.path / PAIRS_FILE))


def uniform_times(den: Denoiser, n: int, g: torch.Generator, lo: float = 0.02, hi: float = 0.98) -> torch.Tensor:
    """``n`` native times uniform over the fraction [lo, hi] of the schedule's range (DMD's
    [0.02 T, 0.98 T]), float64, from the generator ``g``."""
    T = float(den.schedule.num_train_timesteps)
    u = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    t0 = den.t_data
    return t0 + u * (T - (1.0 if t0 < 0 else 0.0) - t0)


def prediction_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What a network of parametrisation ``prediction`` should output at x_t = a x0 + s eps."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":  # Salimans & Ho 2022
        return a * eps - s * x0
    return eps - x0  # flow velocity


def denoising_loss(
    den: Denoiser,
    net: nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    g: torch.Generator,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusion (denoising score matching) loss of ``net`` in ``den``'s parametrisation and
    schedule on clean samples ``x0``: x_t = alpha_t x0 + sigma_t eps at times ``t`` (default uniform,
    :func:`uniform_times`), mean squared error to the parametrisation's target. A fake-score network
    (DMD, DMD2, SiD) is trained with it on the generator's samples."""
    t = uniform_times(den, x0.shape[0], g) if t is None else t
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    a, s = den.alpha_sigma(t, x0)
    pred = net(a * x0 + s * eps, t, cond)
    return F.mse_loss(pred, prediction_target(den.prediction, x0, eps, a, s).to(pred.dtype))
