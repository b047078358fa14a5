"""Tests of experiments/rounds_probe.py."""

from __future__ import annotations

import copy

import torch
from torch import nn

from experiments.rounds_probe import anchored_to, fold, in_rounds, main
from lowrank_vit import FactorizedLinear, compress
from tests.helpers import make_tiny_vit


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_fold_keeps_the_function_and_leaves_no_factorized_layer():
    model = make_tiny_vit(seed=3, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                         in_chans=3)
    compress(model, [_images(16, 0)], reduction=0.5, calib_samples=16, progress=False, compensation="lowrank")
    x = _images(4, 1)
    with torch.no_grad():
        before = model(x)
        folded = fold(model)
        after = folded(x)
    assert not any(isinstance(m, FactorizedLinear) for m in folded.modules())
    assert torch.allclose(before, after, atol=1e-5)  # U Vᵀ + Z and the bias, as one dense weight


def test_anchored_to_swaps_the_dense_copy_for_the_anchor_and_only_inside():
    import lowrank_vit.pipeline as pipeline

    anchor, model, other = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    with anchored_to(anchor, model):
        got = pipeline.copy.deepcopy(model)
        assert torch.equal(got.weight, anchor.weight) and got is not anchor
        assert torch.equal(pipeline.copy.deepcopy(other).weight, other.weight)  # any other object: a real copy
    assert pipeline.copy is copy


def test_in_rounds_reaches_the_last_target_and_one_round_is_plain_compress():
    dense = make_tiny_vit(seed=4, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                         in_chans=3)
    batches = [(_images(32, 2), torch.arange(32) % 5)]
    total = sum(p.numel() for p in dense.parameters())
    two, _ = in_rounds(dense, batches, [0.3, 0.6], calib=32, seed=0)
    assert abs(1 - sum(p.numel() for p in two.parameters()) / total - 0.6) < 0.02
    one, _ = in_rounds(dense, batches, [0.6], calib=32, seed=0)
    reference = copy.deepcopy(dense)
    from experiments.loss_aware_study import RECIPES

    compress(reference, batches, reduction=0.6, calib_samples=32, progress=False, seed=0,
             **RECIPES["loss-aware-refit"])
    x = _images(3, 5)
    with torch.no_grad():
        assert torch.equal(one(x), reference(x))
        assert not torch.allclose(two(x), one(x))  # the rounds are another model


def test_a_schedule_that_starts_like_an_earlier_one_reuses_its_folded_rounds(monkeypatch):
    """With ``folded``, the second schedule runs only its last round, and gives the model it gives without the cache
    (the seconds of the reused round still counted); the recipe is every round's."""
    import experiments.rounds_probe as probe

    dense = make_tiny_vit(seed=6, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                         in_chans=3)
    batches = [(_images(32, 7), torch.arange(32) % 5)]
    fresh, _ = in_rounds(dense, batches, [0.3, 0.5], calib=32, seed=0, recipe="loss-aware")
    calls = []
    real = probe.compress
    monkeypatch.setattr(probe, "compress", lambda *a, **k: calls.append(k) or real(*a, **k))
    folded: dict = {}
    _, first = in_rounds(dense, batches, [0.3, 0.6], calib=32, seed=0, recipe="loss-aware", folded=folded)
    assert [k["reduction"] for k in calls] == [0.3, 0.6] and list(folded) == [(0.3,)]
    got, second = in_rounds(dense, batches, [0.3, 0.5], calib=32, seed=0, recipe="loss-aware", folded=folded)
    assert [k["reduction"] for k in calls] == [0.3, 0.6, 0.5]
    assert not any(k.get("refit") for k in calls)  # "loss-aware", not the probe's default recipe
    assert second >= folded[(0.3,)][1] > 0 and first > 0
    x = _images(3, 8)
    with torch.no_grad():
        assert torch.equal(got(x), fresh(x))


def test_a_schedule_that_is_not_increasing_exits_2(capsys):
    assert main(["--cifar10", "unused", "--schedules", "0.8,0.5"]) == 2
    assert "increasing reductions" in capsys.readouterr().err
