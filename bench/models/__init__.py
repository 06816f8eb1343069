"""Registered models: each entry builds a :class:`ModelBundle` (a denoiser plus what metrics need)."""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from pydantic import Field

from bench.bundle import Capabilities, ModelBundle
from bench.data import IMAGE_SIZE, NUM_CLASSES
from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.models.committed import DigitsOptions, WeightsOptions, _file_hash, _train_fix, load_net  # noqa: F401  (re-exported)
from bench.models.digits_nets import NULL_CLASS, DigitsClassifier, DigitsDiT, DigitsUNet
from bench.models.gmm import GaussianMixture, GMMNet, gmm_schedule
from bench.models.options import (
    DEPLOY_KEYS,
    RUNTIME_KEYS,
    Deploy,
    DeployError,
    DeployOptions,
    ModelOptions,
    deploy_network,
)
from bench.registry import MODELS


class GMMOptions(ModelOptions):
    dim: int = Field(2, ge=2, le=4096, description="int, 2 to 4096 (default 2)")
    prediction: Literal["eps", "flow"] = Field("eps", description="'eps' (VP) or 'flow' (default 'eps')")


@MODELS.register(
    "gmm",
    kind="eps|flow",
    data="vector",
    capabilities=lambda o: Capabilities(
        "analytic", "vector", o.get("prediction", "eps"), "none", _schedule(o.get("prediction", "eps")), "none"
    ),
    description="analytic Gaussian mixture with exact score and exact PF-ODE endpoint (the solver oracle)",
    options=GMMOptions,
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
        arch="analytic",
        extra={"mixture": mix},
    )


@MODELS.register(
    "digits-unet",
    kind="eps",
    data="image",
    capabilities=Capabilities("unet", "image", "eps", "class", "vp", "cfg"),
    description="class-conditional diffusers UNet2DModel, eps-prediction, DDPM 1000 steps, CFG (1.1M params)",
    options=DigitsOptions,
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
    capabilities=Capabilities("dit", "image", "flow", "class", "flow", "cfg"),
    description="class-conditional rectified-flow FluxTransformer2DModel (2 double + 4 single blocks), CFG",
    options=DigitsOptions,
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
    options=WeightsOptions,
)


def _schedule(prediction: str) -> str:
    return "flow" if prediction == "flow" else "vp"


def model_capabilities(name: str, options: dict[str, Any]) -> Capabilities | None:
    """A model's capabilities from its registration and options, without building it; None when
    they cannot be known yet (a diffusers pipeline not on this machine)."""
    caps = MODELS.entry(name).meta.get("capabilities")
    if name == "diffusers":
        from bench.models.pipelines import pipeline_capabilities

        return pipeline_capabilities(str(options.get("pipeline", "")))
    return caps(options) if callable(caps) else caps


def model_kind(name: str, options: dict[str, Any]) -> str:
    """What a model predicts (eps, v, x0, flow), known before it is built; "" when unknown."""
    caps = model_capabilities(name, options)
    return caps.prediction if caps is not None else ""


def _deploy_options(name: str, entry: Any, options: dict[str, Any]) -> tuple[Deploy, dict[str, Any]]:
    """The deployment options (dtype, compile, channels_last: bench.models.options) and the rest."""
    deploy, rest = Deploy.split(options)
    schema = entry.meta.get("options")
    takes = isinstance(schema, type) and issubclass(schema, DeployOptions)
    given = [k for k in DEPLOY_KEYS if k in options]
    if given and not takes:
        raise DeployError(
            f"model {name!r} has no deployment options ({', '.join(given)}): it is not a network model; remove them"
        )
    return deploy, rest


def build_model(name: str, **options: Any) -> ModelBundle:
    """Build a registered generative model by name with its options; the deployment options
    (``dtype``, ``compile``, ``channels_last``: :mod:`bench.models.options`) are applied to its
    denoiser network here, outside the methods."""
    entry = MODELS.entry(name)
    if entry.meta.get("kind") == "classifier":
        raise ValueError(f"{name!r} is a feature network, not a generative model")
    from bench.latents import attach, split_options  # a `latents:` file: the start of every sample
    from bench.prompts import resolve_model_options  # a `prompts: {set: ...}` option: the set's verified prompts

    given = dict(options)
    options, prompt_set = resolve_model_options(given)
    options, latents = split_options(options)
    deploy, options = _deploy_options(name, entry, options)
    native = "dtype" in inspect.signature(entry.obj).parameters  # loads its weights in the dtype itself (a pipeline)
    bundle = entry.obj(**options, **({"dtype": deploy.dtype} if native else {}))
    deploy_network(bundle.denoiser.net, deploy, cast_weights=not native, cast_input=not native)
    bundle.extra["deploy"] = deploy
    bundle.options = {k: v for k, v in given.items() if k not in RUNTIME_KEYS}  # the artifacts' identity: same numbers
    if prompt_set is not None:
        bundle.extra["prompt_set"] = prompt_set.identity
        bundle.extra["prompt_categories"] = prompt_set.categories
    if latents is not None:
        attach(bundle, latents)
    return bundle


from bench.models import (  # noqa: E402, F401  (registration)
    pipelines,  # the real tier's `diffusers` model
    video,  # the embedded video teacher `moving-digits-dit` and its feature network
    video_pipelines,  # the `diffusers` model's video pipelines (Wan, LTX-Video, CogVideoX)
)
