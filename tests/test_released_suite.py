"""Released students in a suite: suites/sdxl-students.yaml validates and expands here, and its tiny
stand-in (tests/suites/released_tiny.yaml: the same methods on a random-weight SDXL pipeline and
student stand-ins of the same architecture) plans and runs
end to end with `bench run`, giving rows with the student's own NFE and its quoted training cost."""

from __future__ import annotations

import math
from pathlib import Path
from string import Template

import pandas as pd
import pytest
import yaml
from test_released_sdxl import sdxl_dir, sdxl_students  # noqa: F401  (the tiny SDXL teacher and its student stand-ins)

from bench.registry import METHODS
from bench.suite import expand, load_suite

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "suites" / "released_tiny.yaml"


def test_the_sdxl_students_suite_validates_and_expands():
    suite = load_suite(REPO / "suites" / "sdxl-students.yaml")
    jobs, skipped = expand(suite)
    assert not skipped
    by_method: dict[str, list[int]] = {}
    for j in jobs:
        by_method.setdefault(j.method, []).append(j.steps)
    assert by_method == {
        "dpmpp_2m": [8, 15, 25, 50], "deepcache": [25, 50, 25, 50], "lcm_lora": [4, 8], "sdxl_turbo": [1, 4],
        "sdxl_lightning": [2, 4, 8], "dmd2_sdxl": [1, 4],
    }  # fmt: skip
    assert suite.models[0].options["pipeline"] == "stabilityai/stable-diffusion-xl-base-1.0"
    for name in ("lcm_lora", "sdxl_turbo", "sdxl_lightning", "dmd2_sdxl"):  # real hub ids by default
        assert METHODS.get(name)().config["student"].count("/") == 1
    # the stand-in suite has the real suite's methods (and LCM's UNet besides)
    tiny_methods = {m if isinstance(m, str) else m["name"] for m in yaml.safe_load(TINY.read_text())["methods"]}
    assert {m.name for m in suite.methods} <= tiny_methods


@pytest.fixture
def tiny_suite(tmp_path, sdxl_dir, sdxl_students):  # noqa: F811
    text = Template(TINY.read_text()).substitute(teacher=str(sdxl_dir), students=str(sdxl_students))
    path = tmp_path / "released_tiny.yaml"
    path.write_text(text)
    return path


def test_the_stand_in_suite_plans_with_the_students_nfe(tiny_suite):
    from bench.plan import plan_suite

    plan = plan_suite(load_suite(tiny_suite), device="cpu")
    rows = {(r["method"], r["steps"]): r for r in plan["jobs"]}
    for (method, steps), r in rows.items():
        assert r["nfe_source"] == "probe", (method, r["nfe_source"])
        assert r["nfe"] == steps, (method, steps, r["nfe"])


@pytest.mark.slow
def test_bench_run_of_the_stand_in_suite(tiny_suite, sdxl_students, tmp_path, monkeypatch):  # noqa: F811
    """`bench run`: every job ok; each student's NFE is its step count on its own network (one row per
    sample: none runs the suite's guidance 3), its FLOPs per image those of its steps; its training
    cost quoted, never measured (train_cost_s 0): LCM's stand-in takes the LCM paper's quote (this
    test gives it the released checkpoint's entry), the others are 'not published'."""
    from bench.cli import main
    from methods.released.base import QuotedCost

    lcm = METHODS.get("lcm_unet")
    quote = lcm.quotes["SimianLuo/LCM_Dreamshaper_v7"]
    monkeypatch.setattr(lcm, "quotes", {str(sdxl_students / "lcm"): quote})
    assert isinstance(quote, QuotedCost)
    res = tmp_path / "res"
    assert main(["run", str(tiny_suite), "--results", str(res), "--run-id", "t", "--no-progress"]) == 0
    df = pd.read_parquet(res / "released-tiny" / "t" / "results.parquet")
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert len(df) == 7
    teacher = df[df["method"] == "dpmpp_2m"].set_index("steps")
    students_df = df[df["training"] == "finetune"]
    assert set(students_df["method"]) == {"lcm_lora", "sdxl_turbo", "sdxl_lightning", "dmd2_sdxl", "lcm_unet"}
    assert (students_df["nfe"] == students_df["steps"]).all()
    assert (students_df["train_cost_source"] == "quoted").all() and (students_df["train_cost_s"] == 0).all()
    assert (df[df["training"] == "free"]["train_cost_source"] == "measured").all()
    # a student's network costs what the teacher's does per call (same architecture): FLOPs scale with
    # its steps, and without the teacher's CFG half
    per_call = teacher.loc[4, "flops"] / (4 * 2)
    for _, r in students_df.iterrows():
        assert r["flops"] == pytest.approx(r["steps"] * per_call, rel=0.05), r["method"]
    lcm_row = students_df[students_df["method"] == "lcm_unet"].iloc[0]
    assert lcm_row["train_cost_quoted_gpu_h"] == 32.0 and "2310.04378" in lcm_row["train_cost_citation"]
    others = students_df[students_df["method"] != "lcm_unet"]
    assert others["train_cost_quoted_gpu_h"].isna().all()
    assert others["train_cost_citation"].str.contains("not published").all()
    assert (students_df["student_guidance"] == 1.0).sum() == len(students_df) - 1 and lcm_row["student_guidance"] == 8.0
    assert math.isfinite(float(df[df["method"] == "dmd2_sdxl"]["psnr"].iloc[0]))
