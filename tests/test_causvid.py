"""CausVid (Yin et al. 2025) on a random-weight moving-digits-dit: the temporal attention mask is
block-causal (entry by entry, and functionally: a later chunk never changes an earlier chunk's
output), KV-cached chunk-by-chunk generation is the full masked forward, one chunk is the teacher bit
for bit, a tiny training lowers the ODE-initialisation and fake-score losses, the harness counts the
chunk forwards, and the time to first frame is taken from outside by a hook on the counted network."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_video_teacher, tiny_suite

import methods.distillation.causvid  # noqa: F401  (registers causvid)
from bench.artifacts import ensure, ensure_all
from bench.io import save_weights
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.suite import Job, ModelSpec
from bench.training import TrainConfig, fit
from bench.worker import run_job
from methods.distillation.causvid import (
    CausVidTrainer,
    KVCache,
    block_causal_mask,
    causal_prepared,
    causal_sample,
    causal_student,
    load_trajectories,
    student_grid,
)
from methods.distillation.dmd import FakeScore

REPO = Path(__file__).resolve().parent.parent
TINY = {"teacher_steps": 4, "trajectories": 16, "ode_steps": 2, "train_steps": 2, "batch_size": 2}


def _latency_module():
    spec = importlib.util.spec_from_file_location("causvid_latency", REPO / "benchmarks" / "causvid_latency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return random_video_teacher(tmp_path_factory.mktemp("causvid"))


def _inputs(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 8, 1, 16, 16, generator=g), torch.tensor([1, 2, 10, 4, 5][:b])


PER_CHUNK = torch.tensor([1000.0] * 2 + [750.0] * 2 + [500.0] * 2 + [0.0] * 2)


# --- (a) the mask is block-causal --------------------------------------------------------------


def test_the_mask_is_block_causal_entry_by_entry():
    m = block_causal_mask(8, 2)
    assert m.dtype == torch.bool and m.shape == (8, 8)
    for i in range(8):
        for j in range(8):
            assert bool(m[i, j]) == (j // 2 <= i // 2), (i, j)  # own chunk and earlier chunks only
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(4, 2), want)
    assert torch.equal(block_causal_mask(8, 1), torch.ones(8, 8, dtype=torch.bool).tril())
    assert bool(block_causal_mask(8, 8).all())
    with pytest.raises(ValueError, match="must divide"):
        block_causal_mask(8, 3)


def test_a_later_chunk_never_changes_an_earlier_chunks_output(teacher):
    net = causal_student(teacher, 2).eval()
    x, cond = _inputs()
    t = PER_CHUNK.expand(3, 8)
    with torch.no_grad():
        base = net(x, t, cond)
        for c in range(4):  # perturb chunk c's frames and its time
            x2, t2 = x.clone(), t.clone()
            x2[:, 2 * c : 2 * c + 2] += torch.randn_like(x2[:, 2 * c : 2 * c + 2])
            t2[:, 2 * c : 2 * c + 2] = 321.0
            out = net(x2, t2, cond)
            assert torch.equal(out[:, : 2 * c], base[:, : 2 * c])  # earlier chunks: bit for bit unchanged
            assert (out[:, 2 * c :] - base[:, 2 * c :]).abs().amax(dim=(2, 3, 4)).min() > 1e-4  # it and later: changed
        # the teacher is bidirectional: the same perturbation of the last chunk moves its first frames
        x2 = x.clone()
        x2[:, 6:] += 1.0
        assert not torch.allclose(teacher.denoiser.net(x2, t[:, 0], cond)[:, :2], teacher.denoiser.net(x, t[:, 0], cond)[:, :2])


# --- (b) the KV cache --------------------------------------------------------------------------


def test_kv_cached_chunks_equal_the_full_masked_forward(teacher):
    net = causal_student(teacher, 2).eval()
    x, cond = _inputs()
    t = PER_CHUNK.expand(3, 8)
    with torch.no_grad():
        full = net(x, t, cond)
        cache, outs = KVCache(), []
        for lo in range(0, 8, 2):
            outs.append(net(x[:, lo : lo + 2], t[:, lo : lo + 2], cond, cache=cache, start=lo, store=True))
            assert cache.frames == lo + 2
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cache holds 8 frames"):
        net(x[:, :2], t[:, :2], cond, cache=cache, start=2)


def _uncached_sample(net, z, cond, steps, k, gens):
    """The reference: each step runs the full masked forward on the finished chunks (t = 0) and the
    current one, recomputing the prefix every time."""
    grid = student_grid(steps)
    done = z[:, :0]
    for lo in range(0, z.shape[1], k):
        x = z[:, lo : lo + k]
        for t, t_next in zip(grid, grid[1:], strict=False):
            tt = torch.cat([torch.zeros(z.shape[0], lo), torch.full((z.shape[0], k), t)], dim=1)
            v = net(torch.cat([done, x], 1), tt, cond)[:, lo:]
            x0 = x - t / 1000 * v
            x = (
                x0
                if t_next == 0
                else (1 - t_next / 1000) * x0
                + t_next / 1000 * torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
            )
        done = torch.cat([done, x], 1)
    return done


def test_chunk_by_chunk_generation_equals_the_uncached_reference(teacher):
    net = causal_student(teacher, 2).eval()
    _, cond = _inputs(2)
    z = noise(generators(0, range(2)), (8, 1, 16, 16))
    with torch.no_grad():
        got = causal_sample(net, z, cond, 2, 2, generators(0, range(2)))
        want = _uncached_sample(net, z, cond, 2, 2, generators(0, range(2)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --- (c) one chunk is the teacher ---------------------------------------------------------------


def test_one_chunk_is_the_teacher_bit_for_bit_at_init(teacher):
    net = causal_student(teacher, 8).eval()
    x, cond = _inputs()
    t = torch.tensor([900.0, 500.0, 100.0])
    with torch.no_grad():
        want = teacher.denoiser.net(x, t, cond)
        assert torch.equal(net(x, t, cond), want)
        assert torch.equal(net(x, t[:, None].expand(3, 8), cond), want)  # one time per frame, all equal
        assert torch.equal(net(x, t, None), teacher.denoiser.net(x, t, None))
        # its state dict is the teacher network's: the same keys and tensors
        assert {k: v for k, v in net.state_dict().items()}.keys() == teacher.denoiser.net.state_dict().keys()
        # with chunks of 2 the same inputs give another answer (the mask is in effect)
        assert not torch.allclose(causal_student(teacher, 2).eval()(x, t, cond), want, atol=1e-4)


def test_per_frame_times_modulate_each_frame_with_its_own_time(teacher):
    """Frame i at time t_i sees the same modulation as a clip at t_i throughout, when the frames
    cannot see each other (chunks of one frame, and the only frame of a one-frame clip)."""
    net = causal_student(teacher, 1).eval()
    x, cond = _inputs(2)
    t = torch.tensor([[990.0, 800.0, 640.0, 500.0, 330.0, 200.0, 90.0, 10.0]] * 2)
    with torch.no_grad():
        out = net(x, t, cond)
        cache = KVCache()
        for f in range(8):  # one frame at a time, at its own (scalar) time: the same numbers
            one = net(x[:, f : f + 1], t[:, f], cond, cache=cache, start=f, store=True)
            torch.testing.assert_close(one, out[:, f : f + 1], rtol=0, atol=1e-5)


# --- (d) training -------------------------------------------------------------------------------


def test_a_tiny_training_lowers_the_ode_and_fake_score_losses(teacher, home):
    """Stage 1 (ODE initialisation) lowers its regression; stage 2 (DMD) lowers the fake score's
    denoising loss on the generator's clips. (DMD's generator loss, 0.5 |grad|^2, is no objective that
    falls: it starts at 0, where the fake score is the teacher, and measures the score gap after.)"""
    knobs = {"trajectories": 8, "batch_size": 4, "fake_lr": 3e-3, "ode_steps": 30, "train_steps": 20}
    m = METHODS.get("causvid")(**{**TINY, **knobs})
    traj = load_trajectories(ensure(m.traj_spec(teacher, 2.0, 2), teacher))
    assert traj["states"].shape == (8, 3, 8, 1, 16, 16)  # the grid 1000, 500 and the endpoint
    trainer = CausVidTrainer(teacher, m.config, 2.0, 2, traj)
    student = causal_student(teacher, 2)
    fit(student, trainer.ode_loss, TrainConfig(30, 4, 1e-3, 3, 0.0), 0)
    ode = trainer.history[:30, 1]
    assert ode[-8:].mean() < 0.5 * ode[:8].mean()
    trainer.fake = FakeScore(teacher, 0, 3e-3, 20)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    fit(student, trainer.dmd_loss, TrainConfig(20, 4, 1e-4, 2, 0.0), 0)
    fake = trainer.fake.losses
    assert fake[-5:].mean() < 0.85 * fake[:5].mean()
    dm = trainer.history[30:, 0]
    assert torch.isfinite(dm).all() and (dm[1:] > 0).all()  # a live distribution-matching gradient throughout
    k = "transformer.transformer_blocks.0.temporal.attn1.to_q.weight"
    assert not torch.equal(student.state_dict()[k], before[k])


def test_the_build_records_its_stages_and_the_teachers_forwards(teacher, home):
    method = METHODS.get("causvid")(**TINY)
    arts = {a.record["name"]: a for a in ensure_all(method, teacher, 2, 2.0).values()}
    traj, ode, gen = (arts[n].record for n in ("trajectories", "ode_init", "generator"))
    assert traj["cost"]["teacher_rows"] == 16 * 4 * 2  # guided Euler: 2 rows per sample and step
    assert ode["cost"]["teacher_rows"] == 0 and ode["cost"]["optimizer_steps"] == 2
    assert gen["cost"]["teacher_rows"] == 2 * 2 * 2  # the guided real score of each DMD step
    assert gen["parents"] == {"trajectories": arts["trajectories"].key, "ode_init": arts["ode_init"].key}
    assert gen["chain_cost"]["teacher_rows"] == 16 * 4 * 2 + 2 * 2 * 2
    assert {"ode_first_loss", "ode_final_loss"} <= set(ode["cost"]) and "fake_final_loss" in gen["cost"]


def test_the_harness_counts_chunk_forwards_and_the_guidance_is_embedded(teacher, home):
    method = METHODS.get("causvid")(**TINY)
    arts = ensure_all(method, teacher, 4, 2.0)
    prepared = method.prepare(teacher, 4, arts, 2.0)
    from bench.accounting import ForwardCounter

    gens = generators(0, range(2))
    z = noise(gens, teacher.sample_shape)
    with ForwardCounter(prepared.denoiser.net) as c, torch.no_grad():
        x = prepared(z, torch.tensor([3, 4]), 2.0, gens)
    assert x.shape == (2, 8, 1, 16, 16) and torch.isfinite(x).all()
    assert c.calls == 4 * 4 + 3 and c.rows == 2 * 19  # 4 chunks x 4 steps + 3 cache passes, one row per sample
    assert prepared.info["full_clip_nfe"] == pytest.approx(19 * 2 / 8)
    assert prepared.denoiser.rows_per_sample(2.0, True) == 1
    with pytest.raises(ValueError, match="distilled at guidance 2"):
        prepared(z, torch.tensor([3, 4]), 1.0, generators(0, range(2)))
    with pytest.raises(Exception, match="runs at 1/2/4 steps"):
        method.prepare(teacher, 3, arts, 2.0)


def test_a_suite_job_counts_nfe_as_chunk_forwards(teacher, home, tmp_path):
    """Through run_job (the harness): nfe = chunk forwards per sample, FLOPs about the teacher's at
    the same full-clip work."""
    knobs = tuple(sorted(METHODS.get("causvid").resolve_knobs(TINY).items()))
    weights = str(tmp_path / "w.safetensors")
    save_weights(weights, teacher.denoiser.net.state_dict())
    model = ModelSpec("moving-digits-dit", {"weights": weights})
    bundle = build_model("moving-digits-dit", weights=weights)
    row, samples = run_job(Job(model, "causvid", knobs, 4, 2.0, 0, 4, 2), bundle, tiny_suite())
    assert row["status"] == "ok", row.get("error")
    assert row["nfe"] == 19.0 and row["network_calls"] == 2 * 19
    t_row, _ = run_job(Job(model, "euler", (), 4, 2.0, 0, 4, 2), bundle, tiny_suite())
    # 19 chunk forwards of 2 of 8 frames ~ 4.75 guided-free full-clip forwards; the guided teacher's 4 are 8 rows
    assert 0.9 * 4.75 / 8 < row["flops"] / t_row["flops"] < 1.1 * 4.75 / 8


# --- (e) time to first frame, from outside ------------------------------------------------------


def test_time_to_first_frame_is_taken_by_a_hook_on_the_counted_network(teacher):
    lat = _latency_module()
    net = causal_student(teacher, 2).eval()
    prepared = causal_prepared(teacher, net, 2.0, 4)
    gens = generators(0, range(2))
    z = noise(gens, teacher.sample_shape)
    cond = torch.tensor([1, 2])
    with torch.no_grad(), lat.FirstFramesTimer(prepared.denoiser.net) as timer:
        out, ttff, total = timer.run(lambda: prepared(z, cond, 2.0, generators(0, range(2))))
        # the moment timed is the moment frames 0-1 became final: that call's x0 is the output's first chunk
        assert torch.equal(timer.first_chunk_x0(), out[:, :2])
        ends = [c["end"] for c in timer.calls]
        first_done = [c for c in timer.calls if c["start"] == 0 and c["t"] > 0][-1]["end"]
        assert sum(e > first_done for e in ends) == 19 - 4  # the other three chunks (and the cache passes) came later
        assert 0 < ttff < total
        teacher_prep = METHODS.get("euler")().prepare(teacher, 4, {}, 2.0)
    with torch.no_grad(), lat.FirstFramesTimer(teacher_prep.denoiser.net) as timer:
        _, t_ttff, t_total = timer.run(lambda: teacher_prep(z, cond, 2.0, generators(0, range(2))))
        assert len(timer.calls) == 4 and all(c["frames"] == 8 for c in timer.calls)
        assert t_total - t_ttff < 0.05 * t_total + 1e-3  # bidirectional: the first frame is final with the last call


def test_the_method_refuses_other_models_and_chunk_sizes(home):
    b = build_model("digits-dit")
    with pytest.raises(Exception, match="video-dit"):
        METHODS.get("causvid")().check(b, 4)
    with pytest.raises(Exception, match="does not divide"):
        METHODS.get("causvid")(chunk_frames=3).artifacts(build_model("moving-digits-dit", weights=None), 4, 2.0)


def test_the_committed_record_describes_the_committed_weights():
    rec_path = REPO / "bench" / "assets" / "causvid-moving-digits-dit.json"
    if not rec_path.is_file():
        pytest.skip("the CausVid student is not committed in this checkout")
    rec = json.loads(rec_path.read_text())
    assert {"command", "seed", "steps", "wall_s_total", "stages", "guidance", "chunk_frames"} <= set(rec)
    assert rec["stages"]["ode_init"]["ode_final_loss"] < rec["stages"]["ode_init"]["ode_first_loss"]
    assert rec_path.with_suffix(".safetensors").is_file()
