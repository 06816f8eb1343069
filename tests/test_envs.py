"""bench.envs: isolated environments made idempotently and resumably, recorded in a manifest, and
workers run in them exchanging files (no package installed: a bare venv keeps these tests fast)."""

import json
import os
import time

import pytest

from bench import envs
from bench.weights import MissingWeightsError

TINY = envs.EnvSpec("tiny", "a bare test environment", (), imports=("json",), setup_command="bench env setup tiny")

WORKER = """
import importlib.util, json, sys
from pathlib import Path
req = json.loads(Path(sys.argv[1]).read_text())
if req["op"] == "sum":
    nums = json.loads((Path(sys.argv[1]).parent / req["file"]).read_text())
    res = {"ok": True, "sum": sum(nums), "prefix": sys.prefix,
           "bench_importable": importlib.util.find_spec("bench") is not None,
           "torch_importable": importlib.util.find_spec("torch") is not None}
elif req["op"] == "weights":
    res = {"ok": False, "error": "missing_weights", "message": "needs foo.pt; fetch with `bench env fetch tiny`"}
else:
    raise RuntimeError("worker exploded on purpose")
Path(sys.argv[2]).write_text(json.dumps(res))
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_ENVS", str(tmp_path / "envs"))
    monkeypatch.setitem(envs.ENVS, "tiny", TINY)
    return tmp_path


def test_lifecycle_absent_ready_idempotent_resumed_stale(tiny, monkeypatch):
    assert envs.status("tiny").state == "absent"
    with pytest.raises(envs.EnvMissingError, match="has not been set up.*`bench env setup tiny`"):
        envs.require("tiny")

    m = envs.setup("tiny")
    st = envs.status("tiny")
    assert st.state == "ready" and st.path == tiny / "envs" / "tiny"
    assert envs.require("tiny") == tiny / "envs" / "tiny" / "bin" / "python"
    assert m["key"] == TINY.key() and m["resumed"] is False and m["python"].startswith("3.")
    assert isinstance(m["freeze"], list)  # what is installed (nothing here: a bare venv)
    assert json.loads((st.path / envs.MANIFEST).read_text()) == m

    t0 = time.perf_counter()
    lines = []
    assert envs.setup("tiny", log=lines.append) == m  # idempotent: the same manifest, nothing redone
    assert time.perf_counter() - t0 < 1.0 and "ready at" in lines[0]

    # a half-made environment (setup interrupted before its manifest): detected, then resumed in place
    (st.path / envs.MANIFEST).unlink()
    assert envs.status("tiny").state == "incomplete"
    with pytest.raises(envs.EnvMissingError, match="half-made"):
        envs.require("tiny")
    marker = st.path / "kept.txt"
    marker.write_text("x")
    m2 = envs.setup("tiny")
    assert m2["resumed"] is True and marker.exists() and envs.status("tiny").ready

    # half-made with a broken interpreter: made afresh
    (st.path / envs.MANIFEST).unlink()
    (st.path / "bin" / "python").unlink()
    m3 = envs.setup("tiny")
    assert m3["resumed"] is False and not marker.exists() and envs.status("tiny").ready

    # other requirements than the manifest records: stale, removed and made again
    monkeypatch.setitem(envs.ENVS, "tiny", envs.EnvSpec("tiny", "changed", (), imports=("json", "csv")))
    assert envs.status("tiny").state == "stale"
    with pytest.raises(envs.EnvMissingError, match="other requirements"):
        envs.require("tiny")
    m4 = envs.setup("tiny")
    assert m4["key"] == envs.ENVS["tiny"].key() != m["key"] and envs.status("tiny").ready


def test_failed_setup_names_the_step_and_leaves_no_manifest(tiny, monkeypatch):
    monkeypatch.setitem(envs.ENVS, "tiny", envs.EnvSpec("tiny", "broken", (), imports=("no_such_module_xyz",)))
    with pytest.raises(envs.EnvError, match="(?s)importing no_such_module_xyz in tiny failed.*ModuleNotFoundError"):
        envs.setup("tiny")
    assert envs.status("tiny").state == "incomplete"


def test_worker_exchanges_files_in_isolation(tiny):
    envs.setup("tiny")
    script = tiny / "worker.py"
    script.write_text(WORKER)
    wd = tiny / "work"
    wd.mkdir()
    (wd / "nums.json").write_text(json.dumps([1, 2, 3.5]))
    os.environ["PYTHONPATH"] = os.getcwd()  # would leak the main environment into the worker if passed on
    try:
        res = envs.run_worker("tiny", script, {"op": "sum", "file": "nums.json"}, workdir=wd)
    finally:
        del os.environ["PYTHONPATH"]
    assert res["sum"] == 6.5
    assert res["prefix"] == str(tiny / "envs" / "tiny")  # its own interpreter
    assert not res["bench_importable"] and not res["torch_importable"]  # nothing of the main environment

    with pytest.raises(MissingWeightsError, match="needs foo.pt; fetch with `bench env fetch tiny`"):
        envs.run_worker("tiny", script, {"op": "weights"})
    with pytest.raises(envs.EnvWorkerError, match="(?s)failed .exit 1. without a result.*worker exploded on purpose"):
        envs.run_worker("tiny", script, {"op": "crash"})


def test_worker_in_missing_env_names_the_setup_command(tiny):
    with pytest.raises(envs.EnvMissingError, match=r"`bench env setup tiny`"):
        envs.run_worker("tiny", tiny / "w.py", {})
    with pytest.raises(envs.EnvMissingError, match=r"`bench vbench setup`"):
        envs.require("vbench")


def test_cli_env_status_and_unknown_name(tiny, capsys):
    from bench.cli import main

    assert main(["env", "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["state"] for r in rows}["vbench"] == "absent"
    assert {r["name"]: r["setup"] for r in rows}["imagereward"] == "bench env setup imagereward"
    with pytest.raises(SystemExit):
        main(["env", "setup", "nonexistent"])
