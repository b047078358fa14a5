"""Rank allocation (Section 3.2, Algorithm 1, eq. 9)."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_vit.core.allocate import (
    _exchange_slack,
    _gain,
    _gain_per_param,
    align_down,
    allocate_greedy,
    allocate_marginal,
    allocate_uniform,
    fill_slack,
    schedule,
)
from lowrank_vit.core.budget import LayerBudget
from lowrank_vit.core.decompose import energy_tail_curve


def make_layers(seed: int = 0) -> list[LayerBudget]:
    """Layers with very different spectra: some compress easily, some do not."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (k, m) in enumerate([(64, 192), (64, 64), (64, 256), (256, 64)] * 3):
        p = min(k, m)
        decay = 0.02 + 0.5 * torch.rand(1, generator=g).item()
        s = torch.exp(-decay * torch.arange(p, dtype=torch.float64))
        energy = s.pow(2)
        tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)]) / energy.sum()
        layers.append(LayerBudget(f"layer{i}", k, m, z_params=(k + m) * 2, energy_losses=tail))
    return layers


def total_loss(layers, ranks):
    return sum(layer.loss(ranks[layer.name]) for layer in layers)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_greedy_meets_target_and_beats_uniform(fraction):
    layers = make_layers()
    budget = int(fraction * sum(layer.dense_params for layer in layers))
    greedy = allocate_greedy(layers, budget, tolerance=0)
    uniform = allocate_uniform(layers, budget)
    for allocation in (greedy, uniform):
        spent = sum(layer.params(allocation.ranks[layer.name]) for layer in layers)
        assert spent == allocation.params
        assert budget - max(layer.rank_step for layer in layers) < spent <= budget
    assert total_loss(layers, greedy.ranks) < total_loss(layers, uniform.ranks)


def test_greedy_is_mixed_rank_and_follows_the_schedule():
    layers = make_layers()
    budget = int(0.4 * sum(layer.dense_params for layer in layers))
    greedy = allocate_greedy(layers, budget, gamma=80, iterations=500)
    ranks_by_shape = {}
    for layer in layers:
        ranks_by_shape.setdefault((layer.in_features, layer.out_features), set()).add(greedy.ranks[layer.name])
    assert any(len(r) > 1 for r in ranks_by_shape.values())  # same shape, different ranks: mixed rank
    start = sum(layer.dense_params for layer in layers)
    for entry in greedy.trace:  # never ahead of eq. (9) by more than one cut
        if entry["step"] <= 500:
            goal = schedule(entry["step"], start, budget, 80)
            assert entry["params"] <= goal
    assert schedule(0, 1000, 400, 80) == 1000
    assert schedule(80, 1000, 400, 80) == pytest.approx(400 + 600 * math.exp(-1))


def test_uniform_keeps_the_same_fraction_everywhere():
    layers = make_layers()
    budget = int(0.5 * sum(layer.dense_params for layer in layers))
    ranks = allocate_uniform(layers, budget).ranks
    fractions = [layer.params(ranks[layer.name]) / layer.dense_params for layer in layers]
    step = max(layer.rank_step / layer.dense_params for layer in layers)
    assert max(fractions) - min(fractions) <= 2 * step


def test_unreachable_targets_raise():
    layers = make_layers()
    full = sum(layer.dense_params for layer in layers)
    with pytest.raises(ValueError, match="nothing to compress"):
        allocate_greedy(layers, full)
    with pytest.raises(ValueError, match="unreachable"):
        allocate_uniform(layers, 10)


@pytest.mark.parametrize("policy", ["greedy", "uniform"])
@pytest.mark.parametrize("multiple", [2, 4, 8])
def test_rank_multiple_aligns_every_rank_and_spends_the_budget(policy, multiple):
    layers = make_layers()
    budget = int(0.5 * sum(layer.dense_params for layer in layers))
    allocate = allocate_greedy if policy == "greedy" else allocate_uniform
    free, aligned = allocate(layers, budget), allocate(layers, budget, rank_multiple=multiple)
    assert any(r % multiple for r in free.ranks.values() if r is not None)  # the check below can fail
    assert aligned.ranks.keys() == free.ranks.keys()
    for layer in layers:  # a layer the policy left dense stays dense
        r = aligned.ranks[layer.name]
        assert (r is None) == (free.ranks[layer.name] is None)
        assert r is None or (r % multiple == 0 and 1 <= r <= layer.max_rank)
    spent = sum(layer.params(aligned.ranks[layer.name]) for layer in layers)
    assert spent == aligned.params <= budget
    # Nothing a whole step of any layer could still buy is left unspent.
    assert budget - spent < multiple * max(layer.rank_step for layer in layers)
    if policy == "greedy":  # the freed budget goes where it recovers energy: no worse than just rounding down
        floored = {name: None if r is None else align_down(r, multiple) for name, r in free.ranks.items()}
        assert total_loss(layers, aligned.ranks) <= total_loss(layers, floored)
        assert total_loss(layers, aligned.ranks) >= total_loss(layers, free.ranks) - 1e-12


def test_rank_multiple_one_is_the_unconstrained_allocation():
    layers = make_layers()
    budget = int(0.4 * sum(layer.dense_params for layer in layers))
    assert allocate_greedy(layers, budget, rank_multiple=1).ranks == allocate_greedy(layers, budget).ranks
    assert allocate_uniform(layers, budget, rank_multiple=1).ranks == allocate_uniform(layers, budget).ranks


def test_align_down_keeps_ranks_below_the_multiple():
    assert [align_down(r, 8) for r in (1, 7, 8, 15, 16, 23)] == [1, 7, 8, 8, 16, 16]


def test_small_ranks_are_raised_to_the_multiple_when_the_budget_allows():
    layers = make_layers()
    ranks = {layer.name: 3 for layer in layers}
    spent_before = sum(layer.params(3) for layer in layers)
    extra = layers[0].params(8) - layers[0].params(3)
    total = fill_slack(layers, ranks, spent_before + extra, key=_gain, step=8)
    assert sorted(ranks.values()).count(8) == 1 and total <= spent_before + extra


@pytest.mark.parametrize(("k", "m", "z"), [(4, 4, 0), (8, 24, 0), (24, 8, 32), (10, 10, 20), (64, 256, 0)])
def test_max_rank_is_the_largest_rank_strictly_cheaper_than_dense(k, m, z):
    """A layer is factored only where that saves parameters: at max_rank it costs less than dense, one rank more
    would not (shapes where a rank costs exactly the dense count included: 4x4 at rank 2, 8x24 at rank 6)."""
    layer = LayerBudget("l", k, m, z, torch.zeros(min(k, m) + 1, dtype=torch.float64))
    assert layer.params(layer.max_rank) < layer.dense_params <= layer.params(layer.max_rank + 1)


def test_marginal_slack_goes_where_it_recovers_the_most_energy_per_parameter():
    """The budget left after the marginal policy's bisection is handed back by energy recovered per parameter: a
    narrow layer (20 parameters a rank, 1.5 recovered each: 0.075 a parameter) before a wide one (80 a rank, 4
    recovered: 0.05), which recovers 4.5 with the same 80 parameters instead of 4."""

    def flat(per_rank: float, ranks: int) -> torch.Tensor:
        return torch.tensor([per_rank * (ranks - r) for r in range(ranks + 1)], dtype=torch.float64)

    narrow, wide = LayerBudget("narrow", 10, 10, 0, flat(1.5, 10)), LayerBudget("wide", 40, 40, 0, flat(4.0, 40))
    ranks: dict[str, int | None] = {"narrow": 1, "wide": 1}
    budget = narrow.params(1) + wide.params(1) + 80
    assert fill_slack([narrow, wide], ranks, budget, key=_gain_per_param) == budget - 20
    assert ranks == {"narrow": narrow.max_rank, "wide": 1} and narrow.max_rank == 4


def test_exchange_raises_the_layer_whose_next_direction_recovers_the_most():
    """The last slack is spent by lowering a narrow layer one rank and raising a wider one, the one whose *next*
    direction recovers the most: "steep" recovers 5 with its third rank (20 -> 10 -> 5), "flat" 0.05 (1.0 -> 0.9 ->
    0.85). Pricing a layer's raise by the direction it already holds (10 against 0.1) would raise "flat" instead.
    "thin", at rank 1 with a worthless first direction, would be the cheapest to lower, but rank 0 is not a rank."""
    down = LayerBudget("down", 8, 8, 0, torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    thin = LayerBudget("thin", 8, 8, 0, torch.tensor([1.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    flat = LayerBudget("flat", 12, 12, 0, torch.tensor([2.0, 1.0, 0.9, 0.85, 0.5, 0.0], dtype=torch.float64))
    steep = LayerBudget("steep", 12, 12, 0, torch.tensor([40.0, 20.0, 10.0, 5.0, 1.0, 0.0], dtype=torch.float64))
    layers = [thin, down, flat, steep]
    ranks: dict[str, int | None] = {"thin": 1, "down": 3, "flat": 2, "steep": 2}
    spent = sum(layer.params(ranks[layer.name]) for layer in layers)
    budget = spent + (steep.rank_step - down.rank_step)  # room for exactly one exchange
    assert _exchange_slack(layers, ranks, budget, tolerance=0) == budget
    assert ranks == {"thin": 1, "down": 2, "flat": 2, "steep": 3}


def test_slack_goes_to_the_next_rank_that_recovers_the_most_whatever_the_ranks_held():
    """Both slack keys judge the *next* rank of each layer from where it stands. Normalized (``_gain``, Algorithm 1's
    top-up): "held" at rank 1 would recover 0.05 with its second rank, "low" at rank 3 recovers 0.2 with its fourth,
    so "low" gets it although "held" still loses more. Per parameter (``_gain_per_param``, the marginal policy's): a
    narrow layer at rank 3 recovers 1.5 for 20 parameters (0.075 a parameter), a wide one at rank 1 4 for 80 (0.05):
    the narrow one is raised, and what is left (60) buys no wide rank."""
    held = LayerBudget("held", 10, 10, 0, torch.tensor([1.0, 0.9, 0.85, 0.8, 0.75, 0.0], dtype=torch.float64))
    low = LayerBudget("low", 10, 10, 0, torch.tensor([1.0, 0.6, 0.4, 0.3, 0.1, 0.0], dtype=torch.float64))
    ranks: dict[str, int | None] = {"held": 1, "low": 3}
    budget = held.params(1) + low.params(3) + low.rank_step
    assert fill_slack([held, low], ranks, budget, key=_gain) == budget
    assert ranks == {"held": 1, "low": 4}

    def flat(per_rank: float, ranks: int) -> torch.Tensor:
        return torch.tensor([per_rank * (ranks - r) for r in range(ranks + 1)], dtype=torch.float64)

    narrow, wide = LayerBudget("narrow", 10, 10, 0, flat(1.5, 10)), LayerBudget("wide", 40, 40, 0, flat(4.0, 40))
    ranks = {"narrow": 3, "wide": 1}
    budget = narrow.params(3) + wide.params(1) + 80
    assert fill_slack([narrow, wide], ranks, budget, key=_gain_per_param) == budget - 60
    assert ranks == {"narrow": 4, "wide": 1}


def _random_layers(seed: int) -> list[LayerBudget]:
    """Three to five layers of random shapes (some with Z), each with a random non-increasing spectrum."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(3 + seed % 3):
        k, m = (int(v) for v in torch.randint(4, 40, (2,), generator=g))
        s = torch.sort(torch.rand(min(k, m), generator=g, dtype=torch.float64) * 10.0 ** float(i % 3),
                       descending=True)[0]
        z = int(torch.randint(0, 2, (1,), generator=g)) * (k * m) // 20
        layers.append(LayerBudget(f"l{i}", k, m, z, energy_tail_curve(s)))
    return layers


@pytest.mark.parametrize("seed", range(25))
def test_marginal_choices_at_every_price_are_each_layers_brute_force_argmin(seed):
    """The marginal policy's Lagrangian step, at a price p per parameter, keeps in every layer the option (rank 1 ..
    max_rank, or dense losing nothing) that minimizes loss + p * params, smaller ranks first on ties. Checked against a
    plain loop over every option of every layer, at prices over ten decades: an off-by-one in the rank index of the
    vectorized table (a rank's loss paired with its neighbour's cost) changes these choices."""
    from lowrank_vit.core.allocate import _LagrangianTable

    layers = _random_layers(seed)
    table = _LagrangianTable(layers)
    for price in (10.0 ** e for e in range(-8, 3)):
        expected = {}
        for layer in layers:
            options = [(layer.loss(r) + price * layer.params(r), r) for r in range(1, layer.max_rank + 1)]
            best = min(options, key=lambda o: (o[0], o[1])) if options else None
            dense = price * layer.dense_params
            expected[layer.name] = None if best is None or dense < best[0] else best[1]
        assert table.ranks(price) == expected, price
        assert table.total(price) == sum(layer.params(expected[layer.name]) for layer in layers)


@pytest.mark.parametrize("seed", range(25))
def test_marginal_allocation_fits_and_no_single_step_up_is_affordable(seed):
    """On the same random problems: the marginal allocation fits the budget, every rank lies in 1 .. max_rank, and
    the slack it leaves is smaller than any single layer's next step (brute force over every layer)."""
    layers = _random_layers(seed)
    full = sum(layer.dense_params for layer in layers)
    budget = int(full * (0.3 + 0.05 * (seed % 8)))
    try:
        allocation = allocate_marginal(layers, budget)
    except ValueError:
        return  # below rank 1 everywhere: check_feasible's error (its own tests)
    assert allocation.params == sum(layer.params(allocation.ranks[layer.name]) for layer in layers) <= budget
    for layer in layers:
        r = allocation.ranks[layer.name]
        assert r is None or 1 <= r <= layer.max_rank
        if r is not None and r < layer.max_rank:
            assert allocation.params + layer.rank_step > budget, (layer.name, r)
