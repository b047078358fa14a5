"""Tests of lowrank_vit/nn/vssm.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit.core.scan import selective_scan_reference
from lowrank_vit.nn.adapters import timm_with_our_models
from lowrank_vit.nn.vssm import cross_merge, cross_scan
from tests.helpers import make_vssm


def test_cross_merge_inverts_cross_scan_on_a_non_square_map():
    x = torch.randn(2, 3, 4, 7)
    paths = cross_scan(x)
    assert paths.shape == (2, 4, 3, 28)
    assert torch.equal(paths[:, 1, :, :4], x[:, :, :, 0])  # the second path reads the first column first
    assert torch.equal(paths[:, 2, :, 0], x[:, :, -1, -1])  # the third reads the rows backwards
    assert torch.allclose(cross_merge(paths, 4, 7), 4 * x)


def test_ss2d_matches_a_step_by_step_scan():
    op = make_vssm().layers[0].blocks[0].op
    x = torch.randn(2, 8, 8, 12)
    with torch.no_grad():
        b, h, w, _ = x.shape
        y = selective_scan_reference(*op.scan_inputs(x))
        expected = op.out_proj(op.out_norm(cross_merge(y.reshape(b, 4, op.inner, h * w), h, w).permute(0, 2, 3, 1)))
        assert torch.allclose(op(x), expected, atol=1e-5)


def test_published_sizes():
    timm = timm_with_our_models()
    counts = {name: sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()) / 1e6
              for name in ("vmamba_tiny", "vmamba_small", "vmamba_base")}
    # VMamba's published 30M, 50M and 89M
    assert counts["vmamba_tiny"] == pytest.approx(30, rel=0.03)
    assert counts["vmamba_small"] == pytest.approx(50, rel=0.03)
    assert counts["vmamba_base"] == pytest.approx(89, rel=0.03)
