"""Small adjustments that let diffusers' cache hooks run on the real tier's transformers.

Imported lazily by :mod:`bench.models.pipelines` (it imports diffusers). Nothing here changes what
a network computes:

- SD3's last joint block (``context_pre_only``) returns ``None`` for the text stream, which the
  transformer then discards; diffusers' FirstBlockCache hook subtracts that output from the first
  block's and fails. :class:`JointTailBlock` returns the text stream it was given instead (still
  discarded by the transformer), so the hook records a residual and the image stream, the only one
  that reaches the output, is unchanged.
- diffusers' block registry (which its hooks read each block's output layout from) does not list
  SANA's ``SanaTransformerBlock``; it returns the image stream alone, so it is registered as such.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.attention import JointTransformerBlock
from torch import nn


class JointTailBlock(JointTransformerBlock):
    """SD3's last joint block, returning the incoming text stream in place of ``None``."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context, hidden = super().forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        return (encoder_hidden_states if context is None else context), hidden


def _register(cls: type, like: type | None, hidden_index: int, context_index: int | None) -> None:
    try:
        TransformerBlockRegistry.get(cls)
        return
    except ValueError:
        pass
    if like is not None:
        ref = TransformerBlockRegistry.get(like)
        hidden_index, context_index = ref.return_hidden_states_index, ref.return_encoder_hidden_states_index
    TransformerBlockRegistry.register(
        cls, TransformerBlockMetadata(return_hidden_states_index=hidden_index, return_encoder_hidden_states_index=context_index)
    )


def prepare_for_hooks(transformer: nn.Module) -> None:
    """Make ``transformer``'s blocks usable by diffusers' cache hooks (see the module docstring);
    its weights, its state dict and what it computes stay as they were."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return
    last = blocks[-1]
    if type(last) is JointTransformerBlock and getattr(last, "context_pre_only", False):
        _register(JointTailBlock, JointTransformerBlock, 1, 0)
        last.__class__ = JointTailBlock
    try:
        from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
    except ImportError:  # an older diffusers without SANA
        return
    if any(type(b) is SanaTransformerBlock for b in blocks):
        _register(SanaTransformerBlock, None, 0, None)
