import json

import pytest

from bench.cli import main
from bench.registry import METHODS, MODELS, Registry, UnknownNameError


def test_unknown_name_lists_closest():
    with pytest.raises(UnknownNameError) as e:
        METHODS.get("dpmpp2m")
    assert "dpmpp_2m" in e.value.close
    assert "did you mean 'dpmpp_2m'" in str(e.value)


def test_duplicate_registration_fails():
    r = Registry("thing")
    r.add("a", object())
    with pytest.raises(ValueError, match="registered twice"):
        r.add("a", object())


def test_list_methods_json(capsys):
    assert main(["list", "methods", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    for name in ("ddim", "euler", "dpmpp_2m"):
        assert entries[name]["family"] == "solver"
        assert entries[name]["training"] == "free"
        assert entries[name]["paper"]
        assert entries[name]["applies_to"]
    assert entries["ddim"]["knobs"]["eta"]["range"] == [0.0, 1.0]


def test_list_models(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    for name in ("gmm", "digits-unet", "digits-dit"):
        assert name in out
    assert set(MODELS.names()) >= {"gmm", "digits-unet", "digits-dit", "digits-features"}


def test_method_on_wrong_model_kind_is_an_error():
    from bench.adapter import MethodNotApplicable
    from bench.models import build_model

    with pytest.raises(MethodNotApplicable, match="flow"):
        METHODS.get("ddim")().prepare(build_model("gmm", prediction="flow"), 5)
