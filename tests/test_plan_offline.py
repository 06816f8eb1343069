"""`bench plan` of a suite whose model is not on this machine (issue 16: real suites validate and
plan here): its jobs are listed as the suite expands them, without ids or probes, and the plan names
what to fetch; a model that is here in the same suite is planned as usual."""

import json

from conftest import write_suite

from bench.cli import main
from bench.plan import plan_suite
from bench.suite import expand, load_suite


def test_plan_lists_jobs_of_an_absent_pipeline_and_names_the_fetch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_suite(
        tmp_path / "absent.yaml",
        "models:\n  - {name: diffusers, options: {pipeline: someone/absent, prompts: [x]}}\n  - gmm\n"
        "methods: [ddim, euler]\nsteps: [3, 4]\nguidance: [1.0]\nmetrics: []\nn_samples: 4\nbatch_size: 4\n",
    )
    suite = load_suite(path)
    jobs, _ = expand(suite)
    plan = plan_suite(suite, probe=False)
    assert len(plan["jobs"]) == len(jobs) == 8
    offline = [r for r in plan["jobs"] if r["job_id"] is None]
    here = [r for r in plan["jobs"] if r["job_id"] is not None]
    assert len(offline) == 4 and all(r["model"].startswith("diffusers") for r in offline)
    assert len(here) == 4 and all(r["model"].startswith("gmm") for r in here)
    assert [r["nfe"] for r in offline] == [float(r["steps"]) for r in offline]
    (why,) = plan["absent"].values()
    assert "`hf download someone/absent`" in why
    assert main(["plan", str(path), "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "not on this machine" in out and "4 jobs planned without ids" in out and "hf download someone/absent" in out
    assert main(["plan", str(path), "--no-probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["absent"]
