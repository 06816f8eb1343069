"""bench.models.norms: the teachers' affine-free LayerNorms run PyTorch's affine CPU kernel with a unit
scale and zero shift, which gives the same values bit for bit as the affine-free kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.models import build_model
from bench.models.norms import UnitAffineLayerNorm, use_unit_affine_norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [17, 64, 1152])
def test_unit_affine_kernel_equals_the_affine_free_one(dtype, width):
    g = torch.Generator().manual_seed(width)
    for scale, offset in ((1e-3, 0.0), (1.0, 5.0), (300.0, -2e3)):
        x = (torch.randn(3, 101, width, generator=g) * scale + offset).to(dtype)
        plain = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        fast = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        assert use_unit_affine_norms(fast) == 1 and isinstance(fast, UnitAffineLayerNorm)
        assert torch.equal(fast(x), plain(x))


def test_affine_norms_are_left_alone():
    m = nn.Sequential(nn.LayerNorm(8), nn.LayerNorm(8, elementwise_affine=False))
    assert use_unit_affine_norms(m) == 1
    assert type(m[0]) is nn.LayerNorm and type(m[1]) is UnitAffineLayerNorm


@pytest.mark.parametrize("name", ["digits-dit", "moving-digits-dit"])
def test_the_dit_teachers_use_it(name):
    net = build_model(name).denoiser.net
    norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm) and not m.elementwise_affine]
    assert norms and all(type(m) is UnitAffineLayerNorm for m in norms)
