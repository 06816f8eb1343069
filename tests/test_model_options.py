"""Deployment options of the models (bench.models.options): ``dtype``, ``compile``, ``channels_last``
on the digits teachers and a tiny diffusers pipeline, applied by ``build_model`` outside the methods.

torch.compile runs here with the ``aot_eager`` backend (the ``compile_backend`` option): dynamo
captures the graph and AOTAutograd traces it exactly as for inductor, without inductor's C++ code
generation, which works on this machine (gcc is present) but takes minutes per network on its two
shared cores. ``benchmarks/test_compile_latency.py`` times inductor against eager.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import write_suite
from helpers import job, tiny_suite
from test_pipelines import PROMPTS, sd_dir  # noqa: F401  (the tiny Stable Diffusion pipeline fixture)

from bench.models import build_model
from bench.models.options import CompileHooksError, DeployError, installed_hooks
from bench.registry import METHODS
from bench.schema import SuiteError
from bench.suite import expand, load_suite
from bench.worker import run_job

DEPLOY_COLUMNS = ("dtype", "compiled", "compile_backend", "channels_last")
BF16_ATOL = 0.15  # bfloat16 (8 mantissa bits) through 3 DDIM steps of the digits UNet, on samples in about [-3, 3]


def sample(bundle, method: str = "ddim", steps: int = 3, n: int = 2, warmup: int = 1):
    return run_job(job(method, steps, 2.0, n, n, model=bundle.name), bundle, tiny_suite(warmup=warmup))


@pytest.fixture(scope="module")
def eager_unet():
    b = build_model("digits-unet")
    row, x = sample(b)
    return b, row, x


def test_compile_gives_the_eager_samples_and_the_row_records_it(eager_unet):
    _, row0, x0 = eager_unet
    b = build_model("digits-unet", compile=True, compile_backend="aot_eager")
    fwd = b.denoiser.net.forward
    row, x = sample(b)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)
    assert {k: row[k] for k in DEPLOY_COLUMNS} == {
        "dtype": "float32", "compiled": True, "compile_backend": "aot_eager", "channels_last": False,
    }  # fmt: skip
    assert {k: row0[k] for k in DEPLOY_COLUMNS} == {
        "dtype": "float32", "compiled": False, "compile_backend": "", "channels_last": False,
    }  # fmt: skip
    # the warm-up and both timed evaluations of every step went through the compiled forward; the
    # FLOP counting pass ran eagerly (its dispatch mode), and counts the same FLOPs
    assert fwd.calls["compiled"] == 2 * 3 and fwd.calls["eager"] == 3
    assert row["flops"] == row0["flops"] and row["nfe"] == row0["nfe"] == 3
    # the model's artifacts are shared with the eager one (same numbers); the row's model label is not
    assert b.identity == build_model("digits-unet").identity


def test_channels_last_gives_the_same_samples(eager_unet):
    _, _, x0 = eager_unet
    b = build_model("digits-unet", channels_last=True)
    convs = [m.weight for m in b.denoiser.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # the layout did change (a 1-channel kernel is both)
    row, x = sample(b)
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=1e-4)  # another convolution kernel: float32 rounding apart
    assert row["channels_last"] is True and row["compiled"] is False


def test_bfloat16_runs_on_the_cpu_within_the_stated_tolerance(eager_unet):
    _, _, x0 = eager_unet
    b = build_model("digits-unet", dtype="bfloat16")
    assert {p.dtype for p in b.denoiser.net.parameters()} == {torch.bfloat16}
    row, x = sample(b)
    assert x.dtype == torch.float32  # the sampler's arithmetic stays in float32; the network's output is cast back
    diff = (x - x0).abs()
    assert 0 < diff.max() < BF16_ATOL, float(diff.max())  # not bit-equal (it did run in bfloat16), and close
    assert row["dtype"] == "bfloat16"
    assert b.identity != build_model("digits-unet").identity  # other numbers: other artifacts


def test_compile_on_the_flow_dit_and_a_deep_copy_calls_its_own_weights():
    eager = build_model("digits-dit")
    b = build_model("digits-dit", compile=True, compile_backend="eager")
    x = torch.randn(2, 1, 16, 16)
    t, c = torch.tensor([500.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(b.denoiser.net(x, t, c), eager.denoiser.net(x, t, c), atol=1e-5, rtol=1e-5)
        twin = copy.deepcopy(b.denoiser.net)  # a student initialised from its teacher
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.allclose(twin(x, t, c), b.denoiser.net(x, t, c), atol=1e-3)
    assert b.denoiser.net.forward.calls["compiled"] == 2


def test_a_compiled_network_refuses_a_caches_hooks_and_the_planner_skips_the_pair(tmp_path):
    b = build_model("digits-dit", compile=True, compile_backend="aot_eager")
    with pytest.raises(CompileHooksError, match="compile: false"):
        sample(b, "first_block_cache", steps=4)
    assert not installed_hooks(b.denoiser.net)  # the cache's context removed its hooks on the way out
    # the cache's hooks, installed directly: the compiled forward will not trace them
    cache = METHODS.get("fora")()
    with cache.installed(b.denoiser.net.transformer, 4), torch.no_grad(), pytest.raises(CompileHooksError, match="hooks"):
        b.denoiser.net(torch.randn(1, 1, 16, 16), torch.tensor([500.0]), torch.tensor([1]))
    path = write_suite(
        tmp_path / "s.yaml",
        "name: t\nmodels: [digits-dit, {name: digits-dit, options: {compile: true, compile_backend: aot_eager}}]\n"
        "methods: [euler, first_block_cache]\nsteps: [4]\nguidance: [1.0]\nmetrics: []\n",
    )
    jobs, skipped = expand(load_suite(path))
    assert sorted((j.model.label, j.method) for j in jobs) == [
        ("digits-dit", "euler"), ("digits-dit", "first_block_cache"),
        ("digits-dit[compile=True,compile_backend=aot_eager]", "euler"),
    ]  # fmt: skip
    assert any("first_block_cache x digits-dit[compile=True" in s and "compile: false" in s for s in skipped)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dtype": "float8"}, "float32 | float16 | bfloat16"),
        ({"compile": "yes"}, "compile='yes'"),
        ({"compile_backend": "tvm"}, "inductor | aot_eager | eager"),
        ({"channels_last": 1}, "channels_last=1"),
    ],
)
def test_a_bad_option_value_is_a_clear_error(options, match, tmp_path):
    with pytest.raises(DeployError, match=match):
        build_model("digits-unet", **options)
    path = write_suite(
        tmp_path / "s.yaml",
        f"name: t\nmodels: [{{name: digits-unet, options: {json.dumps(options)}}}]\nmethods: [ddim]\nsteps: [2]\n"
        "guidance: [1.0]\nmetrics: []\n",
    )
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert f"models[0].options.{next(iter(options))}" in str(e.value)


def test_what_cannot_take_the_options_says_so(tmp_path):
    with pytest.raises(DeployError, match="not a network model"):
        build_model("gmm", dtype="float16")
    path = write_suite(
        tmp_path / "s.yaml",
        "name: t\nmodels: [{name: digits-unet, options: {compile: true}}]\nmethods: [ddim]\nsteps: [2]\n"
        "guidance: [1.0]\nmetrics: []\ntiming: {warmup: 0}\n",
    )
    with pytest.raises(SuiteError, match=r"timing\.warmup.*compile: true.*warmup: 1"):
        load_suite(path)
    path.write_text(path.read_text().replace("timing: {warmup: 0}", "timing: {warmup: 1, warmup_batch: 2}\nbatch_size: 4"))
    with pytest.raises(SuiteError, match=r"timing\.warmup_batch.*recompile in the first timed batch"):
        load_suite(path)


def test_a_tiny_pipeline_compiled_channels_last_and_in_bfloat16(sd_dir: Path):  # noqa: F811
    """One guided forward of the pipeline's network (a run_job of it costs a minute here)."""
    opts = dict(pipeline=str(sd_dir), prompts=PROMPTS, device="cpu")
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([400, 400]), torch.tensor([0, 2])
    eager = build_model("diffusers", **opts)
    comp = build_model("diffusers", **opts, compile=True, compile_backend="aot_eager", channels_last=True)
    bf = build_model("diffusers", **opts, dtype="bfloat16")
    assert {p.dtype for p in bf.denoiser.net.unet.parameters()} == {torch.bfloat16}  # loaded so by the pipeline itself
    with torch.no_grad():
        ref = eager.denoiser(x, t, c, 3.0)
        torch.testing.assert_close(comp.denoiser(x, t, c, 3.0), ref, atol=1e-4, rtol=1e-4)
        out = bf.denoiser(x, t, c, 3.0)
    assert comp.denoiser.net.forward.calls == {"compiled": 1, "eager": 0}
    assert out.dtype == torch.float32 and 0 < (out - ref).abs().max() < BF16_ATOL * ref.abs().max()
    assert comp.extra["deploy"].row() == {
        "dtype": "float32",
        "compiled": True,
        "compile_backend": "aot_eager",
        "channels_last": True,
    }


def test_the_report_says_when_latencies_were_measured_under_different_deployments(tmp_path):
    """A synthetic results table: the tiny gmm run's rows again under a second, compiled bfloat16
    model label, and the first model's configurations of the solver that is not its reference run compiled."""
    from report_helpers import edit_results, tiny_run

    from bench.report.build import build_report
    from bench.report.data import config_key
    from bench.report.matched import choose_references

    run = tiny_run(tmp_path)
    clean = build_report(run, out=tmp_path / "clean")
    assert "different deployments" not in clean.index.read_text()  # one deployment: nothing to say
    assert "[deployed:" not in (clean.dir / "leaderboard.md").read_text()

    def mix(df):
        assert set(df["dtype"]) == {"float64"} and not df["compiled"].any()  # recorded by the worker
        other = df.copy()
        other["model"] = "gmm[compile=True,dtype=bfloat16]"
        other["dtype"], other["compiled"], other["compile_backend"] = "bfloat16", True, "inductor"
        # ddim and euler are one solver on this model: which is the reference can turn on the last bit
        # of their scores, so the method compiled is the one that is not the reference
        ref = df.loc[choose_references(df, "exact_mse")[df["model"].iloc[0]].index, "method"]
        one = df.index[df["method"] == ({"ddim", "euler"} - {ref}).pop()]
        df.loc[one, ["compiled", "compile_backend"]] = [True, "inductor"]
        return pd.concat([df, other], ignore_index=True)

    edit_results(run, mix)
    rep = build_report(run, out=tmp_path / "mixed")
    html = rep.index.read_text()
    assert "Latencies in this run were measured under different deployments" in html
    assert "bfloat16, compiled (inductor)" in html and "float64, eager" in html
    board = (rep.dir / "leaderboard.md").read_text()
    assert "[deployed: float64, compiled (inductor)]" in board  # the compiled configurations of the eager model
    # the history never puts the two models' configurations in one series: the model label is in the key
    df = pd.read_parquet(run / "results.parquet")
    a, b = (config_key(df[df["model"] == m].iloc[0]) for m in ("gmm[dim=2,prediction=eps]", "gmm[compile=True,dtype=bfloat16]"))
    assert a != b
