"""ImageReward and HPS v2.1 (issue 16) run by their own packages in their own environments.

No model hub here: what is tested for real is the registration, the refusals, an absent
environment (naming ``bench env setup``) and, in the environments ``bench env setup`` made, the
absent-weights error naming the weights and ``bench env fetch`` (the packages imported in their
environment, the hub offline, nothing downloaded). The environments are kept in ``$BENCH_ENVS``
(default: the user's ``$BENCH_HOME/envs``), so they are made once (minutes: ``slow``).
"""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import envs
from bench.metrics import preference
from bench.metrics.base import MetricContext
from bench.registry import METRICS
from bench.weights import MissingWeightsError

USER_ENVS = Path(os.environ.get("BENCH_ENVS") or Path(os.environ.get("BENCH_HOME", "~/.cache/bench")).expanduser() / "envs")


def ctx(prompts=None) -> MetricContext:
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    return MetricContext(x, None, SimpleNamespace(name="tiny-sd", extra={}), prompts=prompts, bootstrap=5)


@pytest.mark.parametrize("metric,env", [("imagereward", "imagereward"), ("hpsv2_1", "hpsv2")])
def test_registered_refuse_without_prompts_and_absent_env(metric, env, tmp_path, monkeypatch):
    meta = METRICS.entry(metric).meta
    assert meta["higher_is_better"] and meta["consumes"] == ["images", "prompts"]
    assert f"bench env fetch {env}" in meta["weights"]
    with pytest.raises(ValueError, match="no prompts"):
        METRICS.get(metric)(ctx())
    monkeypatch.setenv("BENCH_ENVS", str(tmp_path))
    with pytest.raises(envs.EnvMissingError, match=f"has not been set up. Make it with `bench env setup {env}`"):
        METRICS.get(metric)(ctx(["a red cube"] * 3))


@pytest.mark.slow
@pytest.mark.parametrize(
    "metric,env,names",
    [
        ("imagereward", "imagereward", ("ImageReward.pt", "med_config.json", "bert-base-uncased")),
        ("hpsv2_1", "hpsv2", ("HPS_v2.1_compressed.pt", "CLIP-ViT-H-14-laion2B-s32B-b79K")),
    ],
)
def test_absent_weights_name_them_and_the_fetch_command(metric, env, names, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_ENVS", str(USER_ENVS))
    if not envs.status(env).ready and os.environ.get("BENCH_TEST_ENVS") != "build":
        # made cold, the two environments add ~9 min (hpsv2 ~7) to `make test`: over its budget on a fresh machine
        pytest.skip(f"environment {env} not set up here: `bench env setup {env}` (or BENCH_TEST_ENVS=build) runs this test")
    manifest = envs.setup(env, log=lambda s: print(s, file=sys.stderr))  # idempotent: made once, then cached
    assert manifest["key"] == envs.spec(env).key()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache, whatever the user has
    with pytest.raises(MissingWeightsError) as e:
        METRICS.get(metric)(ctx(["a red cube", "a cat", "a red cube"]))
    msg = str(e.value)
    assert all(n in msg for n in names), msg
    assert f"`bench env fetch {env}`" in msg
    assert preference.missing_weights(metric) and not any((tmp_path / "hf").rglob("*.pt"))
    assert "ImageReward" not in sys.modules and "hpsv2" not in sys.modules
