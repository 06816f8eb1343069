"""The embedded video teacher, ``moving-digits-dit``: a class-conditional rectified-flow
diffusers ``LatteTransformer3DModel`` trained on :mod:`bench.video_data`'s moving digits.

Latte alternates spatial transformer blocks (self-attention within a frame, then cross-attention to
the condition) with temporal blocks (self-attention across the frames of one patch position): the
separate spatial, temporal and cross attentions of the video DiTs the video caches (PAB and the
rest) were made for. The class label is the single condition token. Samples are (F, C, H, W)
= (8, 1, 16, 16); the network takes diffusers' (B, C, F, H, W), so it transposes at its edges.
"""

from __future__ import annotations

import torch
from diffusers import LatteTransformer3DModel
from torch import nn

from bench.bundle import Capabilities, ModelBundle
from bench.denoiser import Denoiser, FlowSchedule
from bench.models.committed import DigitsOptions, WeightsOptions, load_net
from bench.registry import MODELS
from bench.video_data import CANVAS, FRAMES, NUM_CLASSES, VIDEO_SHAPE

NULL_CLASS = NUM_CLASSES  # the label trained as "no class" for classifier-free guidance
NAME = "moving-digits-dit"

LATTE_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=1,
    out_channels=1,
    num_layers=3,
    cross_attention_dim=64,  # = heads * head_dim: the caption projection's width
    sample_size=CANVAS,
    patch_size=2,
    activation_fn="gelu-approximate",
    norm_type="ada_norm_single",
    num_embeds_ada_norm=1000,
    caption_channels=64,
    video_length=FRAMES,
)


class MovingDigitsDiT(nn.Module):
    """``net(x, t, cond) -> velocity`` for clips ``x`` (B, F, C, H, W) around a small
    ``LatteTransformer3DModel``; t is diffusers' flow timestep in [0, 1000] (Latte's timestep
    embedding takes it as it is); ``cond`` the class labels (None: the null class)."""

    arch = "video-dit"

    def __init__(self) -> None:
        super().__init__()
        self.transformer = LatteTransformer3DModel(**LATTE_CONFIG)
        self.class_token = nn.Embedding(NUM_CLASSES + 1, LATTE_CONFIG["caption_channels"])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"moving-digits-dit takes clips (B, F, C, H, W), got shape {tuple(x.shape)}")
        b = x.shape[0]
        if cond is None:
            cond = torch.full((b,), NULL_CLASS, dtype=torch.long, device=x.device)
        out = self.transformer(
            hidden_states=x.transpose(1, 2),
            timestep=t.to(x.dtype).expand(b),
            encoder_hidden_states=self.class_token(cond)[:, None],
            return_dict=False,
        )[0]
        return out.transpose(1, 2)


def _weights_fix() -> str:
    return f"restore it with `git checkout -- bench/assets/{NAME}.safetensors` or retrain with `bench train {NAME}`"


@MODELS.register(
    NAME,
    kind="flow",
    data="video",
    capabilities=Capabilities("video-dit", "video", "flow", "class", "flow", "cfg"),
    description="class-conditional rectified-flow LatteTransformer3DModel (3 spatial + 3 temporal blocks) on "
    "8x16x16 moving digits, CFG",
    options=DigitsOptions,  # the digits teachers' options: a weights file and the deployment options
)
def moving_digits_dit(weights: str | None = None) -> ModelBundle:
    net, h = load_net(NAME, MovingDigitsDiT(), weights)
    sch = FlowSchedule()
    return ModelBundle(
        NAME, Denoiser(net, "flow", sch, NULL_CLASS), VIDEO_SHAPE, "video", NUM_CLASSES, weights_hash=h, arch="video-dit"
    )


class MovingDigitsClassifier(nn.Module):
    """A small 3D CNN on clips (B, F, 1, H, W): ``features`` (64-d, penultimate) is the offline
    FVD feature space; ``forward`` gives the digit's class logits (10) and its initial velocity's
    logits (16: the index of vx in SPEEDS times 4 plus that of vy), so the features see motion as
    well as appearance."""

    FEATURE_DIM = 64
    VELOCITY_CLASSES = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv3d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2),
        )
        self.fc = nn.Linear(64 * (FRAMES // 2) * (CANVAS // 4) ** 2, self.FEATURE_DIM)
        self.head = nn.Linear(self.FEATURE_DIM, NUM_CLASSES + self.VELOCITY_CLASSES)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"the moving-digits classifier takes clips (B, F, C, H, W), got shape {tuple(x.shape)}")
        return torch.relu(self.fc(self.conv(x.transpose(1, 2)).flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.dropout(self.features(x)))
        return out[:, :NUM_CLASSES], out[:, NUM_CLASSES:]


def moving_digits_classifier(weights: str | None = None) -> MovingDigitsClassifier:
    """The feature network for the FVD-style distance and class adherence on moving digits."""
    return load_net("moving-digits-features", MovingDigitsClassifier(), weights)[0]


MODELS.add(
    "moving-digits-features",
    moving_digits_classifier,
    kind="classifier",
    data="video",
    description="moving-digits 3D CNN (digit class + velocity); 64-d penultimate features for the FVD-style distance",
    options=WeightsOptions,
)
