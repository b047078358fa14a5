"""Tests of lowrank_vit/core/budget.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit.core.budget import LayerBudget


@pytest.mark.parametrize(("k", "m", "z"), [(4, 4, 0), (8, 24, 0), (24, 8, 32), (10, 10, 20), (64, 256, 0)])
def test_max_rank_is_the_largest_rank_strictly_cheaper_than_dense(k, m, z):
    """A layer is factored only where that saves parameters: at max_rank it costs less than dense, one rank more
    would not (shapes where a rank costs exactly the dense count included: 4x4 at rank 2, 8x24 at rank 6)."""
    layer = LayerBudget("l", k, m, z, torch.zeros(min(k, m) + 1, dtype=torch.float64))
    assert layer.params(layer.max_rank) < layer.dense_params <= layer.params(layer.max_rank + 1)


@pytest.mark.usefixtures("offline")
def test_ranks_past_a_layers_spectrum_lose_nothing():
    """``LayerBudget.energy_losses``: indexed by r = 0..p, "ranks above p lose nothing"."""
    from lowrank_vit.core.budget import LayerBudget

    layer = LayerBudget("l", 8, 8, 0, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    assert layer.loss(2) == 0.25
    assert layer.loss(3) == 0.0 and layer.loss(7) == 0.0 and layer.loss(None) == 0.0
