"""VBench through its own environment (issue 15, acceptance 2): temporal flickering of a few
generated clips computed by vbench's evaluation (custom_input mode) in the environment that
``bench vbench setup`` makes equals vbench's own function called directly there; the main
environment never imports vbench; absent weights and an absent environment name their commands.

The environment is made once and kept in ``$BENCH_ENVS`` (default: the user's
``$BENCH_HOME/envs``, read before the test session moves ``BENCH_HOME`` to a temporary home), so CI
caches it there; made cold it takes minutes (hence ``slow``, still run by ``make test``).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import envs
from bench.metrics import vbench as vb
from bench.metrics.base import MetricContext
from bench.registry import METRICS
from bench.weights import MissingWeightsError

# read at collection, before tests/conftest.py points BENCH_HOME at a temporary directory
USER_ENVS = Path(os.environ.get("BENCH_ENVS") or Path(os.environ.get("BENCH_HOME", "~/.cache/bench")).expanduser() / "envs")

DIRECT = """
import json, sys
from pathlib import Path
from vbench.temporal_flickering import temporal_flickering
req = json.loads(Path(sys.argv[1]).read_text())
total, per = temporal_flickering(req["videos"])
Path(sys.argv[2]).write_text(json.dumps({"ok": True, "total": float(total),
    "per_video": {r["video_path"]: float(r["video_results"]) for r in per},
    "modules": sorted(m for m in ("vbench", "numpy", "transformers") if m in sys.modules),
    "versions": {m: __import__(m).__version__ for m in ("numpy", "transformers", "timm", "torch")}}))
"""


def clips(n: int = 4, frames: int = 12, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, frames, 3, size, size) in [-1, 1]: a bright square moving over a noisy background, and
    one clip that flickers (its background alternates between dark and light frames)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, frames, 3, size, size), -0.6) + 0.1 * torch.randn(n, frames, 3, size, size, generator=g)
    for i in range(n):
        for t in range(frames):
            left = 2 + (i + 1) * t % (size - 10)
            x[i, t, :, 10:18, left : left + 8] = 0.9
    x[-1, 1::2] += 1.0  # the flickering clip
    return x.clamp(-1, 1)


@pytest.fixture(scope="module")
def vbench_env():
    old = os.environ.get("BENCH_ENVS")
    os.environ["BENCH_ENVS"] = str(USER_ENVS)
    try:
        manifest = envs.setup("vbench", log=lambda s: print(s, file=sys.stderr))  # idempotent: cached after once
        yield manifest
    finally:
        if old is None:
            os.environ.pop("BENCH_ENVS", None)
        else:
            os.environ["BENCH_ENVS"] = old


def test_absent_environment_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_ENVS", str(tmp_path))
    with pytest.raises(envs.EnvMissingError, match=r"'vbench' .* has not been set up\. Make it with `bench vbench setup`"):
        vb.evaluate(clips(2), ["temporal_flickering"])
    with pytest.raises(KeyError, match="temporal_flickering"):  # unknown names get the closest valid ones
        vb.evaluate(clips(2), ["temporal_flicker"])
    with pytest.raises(ValueError, match="prompt"):
        vb.evaluate(clips(2), ["overall_consistency"])
    assert METRICS.entry("vbench_temporal_flickering").meta["data"] == "video"


@pytest.mark.slow
def test_temporal_flickering_through_vbench_equals_vbench_direct(vbench_env, tmp_path):
    # the environment holds vbench's own pins, recorded in its manifest
    assert "vbench==0.1.5" in vbench_env["freeze"] and "transformers==4.33.2" in vbench_env["freeze"]
    assert "vbench.background_consistency" in envs.spec("vbench").imports  # every dimension's module imported at setup
    numpy_version = envs.installed_version("vbench", "numpy")
    assert numpy_version is not None and int(numpy_version.split(".")[0]) < 2

    x = clips()
    (row,) = vb.evaluate(x, ["temporal_flickering"], fps=8, workdir=tmp_path)
    assert row.dimension == "temporal_flickering" and len(row.per_video) == len(x)
    mp4s = sorted(str(p) for p in (tmp_path / "videos").glob("*.mp4"))
    assert len(mp4s) == len(x) and sorted(row.files) == mp4s

    # vbench's own function, called directly in the same environment on the same MP4 files, in the
    # order vbench's evaluation read them (its total is a float sum: the order sets its last bit)
    script = tmp_path / "direct.py"
    script.write_text(DIRECT)
    direct = envs.run_worker("vbench", script, {"videos": list(row.files)})
    assert direct["total"] == row.value
    assert [direct["per_video"][p] for p in mp4s] == list(row.per_video)
    assert direct["versions"]["numpy"].startswith("1.") and direct["versions"]["transformers"] == "4.33.2"

    # the numbers mean something: every clip scores in (0, 1], the flickering one lowest by far
    v = row.values
    assert np.all((v > 0) & (v <= 1))
    assert v[-1] < v[:-1].min() - 0.1 and v[:-1].min() > 0.9

    # the registered metric gives the same value (the mean of vbench's per-clip values) ...
    ctx = MetricContext(x, None, SimpleNamespace(name="clips", extra={"fps": 8}), bootstrap=20)
    mv = METRICS.get("vbench_temporal_flickering")(ctx)
    assert mv.value == pytest.approx(row.value, abs=1e-12) and mv.ci_low <= mv.value <= mv.ci_high
    # ... and the main environment never imported vbench, nor could it
    assert not any(m == "vbench" or m.startswith("vbench.") for m in sys.modules)
    assert importlib.util.find_spec("vbench") is None


@pytest.mark.slow
def test_dimension_without_weights_names_them_and_the_fetch_command(vbench_env, tmp_path, monkeypatch):
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "vbench-cache"))  # an empty cache, whatever the user has
    with pytest.raises(MissingWeightsError) as e:
        vb.evaluate(clips(2), ["temporal_flickering", "subject_consistency", "dynamic_degree"])
    msg = str(e.value)
    assert "dino_vitbase16_pretrain.pth" in msg and "raft_model" in msg
    assert "`bench vbench fetch subject_consistency dynamic_degree`" in msg
    assert "temporal_flickering:" not in msg  # needs no weights
    assert not list((tmp_path / "vbench-cache").rglob("*.pth"))  # nothing downloaded behind our back
    missing = vb.missing_weights(["temporal_flickering", "background_consistency"])
    assert list(missing) == ["background_consistency"] and "ViT-B-32.pt" in missing["background_consistency"][0]


@pytest.mark.slow
def test_cli_vbench_setup_is_idempotent_and_status_lists_weights(vbench_env, monkeypatch, tmp_path, capsys):
    from bench.cli import main

    monkeypatch.setenv("BENCH_ENVS", str(USER_ENVS))
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "vbench-cache"))
    assert main(["vbench", "setup"]) == 0
    assert "vbench: ready" in capsys.readouterr().out
    assert main(["vbench", "status", "temporal_flickering", "motion_smoothness"]) == 0
    out = capsys.readouterr().out
    assert "temporal_flickering" in out and "ready" in out and "amt-s.pth" in out
    assert "`bench vbench fetch motion_smoothness`" in out
    assert main(["vbench", "fetch", "temporal_flickering"]) == 0  # nothing to download: vbench's downloader is a no-op
    assert str(tmp_path / "vbench-cache") in capsys.readouterr().out
    assert json.loads((USER_ENVS / "vbench" / envs.MANIFEST).read_text())["name"] == "vbench"
