import pytest
import torch
from helpers import job, random_bundle, tiny_suite

from bench.io import WeightsError, load_weights, save_weights
from bench.models.digits_nets import DigitsClassifier
from bench.worker import NonFiniteSamples, run_job


def test_corrupt_weights_name_file_and_fix(tmp_path):
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match=r"corrupt or not safetensors.*Fix: retrain"):
        load_weights(DigitsClassifier(), p, "retrain")


def test_missing_and_mismatched_weights(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        load_weights(DigitsClassifier(), tmp_path / "absent.safetensors", "fetch it")
    p = tmp_path / "w.safetensors"
    save_weights(p, {"something.else": torch.zeros(3)})
    with pytest.raises(WeightsError, match="do not fit DigitsClassifier"):
        load_weights(DigitsClassifier(), p, "retrain")


def test_nan_samples_fail_with_a_clear_error():
    b = random_bundle("eps")
    b.denoiser.net.forward = lambda x, t, cond: torch.full_like(x, float("nan"))
    with pytest.raises(NonFiniteSamples, match="contain NaN/inf.*lower the guidance or raise the steps"):
        run_job(job("ddim", 3, 1.0, 4, 4), b, tiny_suite())
