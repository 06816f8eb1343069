"""The committed digits networks are good enough to benchmark with."""

import json

import pytest
import torch

from bench.data import digits
from bench.metrics.digits import features_and_probs, fid_from_features, reference_features
from bench.models import build_model, digits_classifier
from bench.paths import ASSETS
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.train import classifier_accuracy

# Teacher FID (500 samples, 50 steps, no guidance) against the training digits may exceed the
# FID of the 500 held-out real digits against the same reference by at most this factor.
FID_BOUND = 1.5


def test_classifier_heldout_accuracy_at_least_97_percent():
    assert classifier_accuracy(digits_classifier(), "heldout") >= 0.97


def test_committed_records_describe_the_weights():
    total = 0
    for name in ("digits-unet", "digits-dit", "digits-features"):
        rec = json.loads((ASSETS / f"{name}.json").read_text())
        assert {"command", "seed", "steps", "wall_s", "final_loss"} <= set(rec)
        total += (ASSETS / f"{name}.safetensors").stat().st_size
    assert total < 20e6


@pytest.mark.slow
@pytest.mark.parametrize("model,method", [("digits-unet", "ddim"), ("digits-dit", "euler")])
def test_teacher_fid_within_bound_of_real_vs_real(model, method):
    ref = reference_features()
    real = features_and_probs(digits("heldout")[0])[0]
    real_vs_real = fid_from_features(real, ref)
    b = build_model(model)
    k = torch.arange(500)
    gens = generators(0, k.tolist())
    x = METHODS.get(method)().prepare(b, 50)(noise(gens, b.sample_shape), k % 10, 1.0, gens)
    feats, probs = features_and_probs(x)
    fid = fid_from_features(feats, ref)
    print(
        f"{model} {method}-50 FID {fid:.2f}, real-vs-real {real_vs_real:.2f}, class_acc {(probs.argmax(1) == (k % 10).numpy()).mean():.3f}"
    )
    assert fid <= FID_BOUND * real_vs_real
    assert (probs.argmax(1) == (k % 10).numpy()).mean() >= 0.9  # conditioning works without guidance
