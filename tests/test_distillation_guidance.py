"""Guidance distillation (Meng et al. 2023): the stage-1 target is the classifier-free-guided
combination at the row's w, a fresh w-student is the unguided teacher, both trainers' losses fall,
one artifact chain serves every w in the range (and refuses the others), and a job runs one row
per sample per step."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_suite
from torch import nn

import methods.distillation.guidance as gd  # noqa: F401  (registers the method)
import methods.distillation.progressive as pd
from bench.accounting import ForwardCounter
from bench.artifacts import ensure_all
from bench.bundle import ModelBundle
from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.models import build_model
from bench.models.students import time_features
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.suite import Job, ModelSpec
from bench.worker import run_job


@pytest.fixture(scope="module")
def dit():
    return build_model("digits-dit")


def _batch(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, 16, 16, generator=g)
    t = torch.tensor([900.0, 600.0, 300.0, 50.0][:n], dtype=torch.float64)
    return z, t, torch.tensor([3, 1, 4, 1][:n])


@pytest.mark.parametrize("model", ["digits-unet", "digits-dit"])
def test_the_stage1_target_is_the_cfg_combination_at_each_rows_w(model):
    b = build_model(model)
    den = b.denoiser
    z, t, c = _batch()
    w = torch.tensor([1.0, 1.5, 2.0, 4.0], dtype=torch.float64)
    with ForwardCounter(den.net) as count:
        got = gd.cfg_prediction(den, z, t, c, w)
    assert count.calls == 1 and count.rows == 8  # one forward of the doubled batch
    cond, uncond = den.net(z, t, c), den.net(z, t, torch.full_like(c, den.null_class))
    want = uncond + w.float().view(-1, 1, 1, 1) * (cond - uncond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:2], den(z[1:2], t[1:2], c[1:2], 1.5), rtol=1e-5, atol=1e-5)  # bench's guidance
    assert not torch.allclose(got[3], cond[3], atol=1e-4)  # w = 4 is not the conditional output


@pytest.mark.parametrize("model", ["digits-unet", "digits-dit"])
def test_a_fresh_w_student_is_the_unguided_teacher_at_every_w(model):
    b = build_model(model)
    student = gd.w_student(b).eval().requires_grad_(False)  # as a job runs it (autograd picks other kernels)
    z, t, c = _batch()
    teacher = b.denoiser(z, t, c, 1.0)
    for w in (1.0, 2.5, torch.tensor([1.0, 2.0, 3.0, 4.0])):
        assert torch.equal(student(z, t, c, guidance=w), teacher)


class ToyCondNet(nn.Module):
    """A small class-conditional network on 2-D vectors (null class 4) with a timestep embedding
    (``time_embed``, where the w input is added): a guided teacher that trains in milliseconds."""

    arch = "mlp"

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(2, width)
        self.time_embed = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(5, width)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, cond=None):
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        cond = torch.full((x.shape[0],), 4) if cond is None else cond
        return self.out(self.inp(x.float()) + self.time_embed(time_features(t)) + self.label(cond)).to(x.dtype)


MODES = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]])


def toy_data(n: int, g: torch.Generator):
    """Class k: a Gaussian around mode k."""
    y = torch.randint(0, 4, (n,), generator=g)
    return MODES[y] + 0.3 * torch.randn(n, 2, generator=g), y


def toy_bundle(prediction: str = "flow") -> ModelBundle:
    torch.manual_seed(0)
    sch = FlowSchedule() if prediction == "flow" else VPSchedule.linear()
    net = ToyCondNet().eval().requires_grad_(False)
    return ModelBundle(
        f"toy-{prediction}", Denoiser(net, prediction, sch, 4), (2,), "vector", 4, weights_hash="toy",
        extra={"training_data": toy_data},
    )  # fmt: skip


def test_the_stage1_loss_is_zero_at_w_1_for_a_fresh_student_and_not_above():
    """At w = 1 the guided target is the conditional output, which the fresh student gives: the loss
    compares student and target at the same noisy input, time and w."""
    b = toy_bundle()
    data = pd.training_data(b)
    student = gd.w_student(b).eval().requires_grad_(False)
    at_1 = gd.guidance_loss(b.denoiser, b.t_start, data, (1.0, 1.0), 64)(student, torch.Generator().manual_seed(0))
    at_3 = gd.guidance_loss(b.denoiser, b.t_start, data, (3.0, 3.0), 64)(student, torch.Generator().manual_seed(0))
    assert float(at_1) < 1e-12 and float(at_3) > 1e-4  # 0 up to the rounding of a doubled batch


def on_fixed_batch(loss, net) -> float:
    with torch.no_grad():
        return float(loss(net, torch.Generator().manual_seed(5)))


TINY = {"start_steps": 2, "guide_steps": 100, "train_steps": 100, "batch_size": 64, "lr": 3e-3, "guide_lr": 3e-3, "ema": 0.0}


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_both_trainers_losses_fall_and_the_chain_serves_every_w_in_its_range(home, prediction):
    b = toy_bundle(prediction)
    method = METHODS.get("guidance_distillation")(**TINY)
    arts = ensure_all(method, b, 1, 2.0)
    by_name = {a.record["name"]: a for a in arts.values()}
    assert sorted(by_name) == ["student-1", "w-student"]
    w_art, s_art = by_name["w-student"], by_name["student-1"]
    assert s_art.record["parents"] == {"w-student": w_art.key}
    # stage 1 (100 steps of 64): the guided loss on a fixed batch falls
    den, data = b.denoiser, pd.training_data(b)
    g1 = gd.guidance_loss(den, b.t_start, data, (1.0, 4.0), 512)
    w_student, _ = gd.load_w_student(w_art, b)
    before, after = (on_fixed_batch(g1, n) for n in (gd.w_student(b), w_student))
    assert after < before / 5, (before, after)
    # stage 2: progressive distillation of the w-student (w an input of teacher and student) falls too
    g2 = pd.pd_stage_loss(
        den, 1, b.t_start, data, lambda z, t, c, w: w_student(z, t, c, guidance=w),
        lambda n, z, t, c, w: n(z, t, c, guidance=w), 512, (1.0, 4.0),
    )  # fmt: skip
    student, _ = gd.load_w_student(s_art, b)
    before, after = (on_fixed_batch(g2, n) for n in (w_student, student))
    assert after < before / 5, (before, after)
    # teacher rows: stage 1 guided (2 rows per example), stage 2 the w-student twice per example
    assert w_art.cost["teacher_rows"] == 100 * 64 * 2 and s_art.cost["teacher_rows"] == 100 * 64 * 2
    assert s_art.chain_cost["optimizer_steps"] == 200
    # the artifacts do not depend on the job's guidance; outside the range is an error naming it
    keys = {s.key for w in (1.0, 2.0, 4.0, None) for s in method.artifacts(b, 1, w)}
    assert keys == {s_art.key}
    with pytest.raises(ValueError, match=r"guidance in \[1, 4\]; it cannot run at 5"):
        method.artifacts(b, 1, 5.0)
    # at start_steps a job runs the stage-1 student itself
    assert [s.name for s in method.artifacts(b, 2, 2.0)] == ["w-student"]


def test_a_job_runs_one_row_per_sample_per_step_at_any_w_in_range(home, dit):
    """NFE = steps; one row per sample: the teacher's guided FLOPs halved, plus the w embedding's."""
    spec = ModelSpec("digits-dit")
    knobs = {"start_steps": 4, "guide_steps": 1, "train_steps": 1, "batch_size": 2}
    k = tuple(sorted(METHODS.get("guidance_distillation").resolve_knobs(knobs).items()))
    row3, _ = run_job(Job(spec, "guidance_distillation", k, 2, 3.0, 0, 2, 2), dit, tiny_suite())
    row2, _ = run_job(Job(spec, "guidance_distillation", k, 2, 2.0, 0, 2, 2), dit, tiny_suite())
    teacher, _ = run_job(Job(spec, "euler", (), 2, 3.0, 0, 2, 2), dit, tiny_suite())
    assert row3["nfe"] == row2["nfe"] == teacher["nfe"] == 2.0
    assert row3["network_calls"] == teacher["network_calls"] == 2  # 2 steps x 1 batch
    emb = gd.w_student(dit).embeds["w"]
    per_row = 2 * sum(m.in_features * m.out_features for m in emb if isinstance(m, nn.Linear))
    assert row3["flops"] == teacher["flops"] / 2 + 2 * per_row  # 2 steps of one row, each with the w embedding
    assert row3["artifact_id"] == row2["artifact_id"]  # one chain for both scales
    prepared = METHODS.get("guidance_distillation")(**knobs).prepare(dit, 2, guidance=3.0)
    assert prepared.denoiser.guidance_embedded and prepared.denoiser.rows_per_sample(3.0, True) == 1
    gens = generators(0, range(2))
    x = noise(gens, dit.sample_shape)
    with pytest.raises(ValueError, match=r"guidance in \[1, 4\]; it cannot run at 0.5"):
        prepared(x, torch.tensor([0, 1]), 0.5, gens)
    # the scale reaches the student: its samples at w = 2 and w = 3 differ once its w embedding has trained
    out2, out3 = (prepared(x, torch.tensor([0, 1]), w, generators(0, range(2))) for w in (2.0, 3.0))
    assert not torch.equal(out2, out3)
