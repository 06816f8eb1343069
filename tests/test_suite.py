import pandas as pd
import pytest

from bench.cli import main
from bench.runner import REQUIRED_COLUMNS
from bench.suite import SuiteError, expand, load_suite

GOOD = """
n_samples: 16
batch_size: 8
bootstrap: 5
models:
  - {name: gmm, options: {dim: 2}}
methods: [ddim, euler]
steps: [3, 6]
guidance: [1.0]
metrics: [exact_mse, swd]
"""


def problems(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(SuiteError) as e:
        load_suite(p)
    return str(e.value)


def test_good_suite_expands(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(GOOD)
    jobs, skipped = expand(load_suite(p))
    assert len(jobs) == 4 and not skipped


def test_unknown_method_names_path_and_closest(tmp_path):
    msg = problems(tmp_path, GOOD.replace("[ddim, euler]", "[ddim, eulr]"))
    assert "methods[1].name: unknown method 'eulr'; did you mean 'euler'" in msg


def test_wrong_type_names_path_and_fix(tmp_path):
    msg = problems(tmp_path, GOOD.replace("steps: [3, 6]", "steps: [3, six]"))
    assert "steps[1]: expected int, got str 'six'; fix: non-empty list of ints >= 1" in msg
    msg = problems(tmp_path, GOOD.replace("n_samples: 16", "n_samples: many"))
    assert "n_samples: expected int, got str 'many'" in msg


def test_bad_knob_names_path(tmp_path):
    msg = problems(tmp_path, GOOD.replace("[ddim, euler]", "[{name: ddim, knobs: {eta: [0.0, 2.0]}}]"))
    assert "methods[0].knobs.eta[1]: knob 'eta' must be in [0.0, 1.0], got 2.0" in msg


def test_missing_files_name_path_and_fix(tmp_path):
    msg = problems(tmp_path, GOOD.replace("models:", "include: nowhere.yaml\nmodels:"))
    assert "include: file not found" in msg and "nowhere.yaml" in msg
    msg = problems(
        tmp_path, GOOD.replace("{name: gmm, options: {dim: 2}}", "{name: digits-unet, options: {weights: gone.safetensors}}")
    )
    assert "models[0].options.weights: file not found" in msg and "remove it to use the committed weights" in msg
    with pytest.raises(SuiteError, match="file not found.*registered suites: .*quick"):
        load_suite(tmp_path / "absent.yaml")


def test_every_problem_reported_at_once(tmp_path):
    msg = problems(tmp_path, GOOD.replace("[ddim, euler]", "[ddimm]").replace("[exact_mse, swd]", "[fidd]") + "colour: red\n")
    assert "methods[0].name" in msg and "metrics[0]" in msg and "colour: unknown key" in msg


def test_guidance_on_unconditional_model_is_an_error(tmp_path):
    assert "is unconditional; use guidance: [1.0]" in problems(tmp_path, GOOD.replace("guidance: [1.0]", "guidance: [1.0, 2.0]"))


def test_yaml_is_parsed_safely(tmp_path):
    msg = problems(tmp_path, GOOD.replace("steps: [3, 6]", "steps: !!python/object/apply:os.system ['echo hi']"))
    assert "not valid YAML" in msg


def test_shipped_suites_validate(capsys):
    for name in ("quick", "gmm"):
        assert main(["validate", name]) == 0
    assert "skipped (not applicable): ddim x digits-dit" in capsys.readouterr().out


def test_cli_validate_error_exit_code(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(GOOD.replace("[ddim, euler]", "[ddimm]"))
    assert main(["validate", str(p)]) == 2
    assert "methods[0].name: unknown method 'ddimm'" in capsys.readouterr().err


def test_run_end_to_end_writes_contract(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(GOOD)
    assert main(["run", str(p), "--results", str(tmp_path / "res"), "--run-id", "r1"]) == 0
    run = tmp_path / "res" / "s" / "r1"
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 4 and df["job_id"].is_unique
    for c in REQUIRED_COLUMNS + ["exact_mse", "exact_mse_ci_low", "exact_mse_ci_high", "swd_ci_low"]:
        assert c in df.columns, c
    assert (df["status"] == "ok").all() and (df["nfe"] == df["steps"]).all()
    assert (df["exact_mse_ci_low"] <= df["exact_mse"]).all() and (df["exact_mse"] <= df["exact_mse_ci_high"]).all()
    assert (run / "run.json").is_file() and (run / "quality_vs_latency.png").is_file() and (run / "table.md").is_file()
    assert len(list(run.glob("jobs/*/samples.npy"))) == 4
    # a resumed run recomputes nothing
    before = {p: p.stat().st_mtime_ns for p in run.glob("jobs/*/row.json")}
    assert main(["run", str(p), "--results", str(tmp_path / "res"), "--resume", "r1"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in run.glob("jobs/*/row.json")}
