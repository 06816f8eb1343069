"""Registered models: each entry builds a :class:`ModelBundle` (a denoiser plus what metrics need)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.data import IMAGE_SIZE, NUM_CLASSES
from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.io import load_weights
from bench.models.digits_nets import NULL_CLASS, DigitsClassifier, DigitsDiT, DigitsUNet
from bench.models.gmm import GaussianMixture, GMMNet, gmm_schedule
from bench.paths import ASSETS
from bench.registry import MODELS


@dataclass
class ModelBundle:
    """What a method and the metrics need of a model."""

    name: str
    denoiser: Denoiser
    sample_shape: tuple[int, ...]
    data: str  # "image" or "vector"
    num_classes: int | None = None
    dtype: torch.dtype = torch.float32
    weights_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.denoiser.kind

    @property
    def t_start(self) -> float:
        """The native time every sampler starts from (trailing spacing: the noisiest step)."""
        sch = self.denoiser.schedule
        return float(sch.num_train_timesteps - 1) if isinstance(sch, VPSchedule) else float(sch.num_train_timesteps)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _train_fix(name: str) -> str:
    return f"restore it with `git checkout -- bench/assets/{name}.safetensors` or retrain with `bench train {name}`"


def load_net(name: str, net: torch.nn.Module, weights: str | Path | None = None) -> tuple[torch.nn.Module, str]:
    path = Path(weights) if weights else ASSETS / f"{name}.safetensors"
    load_weights(net, path, _train_fix(name))
    return net.eval().requires_grad_(False), _file_hash(path)


@MODELS.register(
    "gmm",
    kind="eps|flow",
    data="vector",
    description="analytic Gaussian mixture with exact score and exact PF-ODE endpoint (the solver oracle)",
    options={"dim": "int, 2 or more (default 2)", "prediction": "'eps' (VP) or 'flow' (default 'eps')"},
)
def gmm(dim: int = 2, prediction: str = "eps") -> ModelBundle:
    if prediction not in ("eps", "flow"):
        raise ValueError(f"gmm prediction must be 'eps' or 'flow', got {prediction!r}")
    if int(dim) < 2:
        raise ValueError(f"gmm dim must be at least 2, got {dim}")
    mix = GaussianMixture.preset(int(dim))
    sch = gmm_schedule(prediction)
    return ModelBundle(
        name="gmm",
        denoiser=Denoiser(GMMNet(mix, sch), prediction, sch),
        sample_shape=(int(dim),),
        data="vector",
        dtype=torch.float64,
        weights_hash=f"gmm-preset-{dim}",
        extra={"mixture": mix},
    )


@MODELS.register(
    "digits-unet",
    kind="eps",
    data="image",
    description="class-conditional diffusers UNet2DModel, eps-prediction, DDPM 1000 steps, CFG (1.1M params)",
    options={"weights": "path to a safetensors file (default: the committed one)"},
)
def digits_unet(weights: str | None = None) -> ModelBundle:
    net, h = load_net("digits-unet", DigitsUNet(), weights)
    sch = VPSchedule.linear()
    return ModelBundle(
        "digits-unet", Denoiser(net, "eps", sch, NULL_CLASS), (1, IMAGE_SIZE, IMAGE_SIZE), "image", NUM_CLASSES, weights_hash=h
    )


@MODELS.register(
    "digits-dit",
    kind="flow",
    data="image",
    description="class-conditional rectified-flow FluxTransformer2DModel (2 double + 4 single blocks), CFG",
    options={"weights": "path to a safetensors file (default: the committed one)"},
)
def digits_dit(weights: str | None = None) -> ModelBundle:
    net, h = load_net("digits-dit", DigitsDiT(), weights)
    sch = FlowSchedule()
    return ModelBundle(
        "digits-dit", Denoiser(net, "flow", sch, NULL_CLASS), (1, IMAGE_SIZE, IMAGE_SIZE), "image", NUM_CLASSES, weights_hash=h
    )


def digits_classifier(weights: str | None = None) -> DigitsClassifier:
    """The feature network for FID/KID and class adherence (not a generative model)."""
    return load_net("digits-features", DigitsClassifier(), weights)[0]


MODELS.add(
    "digits-features",
    digits_classifier,
    kind="classifier",
    data="image",
    description="digits CNN classifier; 64-d penultimate features for FID/KID, probabilities for class adherence",
    options={"weights": "path to a safetensors file (default: the committed one)"},
)


def model_kind(name: str, options: dict[str, Any]) -> str:
    """The prediction kind a model's options select, without building it: its registered kind, or
    for a model registered with several (``eps|flow``), the one its options name (gmm's
    ``prediction``; a diffusers pipeline's scheduler config, "" while the pipeline is not here)."""
    kind = MODELS.entry(name).meta["kind"]
    if name == "diffusers":
        from bench.models.pipelines import pipeline_kind

        return pipeline_kind(str(options.get("pipeline", "")))
    return options.get("prediction", "eps") if "|" in kind else kind


def build_model(name: str, **options: Any) -> ModelBundle:
    """Build a registered generative model by name with its options."""
    entry = MODELS.entry(name)
    if entry.meta.get("kind") == "classifier":
        raise ValueError(f"{name!r} is a feature network, not a generative model")
    return entry.obj(**options)


from bench.models import pipelines  # noqa: E402, F401  (registers the real tier's `diffusers` model)
