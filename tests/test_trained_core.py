"""The core hosts trained methods honestly: the harness counts on the denoiser a method really runs,
artifacts are built once (and a killed build resumes), job keys see every imported source file, and
knowledge distillation trains a real student."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_suite

from bench.artifacts import ArtifactStore, ensure, ensure_all
from bench.cli import main
from bench.codeversion import code_version, cycles, import_graph
from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.flowmap import sample_flow_map
from bench.models import build_model
from bench.paths import REPO
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.suite import Job, ModelSpec, expand, load_suite
from bench.worker import run_job
from methods.distillation.kd import kd_loss

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "eps"})
TINY_KD = {"pairs": 256, "teacher_steps": 8, "train_steps": 2, "batch_size": 32, "lr": 1e-3}


def kd_job(model: ModelSpec = GMM, guidance: float = 1.0, n: int = 64, bs: int = 32, **knobs) -> Job:
    k = tuple(sorted(METHODS.get("kd").resolve_knobs({**TINY_KD, **knobs}).items()))
    return Job(model, "kd", k, 1, guidance, 0, n, bs)


# --- the harness counts on the prepared denoiser ---------------------------------------------------


def test_a_one_step_student_counts_its_own_nfe_and_flops(home):
    """NFE 1 (not 0 as when counted on the teacher, nor the teacher's 8); FLOPs are the student MLP's."""
    b = build_model("gmm", dim=2, prediction="eps")
    row, samples = run_job(kd_job(), b, tiny_suite(["exact_mse"]))
    assert row["nfe"] == 1.0 and row["network_calls"] == 2  # one student forward per batch of 32
    # MLPStudent(2): x in (2 -> 128), time embedding (16 -> 128 -> 128), two hidden (128 -> 128), out (128 -> 2):
    # 2 FLOPs per multiply-add
    assert row["flops"] == 2 * (2 * 128 + 16 * 128 + 128 * 128 + 2 * 128 * 128 + 128 * 2)
    teacher, _ = run_job(Job(GMM, "ddim", (), 8, 1.0, 0, 64, 32), b, tiny_suite())
    assert teacher["nfe"] == 8 and teacher["flops"] == 0  # the analytic teacher does no matmul
    assert row["train_teacher_nfe"] == 256 * 8 and row["train_steps"] == 2 and row["train_cost_s"] > 0
    assert row["artifact_id"] and len(row["artifact_id"].split(",")) == 1 and row["train_device"] == "cpu"


def test_a_guidance_embedded_student_counts_one_row_per_sample(home):
    """At guidance 3 the teacher spends 2 rows (cond + uncond) per evaluation; a student distilled at
    w = 3 runs once: NFE 1, half the FLOPs of one guided teacher evaluation, and it refuses other w."""
    b = build_model("digits-dit")
    dit = ModelSpec("digits-dit")
    knobs = {"pairs": 8, "teacher_steps": 2, "train_steps": 1, "batch_size": 4}
    row, _ = run_job(kd_job(dit, 3.0, n=8, bs=4, **knobs), b, tiny_suite())
    teacher, _ = run_job(Job(dit, "euler", (), 1, 3.0, 0, 8, 4), b, tiny_suite())
    assert row["nfe"] == 1.0 and teacher["nfe"] == 1.0
    assert row["network_calls"] == teacher["network_calls"] == 2
    assert row["flops"] * 2 == teacher["flops"]  # one row per sample against two
    prepared = METHODS.get("kd")(**{**TINY_KD, **knobs}).prepare(b, 1, guidance=3.0)
    assert prepared.denoiser.guidance_embedded and prepared.denoiser.rows_per_sample(3.0, True) == 1
    gens = generators(0, range(2))
    with pytest.raises(ValueError, match="distilled at guidance 3; it cannot run at 2"):
        prepared(noise(gens, b.sample_shape), torch.tensor([0, 1]), 2.0, gens)


# --- knowledge distillation ------------------------------------------------------------------------


def test_kd_loss_is_the_mean_squared_error_to_the_teacher_endpoint():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    assert float(kd_loss(s, t)) == pytest.approx((1 + 0 + 4 + 4) / 4)


def test_kd_pairs_are_the_teachers_ode_endpoints_of_their_noise(home):
    """The pairs artifact holds noise and the teacher solver's endpoint of exactly that noise."""
    b = build_model("gmm", dim=2, prediction="eps")
    kd = METHODS.get("kd")(**TINY_KD)
    arts = ensure_all(kd, b, 1, 1.0)
    pairs_art = next(a for a in arts.values() if a.record["name"] == "pairs")
    from bench.students import PAIR_SEED, load_pairs

    p = load_pairs(pairs_art)
    gens = generators(PAIR_SEED, range(256))
    assert torch.equal(p["noise"], noise(gens, (2,), torch.float64))  # its own seeds, none of a suite's
    want = METHODS.get("dpmpp_2m")().prepare(b, 8)(p["noise"], None, 1.0, gens)
    assert torch.equal(p["x0"], want)
    assert pairs_art.cost["teacher_rows"] == 256 * 8 and pairs_art.cost["samples_drawn"] == 256


def test_kd_student_on_gmm_approaches_the_exact_ode_map(home):
    """exact_mse to the exact PF-ODE endpoint of the same noise falls more than 10x with training."""
    b = build_model("gmm", dim=2, prediction="eps")
    suite = tiny_suite(["exact_mse"])
    early, _ = run_job(kd_job(train_steps=2, n=128, bs=128), b, suite)
    late, _ = run_job(kd_job(train_steps=400, n=128, bs=128), b, suite)
    assert early["exact_mse"] > 10 * late["exact_mse"], (early["exact_mse"], late["exact_mse"])
    rec = json.loads((home / "artifacts" / late["artifact_id"] / "artifact.json").read_text())
    assert rec["cost"]["final_loss"] < rec["cost"]["first_loss"] / 10  # the training loss fell
    assert rec["chain_cost"]["teacher_rows"] == 256 * 8  # the pairs' teacher forwards, in the student's chain


def test_kd_runs_one_step_only_and_says_so():
    suite_text = """
models: [{name: gmm, options: {dim: 2}}]
methods: [kd, ddim]
steps: [1, 4]
guidance: [1.0]
metrics: [exact_mse]
"""
    from bench.suite import SuiteError  # noqa: F401

    jobs, skipped = expand(_suite(suite_text))
    assert sorted((j.method, j.steps) for j in jobs) == [("ddim", 1), ("ddim", 4), ("kd", 1)]
    assert any("kd" in s and "[4]" in s and "runs at 1 steps" in s for s in skipped)


def _suite(text: str, tmp: Path | None = None):
    import tempfile

    d = Path(tmp or tempfile.mkdtemp())
    (d / "s.yaml").write_text(text)
    return load_suite(d / "s.yaml")


# --- builds: planned, once, resumable, their failures contained ------------------------------------

GMM_KD_SUITE = """
name: kdsuite
n_samples: 32
batch_size: 32
bootstrap: 5
models: [{name: gmm, options: {dim: 2}}]
methods:
  - {name: ddim, steps: [2]}
  - {name: kd, steps: [1], knobs: {pairs: [128], teacher_steps: [6], train_steps: [30], batch_size: [32]}}
steps: [2]
guidance: [1.0]
metrics: [exact_mse]
timing: {warmup: 0}
"""


def test_plan_lists_artifacts_a_cold_run_builds_them_with_progress_and_a_second_run_reuses_them(home, tmp_path, capsys):
    path = tmp_path / "kdsuite.yaml"
    path.write_text(GMM_KD_SUITE)
    assert main(["plan", str(path), "--results", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "artifacts (2; 2 to build" in out and "kd:pairs on gmm" in out and "kd:student on gmm" in out
    assert "to build, estimated" in out and "estimated build time" in out
    assert main(["run", str(path), "--results", str(tmp_path / "res"), "--run-id", "cold"]) == 0
    err = capsys.readouterr().err
    assert "build kd:student" in err and "train loss" in err  # the build's progress: step, loss
    cold = tmp_path / "res" / "kdsuite" / "cold"
    rec = json.loads((cold / "run.json").read_text())
    assert sorted(v["status"] for v in rec["artifacts"].values()) == ["built", "built"]
    assert rec["sessions"][-1]["built"] and len(rec["sessions"][-1]["built"]) == 2
    builds = [json.loads(x) for x in (cold / "executions.jsonl").read_text().splitlines() if '"build"' in x]
    jobs = [json.loads(x) for x in (cold / "executions.jsonl").read_text().splitlines() if '"job"' in x]
    assert len(builds) == 2 and len(jobs) == 2
    df = pd.read_parquet(cold / "results.parquet").set_index("method")
    assert df.loc["kd", "train_cost_s"] > 0 and df.loc["ddim", "train_cost_s"] == 0
    # a second run (fresh: jobs recomputed) finds the artifact: the cost is on record, not spent again
    assert main(["run", str(path), "--results", str(tmp_path / "res"), "--run-id", "warm", "--fresh"]) == 0
    err = capsys.readouterr().err
    assert "build kd" not in err
    warm = tmp_path / "res" / "kdsuite" / "warm"
    rec = json.loads((warm / "run.json").read_text())
    assert sorted(v["status"] for v in rec["artifacts"].values()) == ["found", "found"] and not rec["sessions"][-1]["built"]
    df2 = pd.read_parquet(warm / "results.parquet").set_index("method")
    for c in ("train_cost_s", "train_steps", "train_teacher_nfe", "artifact_id"):
        assert df2.loc["kd", c] == df.loc["kd", c], c
    assert main(["plan", str(path), "--results", str(tmp_path / "res")]) == 0
    assert "0 to build" in capsys.readouterr().out


def test_a_failed_build_fails_only_the_jobs_that_need_it(home, tmp_path):
    """KD told to make its pairs with DDIM on a flow model: the build fails (DDIM needs a VP model),
    the KD job fails with the build's error, the other job of the sweep is fine."""
    text = GMM_KD_SUITE.replace("options: {dim: 2}", "options: {dim: 2, prediction: flow}")
    text = text.replace("{name: ddim, steps: [2]}", "{name: euler, steps: [2]}").replace(
        "teacher_steps: [6]", "teacher_solver: [ddim]"
    )
    run = _run(text, tmp_path)
    df = pd.read_parquet(run / "results.parquet").set_index("method")
    assert df.loc["euler", "status"] == "ok"
    assert df.loc["kd", "status"] == "failed" and "failed to build" in df.loc["kd", "error"] and "ddim" in df.loc["kd", "error"]
    rec = json.loads((run / "run.json").read_text())
    assert sorted(v["status"] for v in rec["artifacts"].values()) == ["failed", "failed"]  # the student: its parent failed


def _run(text: str, tmp_path: Path) -> Path:
    from bench.runner import run_suite

    (tmp_path / "s.yaml").write_text(text)
    return run_suite(load_suite(tmp_path / "s.yaml"), "r", tmp_path / "res", progress=False)


KILL_SCRIPT = """
import sys
from bench.artifacts import ensure_all
from bench.models import build_model
from bench.registry import METHODS
knobs = dict(pairs=16, teacher_steps=2, train_steps=60, batch_size=8)
ensure_all(METHODS.get("kd")(**knobs), build_model("digits-dit"), 1, 1.0)
"""


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes_from_its_checkpoint(home, tmp_path):
    """The optimiser steps before the kill (as of the last checkpoint) and after it add up to the
    budget, and the resumed student equals one trained without interruption."""
    knobs = {"pairs": 16, "teacher_steps": 2, "train_steps": 60, "batch_size": 8}
    b = build_model("digits-dit")
    kd = METHODS.get("kd")(**knobs)
    (spec,) = kd.artifacts(b, 1, 1.0)
    store = ArtifactStore(home / "artifacts")
    env = {**os.environ, "BENCH_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT], env=env, stderr=subprocess.DEVNULL)
    ckpt = store.work_dir(spec.key) / "ckpt.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and json.loads(torch.load(ckpt, weights_only=True)["ledger"])["step"] >= 9:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert store.get(spec.key) is None  # not finished: nothing visible
    art = ensure(spec, b, store)
    s1, s2 = art.cost["sessions"]
    assert 0 < s1["reached_step"] < 60 and s2["resumed_from_step"] == s1["reached_step"] and s2["reached_step"] == 60
    assert s1["reached_step"] + (s2["reached_step"] - s2["resumed_from_step"]) == 60 == art.cost["optimizer_steps"]
    assert s1["pid"] != s2["pid"]
    other = ArtifactStore(tmp_path / "uninterrupted")
    again = ensure(spec, b, other)
    assert len(again.cost["sessions"]) == 1
    from safetensors.torch import load_file

    a, c = load_file(str(art.path / "student.safetensors")), load_file(str(again.path / "student.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=1e-6)


# --- job keys see all the code ---------------------------------------------------------------------


def _copy_tree(dst: Path) -> Path:
    for d in ("bench", "methods"):
        shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    return dst


def test_code_versions_cover_every_imported_project_file(tmp_path):
    root = _copy_tree(tmp_path / "copy")
    solvers = [e.name for e in METHODS if e.meta["family"] == "solver"]
    mods = {n: METHODS.get(n).__module__ for n in solvers}
    before = {n: code_version(m, root=root) for n, m in mods.items()}
    assert before["dpmpp_2m"] == code_version(mods["dpmpp_2m"])  # the copy is the same code
    with open(root / "methods" / "solvers" / "core.py", "a") as f:
        f.write("\n# an edit\n")
    after_core = {n: code_version(m, root=root) for n, m in mods.items()}
    assert after_core["dpmpp_2m"] != before["dpmpp_2m"]  # dpmpp_2m.py is untouched; it imports core.py
    with open(root / "bench" / "schedules.py", "a") as f:
        f.write("\n# an edit\n")
    after_sched = {n: code_version(m, root=root) for n, m in mods.items()}
    assert all(after_sched[n] != after_core[n] for n in solvers)  # every solver's version changes
    # a file no solver imports changes none of them
    with open(root / "methods" / "caching" / "fora.py", "a") as f:
        f.write("\n# an edit\n")
    assert {n: code_version(m, root=root) for n, m in mods.items()} == after_sched


JOB_ID = "from bench.suite import Job, ModelSpec; print(Job(ModelSpec('gmm'), 'dpmpp_2m', (), 10, 1.0, 0, 8, 8).job_id('w'))"


@pytest.mark.slow
def test_editing_solvers_core_or_schedules_changes_the_job_id(tmp_path):
    """End to end, in a copy of the tree: the job id of dpmpp_2m changes with solvers/core.py, which
    its own file does not contain, and with bench/schedules.py."""
    root = _copy_tree(tmp_path / "copy")
    (root / "suites").mkdir()

    def job_id() -> str:
        env = {**os.environ, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", JOB_ID], env=env, cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    ids = [job_id()]
    with open(root / "methods" / "solvers" / "core.py", "a") as f:
        f.write("\n# an edit\n")
    ids.append(job_id())
    with open(root / "bench" / "schedules.py", "a") as f:
        f.write("\n# an edit\n")
    ids.append(job_id())
    assert len(set(ids)) == 3, ids


def test_the_project_has_no_import_cycles():
    assert cycles(import_graph()) == []


# --- capabilities, flow maps ----------------------------------------------------------------------


def test_methods_apply_by_capability_not_by_prediction_kind():
    text = """
models: [digits-unet, digits-dit, {name: gmm, options: {dim: 2}}]
methods: [fora, deepcache, kd, ddim]
steps: [1]
guidance: [1.0]
metrics: [nfe_only_placeholder]
"""
    jobs, skipped = expand(_suite(text.replace("metrics: [nfe_only_placeholder]", "metrics: []")))
    pairs = sorted({(j.model.name, j.method) for j in jobs})
    assert pairs == [
        ("digits-dit", "fora"), ("digits-dit", "kd"), ("digits-unet", "ddim"), ("digits-unet", "deepcache"),
        ("digits-unet", "kd"), ("gmm", "ddim"), ("gmm", "kd"),
    ]  # fmt: skip
    assert any("fora x digits-unet" in s and "arch=unet (needs dit)" in s for s in skipped)
    assert any("deepcache x gmm" in s and "arch=analytic (needs unet)" in s for s in skipped)
    caps = build_model("digits-dit").capabilities
    assert (caps.arch, caps.prediction, caps.conditioning, caps.schedule, caps.guidance) == (
        "dit",
        "flow",
        "class",
        "flow",
        "cfg",
    )


def test_flow_map_sampler_without_renoising_is_ddim_on_its_grid():
    """gamma = 0 with a one-time network: each jump is a DDIM step, so the sampler is DDIM."""
    b = build_model("gmm", dim=2, prediction="eps")
    gens = generators(0, range(16))
    x = noise(gens, (2,), torch.float64)
    ddim = METHODS.get("ddim")()
    sampler = ddim.prepare(b, 6)
    got = sample_flow_map(b.denoiser, x, ddim.grid.t.tolist(), None, 1.0, gens, gamma=0.0)
    torch.testing.assert_close(got, sampler(x, None, 1.0, gens), rtol=0, atol=1e-12)


class _Recorder(torch.nn.Module):
    """A flow-map network predicting x0 = 0 that records the times it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, float]] = []

    def forward(self, x, t, cond=None, s=None):
        self.calls.append((float(t[0]), float(s[0])))
        return torch.zeros_like(x)


def test_flow_map_sampler_jumps_and_renoises_by_hand():
    """gamma = 1 (consistency sampling): jump to the data, then re-noise to the next level with
    sigma_bar_next fresh noise in the x / alpha frame; the network gets its second time."""
    net = _Recorder()
    den = Denoiser(net, "x0", VPSchedule.linear(), second_time=True)
    gens = generators(3, range(4))
    x = noise(gens, (2,), torch.float64)
    out = sample_flow_map(den, x, [999.0, 500.0, -1.0], None, 1.0, gens, gamma=1.0)
    assert [c[0] for c in net.calls] == [999.0, 500.0] and [c[1] for c in net.calls] == [-1.0, -1.0]
    assert torch.equal(out, torch.zeros_like(out))  # x0 = 0 at the data end
    # one step alone: zeros re-noised to t = 500 is alpha_500 * sigma_bar_500 * z = sigma_500 * z
    gens = generators(3, range(4))
    x = noise(gens, (2,), torch.float64)
    z_expected = torch.stack([torch.randn(2, generator=g, dtype=torch.float64) for g in gens])
    gens = generators(3, range(4))
    noise(gens, (2,), torch.float64)  # the generators past the initial draw, as the harness leaves them
    one = sample_flow_map(den, x, [999.0, 500.0], None, 1.0, gens, gamma=1.0)
    a, s = VPSchedule.linear().alpha_sigma(torch.tensor([500.0]))
    torch.testing.assert_close(one, float(s) * z_expected, rtol=1e-12, atol=1e-12)
    del a


def test_a_second_time_only_reaches_a_flow_map_network():
    den = Denoiser(_Recorder(), "flow", FlowSchedule())
    with pytest.raises(ValueError, match="second time"):
        den(torch.zeros(1, 2), 500.0, s=100.0)


# --- the fair reference ----------------------------------------------------------------------------


def test_suites_with_trained_methods_score_against_the_held_out_digits():
    base = "models: [digits-unet]\nsteps: [1]\nguidance: [1.0]\nmetrics: [fid]\n"
    assert _suite(base + "methods: [ddim]\n").reference_set is None
    assert _suite(base + "methods: [ddim, kd]\n").reference_set == "digits-heldout"
    assert _suite(base + "methods: [ddim, kd]\nreference_set: digits-train\n").reference_set == "digits-train"


def test_the_fid_reference_is_recorded_and_changes_the_number(home):
    b = build_model("digits-unet")
    j = Job(ModelSpec("digits-unet"), "ddim", (), 5, 1.0, 0, 64, 64)
    train, _ = run_job(j, b, tiny_suite(["fid"]))
    held, _ = run_job(j, b, tiny_suite(["fid"], raw={"reference_set": "digits-heldout"}))
    assert train["reference_set"] == "digits-train" and held["reference_set"] == "digits-heldout"
    assert np.isfinite([train["fid"], held["fid"]]).all() and train["fid"] != held["fid"]


def test_paired_differences_use_the_reference_set_the_jobs_were_scored_against(home, tmp_path):
    from bench.metrics.paired import paired_between

    text = """
name: ph
n_samples: 40
batch_size: 40
bootstrap: 5
models: [digits-unet]
methods: [ddim]
steps: [2, 4]
guidance: [1.0]
metrics: [fid]
reference_set: digits-heldout
timing: {warmup: 0}
"""
    run = _run(text, tmp_path)
    df = pd.read_parquet(run / "results.parquet").set_index("steps")
    assert (df["reference_set"] == "digits-heldout").all()
    _, (d,) = paired_between(run, df.loc[2, "job_id"], df.loc[4, "job_id"], ["fid"], bootstrap=5)
    assert d.a == pytest.approx(df.loc[2, "fid"], rel=1e-12) and d.b == pytest.approx(df.loc[4, "fid"], rel=1e-12)


def test_extra_inputs_start_as_the_teacher_and_then_matter():
    """A student with new inputs (w, a second time s) computes exactly its teacher's output until
    the zero-initialised last layers of the new embeddings move."""
    import copy

    from bench.models.students import ExtraInputs, MLPStudent

    for name in ("digits-unet", "digits-dit"):
        net = build_model(name).denoiser.net
        student = ExtraInputs(copy.deepcopy(net), ("w", "s"))
        x, t, c = torch.randn(3, 1, 16, 16), torch.tensor([500.0, 300.0, 10.0]), torch.tensor([1, 2, 3])
        assert torch.equal(student(x, t, c, guidance=2.0, s=torch.tensor([100.0, 50.0, 0.0])), net(x, t, c))
        torch.nn.init.normal_(student.embeds["w"][2].weight)
        assert not torch.equal(student(x, t, c, guidance=2.0), net(x, t, c))
        assert torch.equal(student(x, t, c), net(x, t, c))  # an input not given adds nothing
    mlp = MLPStudent(2)
    x, t = torch.randn(4, 2), torch.full((4,), 500.0)
    assert torch.equal(ExtraInputs(mlp, ("s",))(x, t, s=t), mlp(x, t))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_denoising_targets_convert_back_to_the_clean_sample_and_noise(prediction):
    """The fake-score loss's target in each parametrisation is what the denoiser converts to the
    true (x0, eps) at that time: the loss is the right one whatever the network predicts."""
    from bench.students import prediction_target

    sch = FlowSchedule() if prediction == "flow" else VPSchedule.linear()
    den = Denoiser(torch.nn.Identity(), prediction, sch)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([10.0, 200.0, 500.0, 800.0, 990.0], dtype=torch.float64)
    a, s = den.alpha_sigma(t, x0)
    got_x0, got_eps = den.x0_eps(a * x0 + s * eps, t, prediction_target(prediction, x0, eps, a, s))
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_a_shared_ancestor_counts_once_in_the_chain_cost(home):
    """A chain is a DAG: two parents sharing one ancestor (reflow's couplings under InstaFlow's
    student and its pairs) must not charge that ancestor twice."""
    from bench.adapter import MethodAdapter, register_method
    from bench.artifacts import artifact_spec
    from bench.bundle import Applies

    class ToyChain(MethodAdapter):
        name = "toy_chain_cost"
        family = "distillation"
        training = "finetune"
        paper = "test"
        applies_to = Applies()

        def build(self, spec, ctx):
            ctx.note(optimizer_steps=int(spec.params["steps"]))
            (ctx.out / "f").write_text(spec.name)

    if "toy_chain_cost" not in METHODS:
        register_method(ToyChain)
    b = build_model("gmm", dim=2, prediction="eps")
    toy = METHODS.get("toy_chain_cost")()
    root = artifact_spec(toy, b, "root", {"steps": 1})
    left = artifact_spec(toy, b, "left", {"steps": 10}, (root,))
    right = artifact_spec(toy, b, "right", {"steps": 100}, (root,))
    top = ensure(artifact_spec(toy, b, "top", {"steps": 1000}, (left, right)), b)
    assert top.chain_cost["optimizer_steps"] == 1111
