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


def test_the_new_options_are_recorded_only_where_given():
    from lowrank_vit.nn.vssm import VSSM

    plain = VSSM(img_size=32, embed_dim=16, depths=(1, 1))
    assert set(plain.build_kwargs) == {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths",
                                       "d_state", "ssm_ratio", "mlp_ratio"}
    released = VSSM(img_size=32, embed_dim=16, depths=(1, 1), patch_embed="v2", conv_bias=False, downsample="v2")
    assert released.build_kwargs["patch_embed"] == "v2" and released.build_kwargs["conv_bias"] is False
    assert released.layers[0].blocks[0].op.conv2d.bias is None
    assert released.layers[0].downsample.conv.kernel_size == (2, 2)
    assert released(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_the_v2_stem_reaches_the_same_grid_as_the_v1_stem():
    from lowrank_vit.nn.vssm import PatchEmbed, PatchEmbedV2

    x = torch.randn(1, 3, 32, 32)
    assert PatchEmbedV2(32, 4, 3, 16)(x).shape == PatchEmbed(32, 4, 3, 16)(x).shape == (1, 8, 8, 16)
    with pytest.raises(ValueError, match="even patch_size"):
        PatchEmbedV2(32, 3, 3, 16)


@pytest.mark.parametrize("option", [{"patch_embed": "v3"}, {"downsample": "v1"}, {"dt_rank": 0}])
def test_options_that_are_not_built_are_refused(option):
    from lowrank_vit.nn.vssm import VSSM

    with pytest.raises(ValueError, match=next(iter(option))):
        VSSM(img_size=32, embed_dim=16, depths=(1, 1), **option)


def test_the_released_shapes_rebuild_under_their_names():
    timm = timm_with_our_models()
    for name in ("vmamba_tiny_s1l8", "vmamba_small_s2l15", "vmamba_base_s2l15"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
            again = timm.create_model(name, pretrained=False, **model.build_kwargs)
        assert {k: v.shape for k, v in model.state_dict().items()} == \
            {k: v.shape for k, v in again.state_dict().items()}
        with pytest.raises(ValueError, match="vssm1_tiny_0230s|vssm_small_0229|vssm_base_0229"):
            timm.create_model(name, pretrained=True)
