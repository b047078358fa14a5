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


@pytest.mark.parametrize(("limit", "expected"), [(None, 5), (6, 5), (5, 5), (4, 4), (1, 1), (0, 0)])
def test_max_rank_is_capped_by_a_rank_limit_at_and_around_the_parameter_ceiling(limit, expected):
    """8x24: dense 192, 32 a rank; rank 5 costs 160, rank 6 costs 192 (not cheaper): the ceiling is 5. A latency
    limit above it changes nothing, at or below it wins; a limit of 0 keeps the layer dense (not "no limit")."""
    layer = LayerBudget("l", 8, 24, 0, torch.zeros(9, dtype=torch.float64), rank_limit=limit)
    assert layer.max_rank == expected


@pytest.mark.parametrize(("z", "expected"), [(0, 1), (7, 1), (8, 0), (9, 0), (40, 0)])
def test_max_rank_with_a_z_at_and_around_the_dense_cost(z, expected):
    """4x4 (dense 16, 8 a rank): with z = 7 rank 1 costs 15 < 16, with z = 8 it costs 16 (not cheaper), with z = 40
    the formula's quotient is negative and the layer is simply dense (0, never a negative rank)."""
    layer = LayerBudget("l", 4, 4, z, torch.zeros(5, dtype=torch.float64))
    assert layer.max_rank == expected
