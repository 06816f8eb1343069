"""Committed networks: their options (a weights file, the deployment options) and their loading,
shared by the registered embedded models (bench.models, bench.models.video) without importing the
package that registers them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pydantic import Field

from bench.io import load_weights
from bench.models.options import DeployOptions, ModelOptions
from bench.paths import ASSETS


class WeightsOptions(ModelOptions):
    weights: str = Field(
        None, min_length=1, max_length=4096, description="path to a safetensors file (default: the committed one)"
    )  # type: ignore[assignment]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _train_fix(name: str) -> str:
    return f"restore it with `git checkout -- bench/assets/{name}.safetensors` or retrain with `bench train {name}`"


def load_net(name: str, net: torch.nn.Module, weights: str | Path | None = None) -> tuple[torch.nn.Module, str]:
    path = Path(weights) if weights else ASSETS / f"{name}.safetensors"
    load_weights(net, path, _train_fix(name))
    return net.eval().requires_grad_(False), _file_hash(path)


class DigitsOptions(WeightsOptions, DeployOptions):
    """A digits teacher's options: its weights file and the deployment options."""
