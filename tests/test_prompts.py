"""Prompt sets as named, checksummed inputs (bench.prompts): PartiPrompts from the copy beside the
repository, the other sets' formats on synthetic files; corrupted, truncated and absent files are
errors naming the fix; a suite pins the file's checksum into its job ids; a tiny pipeline run on
PartiPrompts records the set's identity and per-category metrics, and its report has per-category tables."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_suite
from test_pipelines import sd_dir  # noqa: F401  (the tiny Stable Diffusion pipeline fixture)

from bench import prompts
from bench.cli import main
from bench.paths import REPO
from bench.prompts import PromptSetError, load_prompt_set
from bench.suite import SuiteError, load_suite

# the project's copy: beside the checkout (../shared), or where this machine keeps it (a clean clone elsewhere)
PARTI = next(
    (
        p
        for p in (REPO.parent / "shared" / "data" / "PartiPrompts.tsv", Path("/work/shared/data/PartiPrompts.tsv"))
        if p.is_file()
    ),
    REPO.parent / "shared" / "data" / "PartiPrompts.tsv",
)
needs_parti = pytest.mark.skipif(not PARTI.is_file(), reason=f"PartiPrompts copy not at {PARTI}")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@needs_parti
def test_partiprompts_loads_with_categories_challenges_and_its_pinned_checksum():
    ps = load_prompt_set({"set": "partiprompts", "path": str(PARTI)})
    assert len(ps.prompts) == 1632 and ps.sha256 == prompts.PROMPT_SETS["partiprompts"].sha256
    assert len(set(ps.categories)) == 12 and "Animals" in ps.categories and len(ps.challenges) == 1632
    assert ps.identity == f"partiprompts@{ps.sha256[:12]}"
    sub = load_prompt_set({"set": "partiprompts", "path": str(PARTI), "categories": ["Animals", "Vehicles"], "per_category": 3})
    assert sorted(sub.categories) == ["Animals"] * 3 + ["Vehicles"] * 3
    assert sub.identity.endswith("[categories=Animals+Vehicles,per_category=3]")
    first = load_prompt_set({"set": "partiprompts", "path": str(PARTI), "challenges": ["Basic"], "limit": 5})
    assert len(first.prompts) == 5 and set(first.challenges) == {"Basic"}


@needs_parti
def test_a_corrupted_or_truncated_partiprompts_names_the_fix(tmp_path):
    data = PARTI.read_bytes()
    bad = tmp_path / "corrupt.tsv"
    bad.write_bytes(data.replace(b"a shiba inu", b"a shiba inx", 1))  # same structure, one byte changed
    with pytest.raises(PromptSetError, match="corrupted, truncated or another version") as e:
        load_prompt_set({"set": "partiprompts", "path": str(bad)})
    assert "`bench prompts fetch partiprompts`" in str(e.value) and "path:" in str(e.value)
    short = tmp_path / "short.tsv"
    short.write_bytes(b"\n".join(data.split(b"\n")[:900]))  # cut mid-file
    with pytest.raises(PromptSetError, match="holds 899 prompts; partiprompts has 1632"):
        load_prompt_set({"set": "partiprompts", "path": str(short)})
    torn = tmp_path / "torn.tsv"
    torn.write_bytes(data[: data.index(b"\t", len(data) - 200)])  # a last line cut after its first field
    with pytest.raises(PromptSetError, match="fields, not the header's"):
        load_prompt_set({"set": "partiprompts", "path": str(torn)})


def test_an_absent_set_names_its_fetch_command(home):
    with pytest.raises(PromptSetError) as e:
        load_prompt_set({"set": "drawbench"})
    assert "`bench prompts fetch drawbench`" in str(e.value) and str(home / "prompts" / "drawbench.csv") in str(e.value)
    with pytest.raises(PromptSetError, match="did you mean 'geneval'"):
        load_prompt_set({"set": "genevl"})


def _geneval(n: int) -> str:
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    lines = [{"tag": tags[i % 6], "include": [{"class": "cat", "count": 1}], "prompt": f"a photo of cat {i}"} for i in range(n)]
    return "".join(json.dumps(x) + "\n" for x in lines)


def test_the_other_formats_are_checked_for_structure(tmp_path):
    draw = tmp_path / "draw.csv"
    draw.write_text("Prompts,Category\n" + "".join(f'"prompt {i}, with a comma",Cat{i % 11}\n' for i in range(200)))
    ps = load_prompt_set({"set": "drawbench", "path": str(draw)})
    assert len(ps.prompts) == 200 and ps.prompts[0] == "prompt 0, with a comma" and len(set(ps.categories)) == 11
    coco = tmp_path / "captions_source.tsv"
    head = "id\timage_id\tcaption\theight\twidth\tfile_name\tcoco_url\n"
    coco.write_text(head + "".join(f"{i}\t{i + 7}\ta caption {i}\t480\t640\tf{i}.jpg\thttp://x/{i}.jpg\n" for i in range(5000)))
    ps = load_prompt_set({"set": "coco2014-mlperf", "path": str(coco), "limit": 10})
    assert ps.prompts[3] == "a caption 3" and ps.categories is None
    gen = tmp_path / "evaluation_metadata.jsonl"
    gen.write_text(_geneval(553))
    ps = load_prompt_set({"set": "geneval", "path": str(gen), "categories": ["counting"]})
    assert set(ps.categories) == {"counting"} and len(ps.prompts) == 92
    # broken structure: a missing column, a torn JSON line, an empty prompt, a category the set lacks
    (tmp_path / "nocat.csv").write_text("Prompts\n" + "p\n" * 200)
    with pytest.raises(PromptSetError, match="lacks the column"):
        load_prompt_set({"set": "drawbench", "path": str(tmp_path / "nocat.csv")})
    (tmp_path / "torn.jsonl").write_text(_geneval(553)[:-30])
    with pytest.raises(PromptSetError, match="line 553 is not JSON"):
        load_prompt_set({"set": "geneval", "path": str(tmp_path / "torn.jsonl")})
    with pytest.raises(PromptSetError, match="did you mean 'counting'"):
        load_prompt_set({"set": "geneval", "path": str(gen), "categories": ["countin"]})
    with pytest.raises(PromptSetError, match="has no categories"):
        load_prompt_set({"set": "coco2014-mlperf", "path": str(coco), "categories": ["x"]})
    # the suite may pin another version by its sha256; a mismatch names the fix
    other = prompts.sha256_bytes(draw.read_bytes())
    assert load_prompt_set({"set": "drawbench", "path": str(draw), "sha256": other}).sha256 == other
    with pytest.raises(PromptSetError, match="the suite's sha256"):
        load_prompt_set({"set": "drawbench", "path": str(draw), "sha256": "0" * 64})


def test_fetch_pins_the_checksum_and_a_later_corruption_is_caught(home, tmp_path, monkeypatch):
    """`bench prompts fetch` from a local file:// source (nothing is downloaded in tests)."""
    src = tmp_path / "src.jsonl"
    src.write_text(_geneval(553))
    spec = dataclasses.replace(prompts.PROMPT_SETS["geneval"], source=src.as_uri())
    monkeypatch.setitem(prompts.PROMPT_SETS, "geneval", spec)
    assert main(["prompts", "fetch", "geneval"]) == 0
    dest = home / "prompts" / "evaluation_metadata.jsonl"
    assert json.loads((home / "prompts" / "prompts.lock.json").read_text())["geneval"] == prompts.sha256_bytes(dest.read_bytes())
    assert load_prompt_set({"set": "geneval"}).sha256 == prompts.sha256_bytes(src.read_bytes())
    dest.write_text(_geneval(553).replace("cat 7", "dog 7"))  # same structure, other bytes
    with pytest.raises(PromptSetError, match="pinned when bench fetched it") as e:
        load_prompt_set({"set": "geneval"})
    assert "`bench prompts fetch geneval --force`" in str(e.value)
    assert main(["prompts", "verify", "geneval"]) == 1
    assert main(["prompts", "fetch", "geneval", "--force"]) == 0 and main(["prompts", "verify", "geneval"]) == 0


@needs_parti
def test_a_suite_names_a_prompt_set_and_pins_its_checksum(tmp_path):
    def suite(prompts_yaml: str) -> Path:
        return write_suite(
            tmp_path / "s.yaml",
            f"models:\n  - {{name: diffusers, options: {{pipeline: ./nowhere, prompts: {prompts_yaml}}}}}\n"
            "methods: [ddim]\nsteps: [4]\nguidance: [1.0]\nmetrics: [psnr]\nreference: {method: ddim, steps: 4}\n",
        )

    rel = Path("..") / PARTI.relative_to(tmp_path.parent) if PARTI.is_relative_to(tmp_path.parent) else PARTI
    s = load_suite(suite(f'{{set: partiprompts, path: "{rel}", categories: [Animals], limit: 8}}'))
    opts = s.models[0].options["prompts"]
    assert opts["sha256"] == prompts.PROMPT_SETS["partiprompts"].sha256 and Path(opts["path"]).is_absolute()
    assert "prompts=partiprompts#fab29e[categories=1,limit=8]" in s.models[0].label
    with pytest.raises(SuiteError, match=r"models\[0\]\.options\.prompts: categories 'Animal' \(did you mean 'Animals'\?\)"):
        load_suite(suite(f'{{set: partiprompts, path: "{PARTI}", categories: [Animal]}}'))
    with pytest.raises(SuiteError, match=r"models\[0\]\.options\.prompts\.limt: unknown key; did you mean 'limit'"):
        load_suite(suite("{set: partiprompts, limt: 3}"))
    with pytest.raises(SuiteError, match="corrupted, truncated"):
        bad = tmp_path / "bad.tsv"
        bad.write_bytes(PARTI.read_bytes().replace(b"a shiba inu", b"a shiba inx", 1))
        load_suite(suite(f'{{set: partiprompts, path: "{bad}"}}'))
    # a file not on this machine validates (the model build reports it, with the fetch command)
    assert load_suite(suite("{set: drawbench}")).models[0].options["prompts"] == {"set": "drawbench"}


@needs_parti
def test_a_partiprompts_run_records_categories_and_reports_per_category_tables(sd_dir, tmp_path):  # noqa: F811
    from bench.report.build import build_report
    from bench.runner import run_suite

    path = write_suite(
        tmp_path / "parti.yaml",
        f'name: tiny-parti\nmodels:\n  - {{name: diffusers, options: {{pipeline: "{sd_dir}", device: cpu, '
        f'prompts: {{set: partiprompts, path: "{PARTI}", categories: [Animals, Vehicles], per_category: 2}}}}}}\n'
        "methods: [ddim, dpmpp_2m]\nsteps: [3]\nguidance: [1.0]\nn_samples: 8\nbatch_size: 4\nbootstrap: 20\n"
        "metrics: [psnr, ssim]\nreference: {method: ddim, steps: 3}\ntiming: {warmup: 0}\n",
    )
    run = run_suite(load_suite(path), "r", tmp_path / "res", progress=False)
    df = pd.read_parquet(run / "results.parquet")
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert df["prompt_set"].eq("partiprompts@fab29e41bb51[categories=Animals+Vehicles,per_category=2]").all()
    rec = json.loads(df.loc[df["method"] == "dpmpp_2m", "per_category"].iloc[0])
    assert set(rec) == {"psnr", "ssim"} and set(rec["ssim"]) == {"Animals", "Vehicles"}
    assert rec["ssim"]["Animals"]["n"] == 4 and rec["ssim"]["Vehicles"]["n"] == 4  # prompts A A V V, twice each
    whole = float(df.loc[df["method"] == "dpmpp_2m", "ssim"].iloc[0])
    halves = [rec["ssim"][c]["value"] for c in ("Animals", "Vehicles")]
    assert whole == pytest.approx(sum(halves) / 2)  # SSIM is a mean over samples: the categories' average
    for c in ("Animals", "Vehicles"):
        v = rec["ssim"][c]
        assert v["ci_low"] <= v["value"] <= v["ci_high"]
    rep = build_report(run, out=tmp_path / "report")
    md = (rep.dir / "per_category.md").read_text()
    assert "partiprompts@fab29e41bb51" in md and "Animals (n=4)" in md and "Vehicles (n=4)" in md
    assert "dpmpp_2m 3 steps" in md and f"{halves[0]:.4g}" in md
    assert "Metrics per prompt category" in rep.index.read_text()


def test_clip_score_per_category_is_the_mean_of_its_samples():
    """bench.metrics.breakdown on CLIP score values already computed (the metric reads its per-sample
    values from the context's cache; no CLIP weights are needed to break them down)."""
    import numpy as np
    import torch
    from helpers import random_bundle

    from bench.metrics.base import MetricContext
    from bench.metrics.breakdown import per_category

    values = np.array([30.0, 31.0, 20.0, 22.0, 32.0, 24.0])
    cats = ["Animals", "Animals", "Vehicles", "Vehicles", "Animals", "Vehicles"]
    ctx = MetricContext(
        torch.zeros(6, 3, 8, 8), torch.arange(6), random_bundle(), bootstrap=50, prompts=[f"p{i}" for i in range(6)]
    )
    ctx.cache["clip_score_values"] = values
    got = per_category(ctx, ["clip_score", "fid_inception"], cats)
    assert set(got) == {"clip_score"}  # a set distance to a reference is not broken down
    assert got["clip_score"]["Animals"]["value"] == pytest.approx(31.0) and got["clip_score"]["Vehicles"][
        "value"
    ] == pytest.approx(22.0)
    assert got["clip_score"]["Animals"]["n"] == 3
    assert 30.0 <= got["clip_score"]["Animals"]["ci_low"] <= 31.0 <= got["clip_score"]["Animals"]["ci_high"] <= 32.0


def test_unusable_paths_in_a_suite_are_suite_errors(tmp_path):
    body = "methods: [ddim]\nsteps: [4]\nguidance: [1.0]\nmetrics: []\n"
    for opt in ("prompts: {set: drawbench, path: ~no_such_user_x/d.csv}", "prompts: [a], latents: ~no_such_user_x/l.pt"):
        path = write_suite(tmp_path / "s.yaml", f"models:\n  - {{name: diffusers, options: {{pipeline: ./p, {opt}}}}}\n" + body)
        with pytest.raises(SuiteError, match=r"models\[0\]\.options\.(prompts|latents): "):
            load_suite(path)
