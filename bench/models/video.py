"""The embedded video teacher, ``moving-digits-dit``: a class-conditional rectified-flow
diffusers ``LatteTransformer3DModel`` trained on :mod:`bench.video_data`'s moving digits.

Latte alternates spatial transformer blocks (self-attention within a frame, then cross-attention to
the condition) with temporal blocks (self-attention across the frames of one patch position): the
separate spatial, temporal and cross attentions of the video DiTs the video caches (PAB and the
rest) were made for. The class label is the single condition token. Samples are (F, C, H, W)
= (8, 1, 16, 16); the network takes diffusers' (B, C, F, H, W), so it transposes at its edges.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import LatteTransformer3DModel
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from torch import nn

from bench.bundle import Capabilities, ModelBundle
from bench.denoiser import Denoiser, FlowSchedule
from bench.models.committed import DigitsOptions, WeightsOptions, load_net
from bench.models.norms import use_unit_affine_norms
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


class SpatioTemporalBlock(nn.Module):
    """One Latte layer as one unit: the spatial ``BasicTransformerBlock`` (self-attention within each
    frame, cross-attention to the condition) and then the temporal one (self-attention across the
    frames at each patch position). Hidden states enter and leave in the spatial layout
    (B*F, N, D), so a stack of these has one layout from its first input to its last output: the
    whole-stack residual caches (TeaCache, MagCache, FirstBlockCache) reuse it as they do on image
    transformers, and the attention caches (PAB, FasterCache) see ``spatial.attn1`` (spatial),
    ``spatial.attn2`` (cross) and ``temporal.attn1`` (temporal)."""

    def __init__(self, spatial: nn.Module, temporal: nn.Module, temporal_position: bool) -> None:
        super().__init__()
        self.spatial = spatial
        self.temporal = temporal
        self.temporal_position = temporal_position  # Latte adds the frame position embedding in layer 0 only

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        temb_temporal: torch.Tensor,
        num_frames: int,
        frame_position: torch.Tensor | None = None,
        temporal_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.spatial(hidden_states, None, encoder_hidden_states, None, temb, None, None)
        b, n, d = h.shape[0] // num_frames, h.shape[1], h.shape[2]
        h = h.reshape(b, num_frames, n, d).permute(0, 2, 1, 3).reshape(b * n, num_frames, d)
        if self.temporal_position and num_frames > 1 and frame_position is not None:
            h = h + frame_position[:, :num_frames].to(h.dtype)
        h = self.temporal(h, temporal_mask, None, None, temb_temporal, None, None)
        return h.reshape(b, n, num_frames, d).permute(0, 2, 1, 3).reshape(b * num_frames, n, d)

    def norm1(self, hidden_states: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The first sub-layer's timestep-modulated input (TeaCache's indicator), as the spatial block
        computes it: ``LayerNorm(h) * (1 + scale_msa) + shift_msa`` from its ada-norm-single table."""
        blk = self.spatial
        shift, scale = (blk.scale_shift_table[None] + emb.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)[:2]
        return blk.norm1(hidden_states) * (1 + scale) + shift


class LatteStack(nn.Module):
    """``LatteTransformer3DModel``'s modules and computation, with each spatial block and the
    temporal block after it grouped into one :class:`SpatioTemporalBlock` (``transformer_blocks``).
    Built from a diffusers ``LatteTransformer3DModel`` (its modules are taken over, not copied), it
    computes exactly what that model computes (``tests/test_video_caches.py`` checks this against
    the diffusers class on the same weights)."""

    # which attention layers are spatial, temporal and cross-attention, by name (PAB reads these;
    # diffusers' default patterns would take the temporal layers for spatial ones)
    attention_identifiers: ClassVar[dict[str, tuple[str, ...]]] = {
        "spatial": (r"\.spatial\.attn1$",),
        "temporal": (r"\.temporal\.attn1$",),
        "cross": (r"\.spatial\.attn2$",),
    }

    def __init__(self, latte: LatteTransformer3DModel) -> None:
        super().__init__()
        self.config = latte.config
        self.pos_embed = latte.pos_embed
        self.adaln_single = latte.adaln_single
        self.caption_projection = latte.caption_projection
        self.transformer_blocks = nn.ModuleList(
            SpatioTemporalBlock(s, t, temporal_position=i == 0)
            for i, (s, t) in enumerate(zip(latte.transformer_blocks, latte.temporal_transformer_blocks, strict=True))
        )
        self.norm_out = latte.norm_out
        self.scale_shift_table = latte.scale_shift_table
        self.proj_out = latte.proj_out
        self.register_buffer("temp_pos_embed", latte.temp_pos_embed, persistent=False)
        self.out_channels = latte.out_channels
        use_unit_affine_norms(self)  # same values, the faster CPU kernel (bench.models.norms)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temporal_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` (B, C, F, H, W) as diffusers' Latte takes them; returns the same layout."""
        b, c, f, height, width = hidden_states.shape
        p = self.config.patch_size
        # the patch embedding leaves (B*F, N, D) in a transposed layout; every norm of it would copy it again
        h = self.pos_embed(hidden_states.permute(0, 2, 1, 3, 4).reshape(-1, c, height, width)).contiguous()
        n = h.shape[1]
        temb, embedded = self.adaln_single(
            timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, batch_size=b, hidden_dtype=h.dtype
        )
        context = self.caption_projection(encoder_hidden_states)
        context = context.repeat_interleave(f, dim=0).view(-1, context.shape[-2], context.shape[-1])
        temb_spatial = temb.repeat_interleave(f, dim=0).view(-1, temb.shape[-1])
        temb_temporal = temb.repeat_interleave(n, dim=0).view(-1, temb.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context, temb_spatial, temb_temporal, f, self.temp_pos_embed, temporal_mask)
        embedded = embedded.repeat_interleave(f, dim=0).view(-1, embedded.shape[-1])
        shift, scale = (self.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        h = self.proj_out(self.norm_out(h) * (1 + scale) + shift)
        gh, gw = height // p, width // p
        h = h.reshape(-1, gh, gw, p, p, self.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", h).reshape(-1, self.out_channels, gh * p, gw * p)
        return out.reshape(b, f, self.out_channels, gh * p, gw * p).permute(0, 2, 1, 3, 4)


TransformerBlockRegistry.register(
    SpatioTemporalBlock, TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
)


def _renamed(key: str) -> str:
    """A state-dict key of the diffusers Latte layout (the committed file) in :class:`LatteStack`'s."""
    for old, part in (("transformer.transformer_blocks.", "spatial"), ("transformer.temporal_transformer_blocks.", "temporal")):
        if key.startswith(old):
            i, rest = key[len(old) :].split(".", 1)
            if rest.startswith(("spatial.", "temporal.")):
                return key  # already in LatteStack's layout
            return f"transformer.transformer_blocks.{i}.{part}.{rest}"
    return key


class MovingDigitsDiT(nn.Module):
    """``net(x, t, cond) -> velocity`` for clips ``x`` (B, F, C, H, W) around a small
    ``LatteTransformer3DModel``; t is diffusers' flow timestep in [0, 1000] (Latte's timestep
    embedding takes it as it is); ``cond`` the class labels (None: the null class)."""

    arch = "video-dit"

    def __init__(self, **config: Any) -> None:
        """``config`` overrides :data:`LATTE_CONFIG` (a wider random-weight variant for benchmarks;
        the committed weights fit the default)."""
        super().__init__()
        self.transformer = LatteStack(LatteTransformer3DModel(**{**LATTE_CONFIG, **config}))
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
        )
        return out.transpose(1, 2)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Loads both layouts: :class:`LatteStack`'s and the diffusers Latte layout the committed file has."""
        return super().load_state_dict({_renamed(k): v for k, v in state_dict.items()}, strict=strict, assign=assign)


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
