"""The digits networks: a class-conditional diffusers UNet (eps), a small Flux transformer
(rectified-flow velocity) and a CNN classifier whose penultimate layer is the FID feature space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, UNet2DModel
from torch import nn

from bench.data import IMAGE_SIZE, NUM_CLASSES
from bench.models.norms import use_unit_affine_norms

NULL_CLASS = NUM_CLASSES  # the label trained as "no class" for classifier-free guidance

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=NUM_CLASSES + 1,
    norm_num_groups=8,
    attention_head_dim=16,
)

FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)
PACK = 2  # 2x2 pixels per token, as the Flux pipeline packs latents


class DigitsUNet(nn.Module):
    """``net(x, t, cond) -> eps`` around a diffusers ``UNet2DModel`` with a class embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = UNet2DModel(**UNET_CONFIG)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            cond = torch.full((x.shape[0],), NULL_CLASS, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=cond).sample


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> (B, H/2*W/2, C*4) tokens."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.view(b, h // PACK, w // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Flux's (0, row, col) position ids for the packed image tokens."""
    ids = torch.zeros(h // PACK, w // PACK, 3)
    ids[..., 1] = torch.arange(h // PACK)[:, None]
    ids[..., 2] = torch.arange(w // PACK)[None, :]
    return ids.reshape(-1, 3)


class DigitsDiT(nn.Module):
    """``net(x, t, cond) -> velocity`` around a small ``FluxTransformer2DModel``.

    The class label is the single text token (``encoder_hidden_states``) and the pooled vector;
    t is diffusers' flow timestep in [0, 1000] (the transformer takes t / 1000, as FluxPipeline).
    """

    def __init__(self) -> None:
        super().__init__()
        self.transformer = FluxTransformer2DModel(**FLUX_CONFIG)
        use_unit_affine_norms(self.transformer)  # same values, the faster CPU kernel (bench.models.norms)
        self.class_token = nn.Embedding(NUM_CLASSES + 1, FLUX_CONFIG["joint_attention_dim"])
        self.class_pooled = nn.Embedding(NUM_CLASSES + 1, FLUX_CONFIG["pooled_projection_dim"])
        self.register_buffer("img_ids", image_ids(IMAGE_SIZE, IMAGE_SIZE), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(1, 3), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        if cond is None:
            cond = torch.full((b,), NULL_CLASS, dtype=torch.long, device=x.device)
        out = self.transformer(
            hidden_states=pack(x),
            encoder_hidden_states=self.class_token(cond)[:, None],
            pooled_projections=self.class_pooled(cond),
            timestep=t.to(x.dtype) / 1000,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]
        return unpack(out, c, h, w)


class DigitsClassifier(nn.Module):
    """A small CNN; ``features`` (64-d, penultimate) is the offline FID/KID feature space."""

    FEATURE_DIM = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 4 * 4, self.FEATURE_DIM)
        self.head = nn.Linear(self.FEATURE_DIM, NUM_CLASSES)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
