"""FID, KID, precision/recall and Inception Score with clean-fid's Inception (the real tier).

The network is clean-fid's TorchScript Inception-v3 (``inception-2015-12-05.pt``, the weights of
the TF FID code), loaded from the weights catalogue. Images follow clean-fid's ``clean`` mode:
quantised to uint8 as saved images are, resized to 299x299 with PIL bicubic on each float
channel (``cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))``), then
normalised to [-1, 1] as clean-fid's ``InceptionV3W`` does. Inception Score uses the softmax of
the 1008-way output layer without its bias, as StyleGAN2-ADA computes it.

``fid_mlperf`` is FID as MLPerf Inference's SDXL accuracy script computes it (``tools/fid``, a
pytorch-fid port): the same Inception weights, images resized with bilinear ``F.interpolate`` to
299x299 (clean-fid's ``legacy_pytorch`` resize) and normalised as ``2 x / 255 - 1``, compared with
precomputed statistics (their ``val2014.npz``, imported with ``bench ref import``). The network
is clean-fid's TorchScript export of that TF graph, not pytorch-fid's port of it: close, not bit
for bit the same features.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from cleanfid.resize import make_resizer

from bench.metrics.base import MetricContext, Statistic, images_uint8, register_metric
from bench.metrics.formulas import (
    FrechetToReference,
    KernelToReference,
    inception_score_statistic,
    precision_statistic,
    recall_statistic,
)
from bench.metrics.refs import FeatureSpace, load, note_reference, register_space, require_features, sha_file

WEIGHTS = "inception-2015-12-05"
SPACE = "inception"
SIZE = 299


@lru_cache(maxsize=2)
def _load(path: str) -> torch.jit.ScriptModule:
    return torch.jit.load(path, map_location="cpu").eval()


def network(metric: str | None = None) -> torch.jit.ScriptModule:
    """The TorchScript Inception (``.layers``: 299x299 normalised images -> 2048 features;
    ``.output``: the 1008-way classifier)."""
    from bench.weights import require

    return _load(str(require(WEIGHTS, metric)))


def to_hwc_uint8(images: torch.Tensor | list[np.ndarray]) -> list[np.ndarray]:
    """[-1,1] tensors (N,C,H,W) or a list of uint8 (H,W,3) arrays -> a list of uint8 (H,W,3) arrays."""
    if isinstance(images, torch.Tensor):
        return list(images_uint8(images).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return [np.asarray(im, dtype=np.uint8) for im in images]


def clean_resize(images: list[np.ndarray]) -> torch.Tensor:
    """clean-fid's ``clean`` resize of each uint8 image to (3, 299, 299) float in [0, 255]."""
    resize = make_resizer("PIL", False, "bicubic", (SIZE, SIZE))
    return torch.stack([torch.from_numpy(resize(im).transpose(2, 0, 1).copy()) for im in images])


def pytorch_fid_resize(images: list[np.ndarray]) -> torch.Tensor:
    """pytorch-fid's resize (MLPerf's FID): bilinear ``F.interpolate`` to 299x299, align_corners=False, on
    the float image, as clean-fid's ``legacy_pytorch`` mode makes it; (3, 299, 299) in [0, 255]."""
    resize = make_resizer("PyTorch", False, "bilinear", (SIZE, SIZE))
    return torch.stack(
        [torch.from_numpy(np.ascontiguousarray(resize(im).transpose(2, 0, 1)).astype(np.float32)) for im in images]
    )


# how images reach the network: resize, then the normalisation to [-1, 1] of that code base
MODES = {
    "clean": (clean_resize, lambda x: (x - 128) / 128),  # clean-fid's InceptionV3W
    "pytorch-fid": (pytorch_fid_resize, lambda x: x / 255 * 2 - 1),  # pytorch-fid's normalize_input (MLPerf's fid_score.py)
}


@torch.no_grad()
def features_probs(
    images: torch.Tensor | list[np.ndarray],
    net: torch.jit.ScriptModule | None = None,
    batch: int = 64,
    device: str = "cpu",
    mode: str = "clean",
) -> tuple[np.ndarray, np.ndarray]:
    """2048-d pool features (float64) and 1008-way class probabilities (no output bias); ``mode``:
    how images are resized and normalised (:data:`MODES`)."""
    net = (net if net is not None else network()).to(device)
    resize, normalise = MODES[mode]
    ims = to_hwc_uint8(images)
    feats, probs = [], []
    for lo in range(0, len(ims), batch):
        x = resize(ims[lo : lo + batch]).to(device)
        f = net.layers(normalise(x)).reshape(len(x), -1)
        feats.append(f.double().cpu())
        logits = f @ net.output.weight.T
        probs.append(torch.softmax(logits.double(), 1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _extract(images: torch.Tensor | list[np.ndarray], device: str = "cpu") -> np.ndarray:
    return features_probs(images, device=device)[0]


def _network_id() -> str:
    from bench.weights import require

    return sha_file(require(WEIGHTS))


FEATURE_SPACE = register_space(
    FeatureSpace(SPACE, "2048-d pool features of clean-fid's Inception (clean resize)", _extract, _network_id)
)
MLPERF_SPACE = "inception-pytorch-fid"
register_space(
    FeatureSpace(
        MLPERF_SPACE,
        "2048-d pool features of the FID Inception with pytorch-fid's bilinear resize and normalisation (MLPerf's FID)",
        lambda images, device="cpu": features_probs(images, device=device, mode="pytorch-fid")[0],
        _network_id,
    )
)


def _gen(ctx: MetricContext, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if "inception" not in ctx.cache:
        ctx.cache["inception"] = features_probs(ctx.samples, network(metric), device=ctx.device)
    return ctx.cache["inception"]


def _refset(ctx: MetricContext, metric: str) -> str:
    name = ctx.refset or ctx.bundle.extra.get("refset")
    if not name:
        raise ValueError(
            f"{metric} needs a reference set: add `reference_set: NAME` to the suite "
            "(a folder of real images becomes one with `bench ref build NAME --images DIR --features inception`)"
        )
    return name


def _ref(ctx: MetricContext, metric: str):
    network(metric)  # the weights first: their absence is the error to report
    return note_reference(ctx.cache, load(_refset(ctx, metric), SPACE))


def _register(name: str, higher: bool, description: str, reference: bool = True):
    return register_metric(
        name,
        higher_is_better=higher,
        data="image",
        consumes=("images", "reference") if reference else ("images",),
        weights="clean-fid Inception-v3 (inception-2015-12-05.pt)",
        requires=(WEIGHTS,),
        description=description,
    )


@_register("fid_inception", False, "FID with clean-fid's Inception (clean resize) against the suite's reference set")
def fid_inception(ctx: MetricContext) -> Statistic:
    ref = _ref(ctx, "fid_inception")
    gen = _gen(ctx, "fid_inception")[0]
    fid_to_ref = FrechetToReference(ref.mu, ref.sigma)
    return Statistic(lambda idx: fid_to_ref(gen[idx]), len(gen), (0.0, np.inf))


@_register("kid_inception", False, "KID (x1e3) with clean-fid's Inception against the suite's reference set")
def kid_inception(ctx: MetricContext) -> Statistic:
    ref = require_features(_ref(ctx, "kid_inception"), "kid_inception")
    gen = _gen(ctx, "kid_inception")[0]
    kid_to_ref = KernelToReference(gen, ref, num_subsets=20)
    return Statistic(lambda idx: 1e3 * kid_to_ref(idx, ctx.seed), len(gen))


@_register("precision_inception", True, "improved precision (k=3) on Inception features against the reference set")
def precision_inception(ctx: MetricContext) -> Statistic:
    ref = require_features(_ref(ctx, "precision_inception"), "precision_inception")
    return precision_statistic(_gen(ctx, "precision_inception")[0], ref)


@_register("recall_inception", True, "improved recall (k=3) on Inception features against the reference set")
def recall_inception(ctx: MetricContext) -> Statistic:
    ref = require_features(_ref(ctx, "recall_inception"), "recall_inception")
    return recall_statistic(_gen(ctx, "recall_inception")[0], ref)


@_register("is_inception", True, "Inception Score with clean-fid's Inception (1008-way softmax, no output bias)", reference=False)
def is_inception(ctx: MetricContext) -> Statistic:
    return inception_score_statistic(_gen(ctx, "is_inception")[1])


@_register(
    "fid_mlperf",
    False,
    "FID as MLPerf's SDXL accuracy script computes it: the FID Inception with pytorch-fid's bilinear resize, against the "
    "reference statistics in that space (MLPerf's val2014.npz: `bench ref import NAME --stats val2014.npz`)",
)
def fid_mlperf(ctx: MetricContext) -> Statistic:
    network("fid_mlperf")  # the weights first: their absence is the error to report
    ref = note_reference(ctx.cache, load(_refset(ctx, "fid_mlperf"), MLPERF_SPACE))
    if "inception_pytorch_fid" not in ctx.cache:
        ctx.cache["inception_pytorch_fid"] = features_probs(
            ctx.samples, network("fid_mlperf"), device=ctx.device, mode="pytorch-fid"
        )[0]
    gen = ctx.cache["inception_pytorch_fid"]
    fid_to_ref = FrechetToReference(ref.mu, ref.sigma)
    return Statistic(lambda idx: fid_to_ref(gen[idx]), len(gen), (0.0, np.inf))
