"""Reflow and InstaFlow: the couplings are the teacher's ODE endpoints of the same noise (knowledge
distillation's pairs artifact), the training pair is the straight interpolation, the 2-rectified
flow's one-step map approaches the exact ODE map of the mixture as its loss falls, InstaFlow's pairs
are the 2-rectified flow's Euler endpoints of the same noise and its student starts from it, and NFE
is the step count with one row per sample (guidance embedded)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_suite

import methods.consistency.instaflow  # noqa: F401  (registers instaflow)
from bench.artifacts import ensure_all
from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.students import PAIR_SEED, load_pairs
from bench.suite import Job, ModelSpec
from bench.worker import run_job
from methods.consistency.reflow import coupling_batch

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "flow"})
TINY = {"pairs": 256, "teacher_steps": 8, "lr": 1e-3, "batch_size": 64}
TINY_IF = {"pairs": 256, "teacher_steps": 8, "reflow_lr": 1e-3, "lr": 1e-3, "batch_size": 64, "rf_steps": 4}


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks train faster on one thread, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def job(method: str, steps: int, knobs: dict, model: ModelSpec = GMM, n: int = 256, bs: int = 256, w: float = 1.0) -> Job:
    k = tuple(sorted(METHODS.get(method).resolve_knobs(knobs).items()))
    return Job(model, method, k, steps, w, 0, n, bs)


def test_the_couplings_are_the_teachers_ode_endpoints_of_the_same_noise(home):
    """Knowledge distillation's pairs artifact (the same key as kd's with those knobs): noise of its own
    seeds and the teacher solver's endpoint of exactly that noise, the teacher rows on record."""
    b = build_model("gmm", dim=2, prediction="flow")
    rf = METHODS.get("reflow")(**TINY, train_steps=1)
    spec = rf.couplings_spec(b, 1.0)
    assert (
        spec.method == "kd"
        and spec.key == METHODS.get("kd")(**{k: TINY[k] for k in ("pairs", "teacher_steps")}).pairs_spec(b, 1.0).key
    )
    arts = ensure_all(rf, b, 1, 1.0)
    pairs_art = arts[spec.key]
    p = load_pairs(pairs_art)
    gens = generators(PAIR_SEED, range(256))
    assert torch.equal(p["noise"], noise(gens, (2,), torch.float64))
    assert torch.equal(p["x0"], METHODS.get("dpmpp_2m")().prepare(b, 8)(p["noise"], None, 1.0, gens))
    assert pairs_art.cost["teacher_rows"] == 256 * 8
    rectified = next(a for a in arts.values() if a.record["name"] == "rectified")
    assert rectified.record["parents"] == {"pairs": spec.key} and rectified.chain_cost["teacher_rows"] == 256 * 8


def test_the_training_pair_is_the_straight_interpolation_of_the_coupling():
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 250.0, 600.0, 1000.0], dtype=torch.float64)
    xt, target = coupling_batch(Denoiser(torch.nn.Identity(), "flow", FlowSchedule()), z, x0, t)
    tau = (t / 1000)[:, None]
    torch.testing.assert_close(xt, (1 - tau) * x0 + tau * z, rtol=0, atol=1e-15)
    torch.testing.assert_close(target, z - x0, rtol=0, atol=0)  # the velocity of the line, at every t
    # an eps teacher: the VP point of the pair, and the noise of the coupling as the target
    vp = Denoiser(torch.nn.Identity(), "eps", VPSchedule.linear())
    xt, target = coupling_batch(vp, z, x0, t.clamp(max=999))
    a, s = vp.alpha_sigma(t.clamp(max=999), z)
    torch.testing.assert_close(xt, a * x0 + s * z, rtol=0, atol=0)
    assert torch.equal(target, z)


def test_the_2_rectified_flow_learns_its_couplings_and_one_euler_step_approaches_the_exact_map(home):
    """On the mixture (an MLP student), 300 steps: the loss falls more than 10x (the couplings are
    deterministic, so the straight-line velocity has no variance to keep) and one Euler step of the
    2-rectified flow lands near the exact PF-ODE endpoint, where the teacher's own Euler step does not."""
    b = build_model("gmm", dim=2, prediction="flow")
    suite = tiny_suite(["exact_mse"])
    knobs = {**TINY, "train_steps": 300}
    row, _ = run_job(job("reflow", 1, knobs), b, suite)
    euler, _ = run_job(Job(GMM, "euler", (), 1, 1.0, 0, 256, 256), b, suite)
    assert row["exact_mse"] < euler["exact_mse"] / 5, (row["exact_mse"], euler["exact_mse"])
    rec = json.loads((home / "artifacts" / row["artifact_id"] / "artifact.json").read_text())
    assert rec["cost"]["final_loss"] < rec["cost"]["first_loss"] / 10
    assert row["train_teacher_nfe"] == 256 * 8 and row["nfe"] == 1
    for steps in (2, 4):
        r, _ = run_job(job("reflow", steps, knobs), b, suite)
        assert r["nfe"] == steps and r["network_calls"] == steps and r["artifact_id"] == row["artifact_id"]


def test_instaflow_distils_the_2_rectified_flows_euler_map_starting_from_it(home):
    b = build_model("gmm", dim=2, prediction="flow")
    knobs = {**TINY_IF, "reflow_steps": 200, "train_steps": 200}
    insta = METHODS.get("instaflow")(**knobs)
    arts = ensure_all(insta, b, 1, 1.0)
    by_name = {a.record["name"]: a for a in arts.values()}
    assert set(by_name) == {"pairs", "rectified", "rf_pairs", "student"}
    # its reflow stage is the reflow method's artifact with the same knobs
    rf = METHODS.get("reflow")(pairs=256, teacher_steps=8, lr=1e-3, batch_size=64, train_steps=200)
    assert by_name["rectified"].key == rf.rectified_spec(b, 1.0).key
    # the distillation pairs: the 2-rectified flow's 4-step Euler endpoints of the couplings' noise
    p, q = load_pairs(by_name["pairs"]), load_pairs(by_name["rf_pairs"])
    assert torch.equal(p["noise"], q["noise"])
    rf_prepared = rf.prepare(b, 4, {a.key: a for a in arts.values()}, 1.0)
    gens = generators(PAIR_SEED, range(256))
    torch.testing.assert_close(q["x0"], rf_prepared(q["noise"], None, 1.0, gens), rtol=0, atol=1e-12)
    assert by_name["rf_pairs"].cost["teacher_rows"] == 256 * 4  # the 2-RF's forwards are this stage's teacher rows
    rec = by_name["student"].record
    assert rec["cost"]["final_loss"] < rec["cost"]["first_loss"] / 2
    assert rec["chain_cost"]["teacher_rows"] == 256 * 8 + 256 * 4
    # the student starts from the 2-rectified flow: after one step at lr 1e-7 its one step is the 2-RF's
    frozen = METHODS.get("instaflow")(**{**knobs, "lr": 1e-7, "train_steps": 1})
    one = frozen.prepare(b, 1, None, 1.0)
    rf1 = rf.prepare(b, 1, {a.key: a for a in arts.values()}, 1.0)
    x = noise(generators(0, range(16)), (2,), torch.float64)
    torch.testing.assert_close(one(x, None, 1.0, None), rf1(x, None, 1.0, None), rtol=1e-5, atol=1e-5)
    suite = tiny_suite(["exact_mse"])
    row, _ = run_job(job("instaflow", 1, knobs), b, suite)
    assert row["nfe"] == 1 and row["network_calls"] == 1 and row["train_teacher_nfe"] == 256 * 8 + 256 * 4


def test_one_row_per_sample_at_guidance_on_the_digits_transformer(home):
    """Rectified at w = 2: the student runs once per step (guidance embedded), half the FLOPs of the
    teacher's guided step, and refuses another scale."""
    b = build_model("digits-dit")
    dit = ModelSpec("digits-dit")
    knobs = {"pairs": 8, "teacher_steps": 2, "train_steps": 1, "batch_size": 4}
    row, _ = run_job(job("reflow", 2, knobs, dit, n=8, bs=4, w=2.0), b, tiny_suite())
    teacher, _ = run_job(Job(dit, "euler", (), 2, 2.0, 0, 8, 4), b, tiny_suite())
    assert row["nfe"] == 2.0 and row["network_calls"] == teacher["network_calls"] == 4
    assert row["flops"] * 2 == teacher["flops"]
    assert row["train_teacher_nfe"] == 8 * 2 * 2  # 8 couplings x 2 steps x (cond + uncond)
    prepared = METHODS.get("reflow")(**knobs).prepare(b, 2, guidance=2.0)
    gens = generators(0, range(2))
    with pytest.raises(ValueError, match="distilled at guidance 2; it cannot run at 1"):
        prepared(noise(gens, b.sample_shape), torch.tensor([0, 1]), 1.0, gens)
    ins = {"pairs": 8, "teacher_steps": 2, "reflow_steps": 1, "rf_steps": 2, "train_steps": 1, "batch_size": 4}
    row, _ = run_job(job("instaflow", 1, ins, dit, n=8, bs=4, w=2.0), b, tiny_suite())
    assert row["nfe"] == 1.0 and row["network_calls"] == 2 and row["flops"] * 4 == teacher["flops"]
