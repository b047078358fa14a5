"""Tests of lowrank_vit/methods/vmeanba.py."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lowrank_vit.nn.adapters import get_adapter, timm_with_our_models
from lowrank_vit.nn.vssm import SS2D
from tests.helpers import make_vssm, vssm_images


def agreeing_channels_(op: SS2D) -> None:
    """Make every channel of each scan path of ``op`` carry the same u, delta and A: the channel-mean scan is then
    exact there, so the block's impact is zero (up to rounding) whatever the rest of the model does."""
    with torch.no_grad():
        op.in_proj.weight.copy_(op.in_proj.weight[:1].expand_as(op.in_proj.weight))
        op.conv2d.weight.copy_(op.conv2d.weight[:1].expand_as(op.conv2d.weight))
        op.conv2d.bias.fill_(float(op.conv2d.bias[0]))
        for proj in op.dt_proj:
            proj.weight.copy_(proj.weight[:1].expand_as(proj.weight))
            proj.bias.fill_(float(proj.bias[0]))
        op.A_log.copy_(op.A_log[:1].expand_as(op.A_log))


@pytest.mark.parametrize("agreeing", ["layers.0.blocks.1.op", "layers.1.blocks.0.op"])
def test_vmeanba_switches_the_block_whose_channels_agree(agreeing):
    from lowrank_vit.methods.vmeanba import apply_vmeanba

    model = make_vssm()
    agreeing_channels_(model.get_submodule(agreeing))
    x = vssm_images()
    with torch.no_grad():
        dense = model(x)
    report = apply_vmeanba(model, [x[:7], x[7:]], num_blocks=1, timing=False, progress=False)  # 7: not a divisor
    assert report.chosen == [agreeing]
    assert abs(report.scores[agreeing]) < 1e-6
    assert min(score for name, score in report.scores.items() if name != agreeing) > 1e-4
    assert [name for name, op in get_adapter(model).scan_modules(model).items() if op.mean_scan] == [agreeing]
    with torch.no_grad():
        assert torch.allclose(model(x), dense, atol=1e-4)  # exact there: nothing changed
    assert abs(report.kl) < 1e-6


def test_vmeanba_kl_is_the_models_and_k_blocks_follow_the_scores():
    from lowrank_vit.methods.vmeanba import apply_vmeanba

    model = make_vssm(seed=3)
    x = vssm_images(16, seed=2)
    with torch.no_grad():
        dense = F.log_softmax(model(x), -1)
    report = apply_vmeanba(model, x, num_blocks=2, timing=False, progress=False)
    assert report.chosen == sorted(report.scores, key=report.scores.get)[:2]
    with torch.no_grad():
        switched = F.log_softmax(model(x), -1)
    assert report.kl == pytest.approx(float((dense.exp() * (dense - switched)).sum(-1).mean()), rel=1e-5)
    assert model.training is False


def test_vmeanba_by_target_speedup_adds_blocks_until_the_prediction_reaches_it():
    from lowrank_vit.methods.vmeanba import _by_speedup

    scores = {"a": 0.3, "b": 0.1, "c": 0.2}
    savings = {"a": 10.0, "b": 5.0, "c": 20.0}
    assert _by_speedup(scores, savings, 100.0, 1.05) == ["b"]  # 100/95
    assert _by_speedup(scores, savings, 100.0, 1.3) == ["b", "c"]  # 100/75 = 1.33
    assert _by_speedup(scores, savings, 100.0, 1.5) == ["b", "c", "a"]  # 100/65 = 1.54
    with pytest.raises(ValueError, match=r"a 1.6x speedup is out of reach: switching all 3 selective-scan blocks is "
                                         r"predicted to give 1.538x"):
        _by_speedup(scores, savings, 100.0, 1.6)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_blocks": 4}, r"num_blocks=4 but the model has 3 selective-scan block\(s\): choose 1 to 3"),
    ({"num_blocks": 0}, r"num_blocks must be a positive integer, not 0"),
    ({}, r"exactly one of num_blocks=K and target_speedup=S"),
    ({"num_blocks": 1, "target_speedup": 1.2}, r"exactly one of num_blocks=K and target_speedup=S"),
    ({"target_speedup": 0.9}, r"target_speedup must be a number above 1, not 0.9"),
])
def test_vmeanba_bad_settings(kwargs, message):
    from lowrank_vit.methods.vmeanba import apply_vmeanba

    with pytest.raises(ValueError, match=message):
        apply_vmeanba(make_vssm(), vssm_images(4), progress=False, **kwargs)


def test_vmeanba_on_a_vision_transformer_names_what_it_found():
    import timm

    from lowrank_vit.methods.vmeanba import apply_vmeanba

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=24, patch_size=8, depth=2,
                            embed_dim=16, num_heads=2)
    with pytest.raises(ValueError, match=r"VisionTransformer has no selective-scan block \(found 2 attention "
                                         r"block\(s\)\): VMeanba applies to vision state-space models"):
        apply_vmeanba(vit, vssm_images(4), num_blocks=1, progress=False)


def test_switching_scans_for_a_timing_restores_each_ones_own_setting_even_after_an_error():
    from lowrank_vit.methods.vmeanba import scan_blocks, switched

    model = timm_with_our_models().create_model("vssm_micro", pretrained=False)
    a, b = scan_blocks(model).values()
    a.mean_scan, b.mean_scan = True, False
    with pytest.raises(RuntimeError, match="boom"), switched([a, b], False):
        assert (a.mean_scan, b.mean_scan) == (False, False)
        raise RuntimeError("boom")
    assert (a.mean_scan, b.mean_scan) == (True, False)
    with switched([a, b], True):
        assert (a.mean_scan, b.mean_scan) == (True, True)
    assert (a.mean_scan, b.mean_scan) == (True, False)
