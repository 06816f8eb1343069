"""MLPerf's SDXL protocol (suites/sdxl-mlperf.yaml): it validates here; with tiny stand-ins for its
inputs (a tiny random-weight SDXL, 5,000 synthetic captions in MLPerf's format, a latents file) it
plans and runs, every sample starting from the latents file; `bench report` marks FID and CLIP
against MLPerf's accuracy windows (on a synthetic results table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_suite
from report_helpers import edit_results, tiny_run

from bench.cli import main
from bench.latents import LatentsError
from bench.paths import REPO
from bench.suite import SuiteError, load_suite

MLPERF = REPO / "suites" / "sdxl-mlperf.yaml"
NEGATIVE = "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"


def test_the_mlperf_suite_validates_here_with_their_protocol(capsys):
    assert main(["validate", "sdxl-mlperf"]) == 0
    assert "is valid: 1 jobs" in capsys.readouterr().out
    s = load_suite("sdxl-mlperf")
    assert [m.name for m in s.methods] == ["euler"] and s.steps == [20] and s.guidance == [8.0]
    opts = s.models[0].options
    assert opts["pipeline"] == "stabilityai/stable-diffusion-xl-base-1.0" and (opts["height"], opts["width"]) == (1024, 1024)
    assert opts["negative_prompt"] == NEGATIVE and opts["prompts"]["set"] == "coco2014-mlperf"
    assert opts["latents"]["path"] == "$BENCH_HOME/mlperf/latents.pt"
    assert s.metrics == ["clip_score", "fid_mlperf"] and s.n_samples == 5000 and s.reference_set == "coco2014-val-mlperf"
    assert s.accuracy_windows == {"fid_mlperf": [23.011, 23.950], "clip_score": [31.686, 31.813]}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """A tiny SDXL pipeline, MLPerf's captions format with 5,000 synthetic captions, two latents files."""
    from tiny_pipelines import sdxl

    d = tmp_path_factory.mktemp("mlperf")
    head = "id\timage_id\tcaption\theight\twidth\tfile_name\tcoco_url\n"
    words = ["a red circle", "two blue squares", "a green triangle"]
    rows = [
        f"{i}\t{i + 9}\t{words[i % 3]} number {i}\t480\t640\tCOCO_val2014_{i:012d}.jpg\thttp://x/{i}.jpg\n" for i in range(5000)
    ]
    (d / "captions_source.tsv").write_text(head + "".join(rows))
    gen = torch.Generator().manual_seed(1)
    torch.save(torch.randn(1, 4, 8, 8, generator=gen), d / "latents.pt")  # one start for every sample, as MLPerf's
    np.save(d / "other.npy", torch.randn(1, 4, 8, 8, generator=gen).numpy())
    return {
        "pipe": sdxl(d / "sdxl"),
        "captions": d / "captions_source.tsv",
        "latents": d / "latents.pt",
        "other": d / "other.npy",
    }


def _tiny(tmp_path: Path, s: dict[str, Path], latents: Path, seed: int = 0, name: str = "t.yaml", extra: str = "") -> Path:
    """suites/sdxl-mlperf.yaml with its model replaced by the stand-ins (16x16 images, 8x8 latents)."""
    return write_suite(
        tmp_path / name,
        f'include: "{MLPERF}"\nname: tiny-mlperf\nseed: {seed}\nn_samples: 2\nbatch_size: 2\nbootstrap: 10\n{extra}'
        f'models:\n  - name: diffusers\n    options: {{pipeline: "{s["pipe"]}", device: cpu, height: 16, width: 16, '
        f'negative_prompt: "{NEGATIVE}", prompts: {{set: coco2014-mlperf, path: "{s["captions"]}", limit: 8}}, latents: "{latents}"}}\n'
        "metrics: []\noptional_metrics: [clip_score, fid_mlperf]\n",
    )


def test_it_plans_and_runs_on_stand_ins_every_sample_from_the_latents_file(stand_ins, tmp_path, capsys):
    from bench.runner import run_suite

    path = _tiny(tmp_path, stand_ins, stand_ins["latents"])
    assert main(["plan", str(path), "--results", str(tmp_path / "res"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    jobs = plan["jobs"]
    assert [(j["method"], j["steps"], j["guidance"], j["nfe"]) for j in jobs] == [("euler", 20, 8.0, 20)]
    suite = load_suite(path)
    assert (suite.steps, suite.guidance, suite.accuracy_windows["clip_score"]) == ([20], [8.0], [31.686, 31.813])
    # runs at 2 steps (the machine has 2 CPU cores): the latents file, not the seed, fixes every sample's start
    fast = "steps: [2]\ntiming: {warmup: 0}\n"
    runs = [
        run_suite(load_suite(_tiny(tmp_path, stand_ins, lat, seed, f"{tag}.yaml", fast)), tag, tmp_path / "res", progress=False)
        for tag, lat, seed in (("a", stand_ins["latents"], 0), ("b", stand_ins["latents"], 7), ("c", stand_ins["other"], 0))
    ]
    a, b, c = (pd.read_parquet(r / "results.parquet").iloc[0] for r in runs)
    for r in (a, b, c):
        assert r["status"] == "ok" and r["nfe"] == 2 and r["guidance"] == 8.0
        assert set(r["missing_metrics"].split(",")) == {"clip_score", "fid_mlperf"}  # weights absent: missing, not made up
        assert "bench weights fetch" in r["error"]
    assert a["start_latents"].startswith("latents.pt@") and c["start_latents"].startswith("other.npy@")
    assert a["prompt_set"].startswith("coco2014-mlperf@")
    # Euler is deterministic: with the start fixed by the file, another seed gives the same samples; another file does not
    assert a["samples_sha256"] == b["samples_sha256"] != c["samples_sha256"]


def test_a_changed_or_misshapen_latents_file_names_the_fix(stand_ins, tmp_path):
    from bench.models import build_model

    lat = tmp_path / "latents.pt"
    torch.save(torch.zeros(1, 4, 8, 8), lat)
    suite = load_suite(_tiny(tmp_path, stand_ins, lat))
    opts = suite.models[0].options
    torch.save(torch.ones(1, 4, 8, 8), lat)  # changed after the suite pinned it
    with pytest.raises(LatentsError, match="the file changed or is truncated"):
        build_model("diffusers", **opts)
    torch.save(torch.zeros(1, 4, 16, 16), lat)
    with pytest.raises(LatentsError, match=r"are \(4, 16, 16\) per sample, the model samples \(4, 8, 8\)"):
        build_model("diffusers", **{**opts, "latents": {"path": str(lat)}})
    absent = load_suite(_tiny(tmp_path, stand_ins, tmp_path / "nope.pt", name="x.yaml")).models[0].options
    assert absent["latents"] == {"path": str(tmp_path / "nope.pt")}  # validates; the build names the fix
    with pytest.raises(LatentsError, match="not found; copy the file there .*latents.pt"):
        build_model("diffusers", **absent)
    with pytest.raises(SuiteError, match=r"options\.latents: latents: give a file path"):
        load_suite(
            write_suite(
                tmp_path / "y.yaml", _tiny(tmp_path, stand_ins, lat).read_text().replace(f'latents: "{lat}"', "latents: 3")
            )
        )


def test_bench_report_marks_mlperfs_accuracy_windows_on_a_synthetic_table(tmp_path):
    from bench.report.build import build_report

    run = tiny_run(tmp_path)  # a real tiny run (gmm), its table then given MLPerf's two metrics
    values = {("ddim", 3): (23.5, 31.70), ("ddim", 8): (23.0, 31.75), ("euler", 3): (24.2, 31.80), ("euler", 8): (23.9, 31.60)}

    def mlperf_columns(df: pd.DataFrame) -> pd.DataFrame:
        for i, r in df.iterrows():
            fid, clip = values[(r["method"], int(r["steps"]))]
            df.loc[i, ["fid_mlperf", "fid_mlperf_ci_low", "fid_mlperf_ci_high"]] = [fid, fid - 0.2, fid + 0.2]
            df.loc[i, ["clip_score", "clip_score_ci_low", "clip_score_ci_high"]] = [clip, clip - 0.05, clip + 0.05]
        return df

    edit_results(run, mlperf_columns)
    rec = json.loads((run / "run.json").read_text())
    rec["suite"]["accuracy_windows"] = load_suite("sdxl-mlperf").accuracy_windows
    (run / "run.json").write_text(json.dumps(rec))
    rep = build_report(run, out=tmp_path / "report", metric="fid_mlperf")
    md = (rep.dir / "accuracy_windows.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    lines = {(c[1], c[3], c[5]) for c in cells if len(c) == 6}
    assert ("ddim 3 steps w=1", "23.5", "in window") in lines and ("ddim 3 steps w=1", "31.7", "in window") in lines
    assert ("ddim 8 steps w=1", "23", "BELOW WINDOW") in lines  # 23.0 < 23.011
    assert ("euler 3 steps w=1", "24.2", "ABOVE WINDOW") in lines and ("euler 8 steps w=1", "31.6", "BELOW WINDOW") in lines
    assert "Inside every window: ddim 3 steps w=1\n" in md  # the only configuration inside both windows
    html = rep.index.read_text()
    assert "Accuracy windows" in html and "[23.011, 23.95]" in html and "[31.686, 31.813]" in html
