"""Tests of lowrank_vit/core/allocate.py."""

from __future__ import annotations

import itertools
import math
import re
from fractions import Fraction

import pytest
import torch
from torch import nn

from lowrank_vit import (
    compress,
    count_params,
    get_adapter,
)
from lowrank_vit.config import ALLOCATIONS
from lowrank_vit.core.allocate import (
    POLICIES,
    Policy,
    _exchange_slack,
    _gain,
    _gain_per_param,
    align_down,
    allocate_greedy,
    allocate_marginal,
    allocate_uniform,
    check_feasible,
    fill_slack,
    get_policy,
    register_policy,
    schedule,
)
from lowrank_vit.core.budget import LayerBudget
from lowrank_vit.core.decompose import energy_tail_curve
from tests.helpers import (
    _plan,
    _random_budgets,
    assert_unchanged,
    cfg,
    cli,
    make_tiny_vit,
    one_line_error,
    snapshot,
)
from tests.helpers import _random_budgets as _layers


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


@pytest.mark.usefixtures("one_thread_module")
def test_target_below_rank_one_everywhere(tiny_vit, calib_batches):
    before = snapshot(tiny_vit)
    with pytest.raises(ValueError, match=r"target is unreachable: even rank 1 in every compressible layer"):
        compress(tiny_vit, calib_batches, cfg(target_params=100))
    assert_unchanged(tiny_vit, before)


def _rank_one_everywhere_total(model: nn.Module) -> int:
    """Parameter count of ``model`` with every block linear at rank 1 and no Z (compensation="none")."""
    layers = get_adapter(model).compressible_layers(model).values()
    return count_params(model) - sum(m.in_features * m.out_features - (m.in_features + m.out_features) for m in layers)


@pytest.mark.usefixtures("one_thread_module")
def test_target_at_and_just_below_rank_one_everywhere(calib_batches):
    smallest = _rank_one_everywhere_total(make_tiny_vit())
    with pytest.raises(ValueError, match=r"target is unreachable"):
        compress(make_tiny_vit(), calib_batches, cfg(target_params=smallest - 1, compensation="none"))
    model = make_tiny_vit()
    report = compress(model, calib_batches, cfg(target_params=smallest, compensation="none"))
    assert set(report.ranks.values()) == {1}
    assert count_params(model) == smallest


@pytest.mark.usefixtures("one_thread_module")
def test_reduction_too_small_to_remove_anything(tiny_vit, calib_batches):
    # round((1 - 1e-9) * n) == n: the target leaves the compressible layers as they are.
    with pytest.raises(ValueError, match=r"nothing to compress"):
        compress(tiny_vit, calib_batches, cfg(reduction=1e-9))


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("seed", range(5))
def test_the_marginal_trace_prices_each_layers_last_direction_per_parameter(seed):
    """The trace says, per layer, what its last kept direction was worth per parameter: the loss it saves over
    one rank less, divided by the parameters that rank costs (k + m): the unit the allocation's price is in."""
    from lowrank_vit.core.allocate import allocate_marginal

    layers = _random_budgets(seed)
    allocation = allocate_marginal(layers, int(0.5 * sum(layer.dense_params for layer in layers)))
    rows = {row["layer"]: row for row in allocation.trace[1:]}
    for layer in layers:
        r = allocation.ranks[layer.name]
        if r is None or r < 2:
            continue
        saved = float(layer.loss(r - 1) - layer.loss(r))
        assert (rows[layer.name]["rank"], rows[layer.name]["params"]) == (r, layer.params(r))
        assert rows[layer.name]["last_price"] == pytest.approx(saved / (layer.in_features + layer.out_features))


@pytest.mark.usefixtures("offline")
def test_the_greedy_trace_says_which_layer_each_step_cut():
    """Algorithm 1's trace (``Allocation.trace``: {"step", "layer", "rank", "params"}): replaying its steps from
    every layer dense gives, after each one, the parameter count it records."""
    from lowrank_vit.core.allocate import allocate_greedy

    layers = _layers(0)
    by_name = {layer.name: layer for layer in layers}
    allocation = allocate_greedy(layers, int(0.5 * sum(layer.dense_params for layer in layers)), gamma=4.0)
    assert allocation.trace
    ranks: dict[str, int | None] = dict.fromkeys(by_name)
    for i, row in enumerate(allocation.trace, 1):
        assert set(row) == {"step", "layer", "rank", "params"}
        assert row["step"] >= i and row["layer"] in by_name
        ranks[row["layer"]] = row["rank"]
        assert row["params"] == sum(by_name[n].params(r) for n, r in ranks.items())


@pytest.mark.usefixtures("offline")
def test_an_unreachable_target_counts_the_layers_the_latency_table_keeps_dense():
    """Two of four 16x16 layers have no rank faster than dense (``rank_limit`` 0): the smallest reachable is
    2 x 256 dense + 2 x 32 at rank 1 = 576, and the message says why two layers count whole (a limit of 3 or none
    does not)."""
    from lowrank_vit.core.allocate import check_feasible
    from lowrank_vit.core.budget import LayerBudget

    curve = torch.linspace(1.0, 0.0, 17, dtype=torch.float64)
    layers = [LayerBudget(name, 16, 16, 0, curve, rank_limit=limit)
              for name, limit in (("a", 0), ("b", 0), ("c", 3), ("d", None))]
    with pytest.raises(ValueError) as info:
        check_feasible(layers, 100)
    assert str(info.value) == (
        "the target is unreachable: even rank 1 in every compressible layer (with its Z) needs 576 parameters "
        "there, and the target leaves 100 (2 layer(s) stay dense: no profiled rank of theirs is faster than dense "
        "on the latency table)")
    with pytest.raises(ValueError) as info:  # without a latency table's limits, no such reason
        check_feasible([LayerBudget(n, 16, 16, 0, curve) for n in "ab"], 10)
    assert str(info.value).endswith("the target leaves 10")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("b_rank, exchanged", [(14, True), (15, False)])
def test_the_slack_exchange_may_raise_a_layer_to_its_largest_rank(b_rank, exchanged):
    """32 parameters unspent, a 16x16 layer (a rank costs 32) and a 32x32 one (64, largest rank 15: 15 x 64 < 1024):
    one rank less in the first and one more in the second spends them exactly, up to rank 15 and never past it."""
    from lowrank_vit.core.allocate import _exchange_slack
    from lowrank_vit.core.budget import LayerBudget
    from lowrank_vit.core.decompose import energy_tail_curve

    g = torch.Generator().manual_seed(0)
    a, b = (LayerBudget(name, n, n, 0, energy_tail_curve(torch.rand(n, generator=g, dtype=torch.float64)
                                                         .sort(descending=True).values))
            for name, n in (("a", 16), ("b", 32)))
    assert (a.rank_step, b.rank_step, b.max_rank) == (32, 64, 15)
    ranks = {"a": 5, "b": b_rank}
    total = 5 * 32 + b_rank * 64
    spent = _exchange_slack([a, b], ranks, total + 32, tolerance=0)
    if exchanged:
        assert spent == total + 32 and ranks == {"a": 4, "b": 15}
    else:
        assert spent == total and ranks == {"a": 5, "b": 15}


def _two_layers():
    from lowrank_vit.core.budget import LayerBudget

    return [LayerBudget("a", 20, 20, 0, 100 * torch.tensor([2.0 ** -k for k in range(21)])),
            LayerBudget("b", 20, 21, 0, 100 * torch.tensor([3.0 ** -k for k in range(21)]))]


@pytest.mark.usefixtures("offline")
def test_the_marginal_allocation_spends_the_budget_to_the_parameter_where_steps_allow():
    """Rank steps of 40 and 41 parameters can spend 203 exactly (2 x 40 + 3 x 41): by default (tolerance 0) nothing
    is left unspent, even one parameter."""
    from lowrank_vit.core.allocate import allocate_marginal

    allocation = allocate_marginal(_two_layers(), 203)
    assert allocation.params == 203 == 2 * 40 + 3 * 41
    assert allocation.ranks == {"a": 2, "b": 3}


@pytest.mark.usefixtures("offline")
def test_non_finite_energies_are_refused_with_the_likely_cause():
    from lowrank_vit.core.allocate import allocate_marginal
    from lowrank_vit.core.budget import LayerBudget

    layer = LayerBudget("a", 20, 20, 0, torch.full((21,), float("inf")))
    with pytest.raises(RuntimeError) as info:
        allocate_marginal([layer], 200)
    assert str(info.value) == "marginal allocation: no price meets the budget (non-finite energies?)"


@pytest.mark.usefixtures("offline")
def test_a_target_below_the_parameters_kept_says_it_leaves_none():
    """A target smaller than the parameters outside the compressible layers leaves them a negative count: the
    refusal says "none" and why, not a negative number. Rank 1 of a 20 x 20 layer costs 20 + 20 = 40."""
    from lowrank_vit.core.allocate import check_feasible

    with pytest.raises(ValueError) as info:
        check_feasible(_two_layers()[:1], -5)
    assert str(info.value) == ("the target is unreachable: even rank 1 in every compressible layer (with its Z) needs "
                               "40 parameters there, and the target leaves none (it is below the parameters kept as "
                               "they are)")


@pytest.mark.usefixtures("offline")
def test_a_greedy_setting_out_of_range_is_refused_by_its_name():
    from lowrank_vit.core.allocate import GreedySettings

    with pytest.raises(ValueError) as info:
        GreedySettings(greedy_iterations=0)
    assert str(info.value) == "greedy_iterations must be a positive integer, got 0"


def _layer(name, fin, fout, z, losses):
    from lowrank_vit.core.budget import LayerBudget

    return LayerBudget(name, fin, fout, z, torch.tensor(losses))


@pytest.mark.usefixtures("offline")
def test_the_greedy_final_cut_hits_the_budget_rather_than_overshoot_it_by_one():
    """With no schedule left (iterations=0), the one cut asked for is 5 parameters: layer b removes exactly 5
    (rank 3 of 5x10), layer a would remove 6 (rank 3 of 8x8 with a 10-parameter Z) at a lower loss. The default
    tolerance of 0 takes the exact cut: params a 64 + b 45 = 109, the budget."""
    from lowrank_vit.core.allocate import allocate_greedy

    a = _layer("a", 8, 8, 10, [1, .5, .1, .01, 0, 0, 0, 0, 0])
    b = _layer("b", 5, 10, 0, [1, .9, .7, .5, .2, 0])
    result = allocate_greedy([a, b], 109, iterations=0)
    assert result.ranks == {"a": None, "b": 3}
    assert result.params == 109


@pytest.mark.usefixtures("offline")
def test_the_greedy_schedule_starts_at_its_first_step():
    """The first cut follows eq. (9) at t = 1: the count it reaches is at most the schedule's value there."""
    from lowrank_vit.core.allocate import allocate_greedy, schedule

    layers = [_layer(f"l{i}", 64, 48 + 16 * i, 0, torch.linspace(1, 0, 49).tolist()) for i in range(3)]
    start = sum(layer.dense_params for layer in layers)
    result = allocate_greedy(layers, start // 2, gamma=10.0)
    first = result.trace[0]
    assert first["step"] == 1
    assert first["params"] <= schedule(1, start, start // 2, 10.0)


def _uniform_problem(seed: int) -> list[LayerBudget]:
    """Four layers of random shapes, some with a Z of one rank step."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(4):
        k, m = (int(v) for v in torch.randint(8, 96, (2,), generator=g))
        z = int(torch.randint(0, 2, (1,), generator=g)) * (k + m)
        layers.append(LayerBudget(f"l{i}", k, m, z, torch.linspace(1, 0, min(k, m) + 1, dtype=torch.float64)))
    return layers


def _ranks_at(layers: list[LayerBudget], f: Fraction) -> dict[str, int]:
    """Exactly: the largest rank whose cost is at most f of the layer's dense cost (at least 1, at most max_rank)."""
    return {layer.name: min(max(math.floor((f * layer.dense_params - layer.z_params) / layer.rank_step), 1),
                            layer.max_rank) for layer in layers}


def _largest_common_fraction(layers: list[LayerBudget], budget: int) -> Fraction:
    """Brute force over every fraction at which some layer's rank steps up."""
    candidates = {Fraction(0)} | {Fraction(layer.params(r), layer.dense_params)
                                  for layer in layers for r in range(1, layer.max_rank + 1)}
    fits = [f for f in candidates
            if sum(layer.params(r) for layer, r in zip(layers, _ranks_at(layers, f).values(), strict=True)) <= budget]
    return max(fits)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_uniform_allocation_keeps_every_layer_at_the_largest_common_fraction_that_fits(seed, fraction):
    """"uniform" promises the same retained fraction in every layer, the largest that fits the budget (then the
    rounding slack is topped up). A search that missed that fraction would starve some layers while others got
    more than the common share: every layer must keep at least its rank at the brute-forced fraction."""
    layers = _uniform_problem(seed)
    budget = int(fraction * sum(layer.dense_params for layer in layers))
    allocation = allocate_uniform(layers, budget)
    floor = _ranks_at(layers, _largest_common_fraction(layers, budget))
    assert all(allocation.ranks[name] >= rank for name, rank in floor.items()), (allocation.ranks, floor)
    assert sum(layer.params(allocation.ranks[layer.name]) for layer in layers) == allocation.params <= budget


def _convex_curve(energies: list[float]) -> torch.Tensor:
    return energy_tail_curve(torch.tensor(energies, dtype=torch.float64).sqrt())


def test_marginal_allocation_is_optimal_on_a_small_problem():
    """Layers of one shape (equal cost per rank; dense costs 4 ranks): the marginal allocation's total energy lost
    equals the exhaustive optimum under the budget, and is below Algorithm 1 on normalized energies."""
    g = torch.Generator().manual_seed(0)
    layers = []
    for i in range(3):
        energies = sorted((torch.rand(6, generator=g) * (10.0 ** i)).tolist(), reverse=True)
        layers.append(LayerBudget(f"l{i}", 8, 8, 0, _convex_curve(energies)))
    budget = 7 * 16  # 7 ranks in all (max rank per layer: 3)
    alloc = allocate_marginal(layers, budget)
    lost = sum(layer.loss(alloc.ranks[layer.name]) for layer in layers)
    best = min(sum(layer.loss(r) for layer, r in zip(layers, combo, strict=True))
               for combo in itertools.product([1, 2, 3, None], repeat=3)  # None: left dense (64 parameters)
               if sum(layer.params(r) for layer, r in zip(layers, combo, strict=True)) <= budget)
    assert lost == pytest.approx(best)
    assert alloc.params <= budget and alloc.trace[0]["price"] > 0
    normalized = [LayerBudget(la.name, 8, 8, 0, la.energy_losses / la.energy_losses[0]) for la in layers]
    greedy = allocate_greedy(normalized, budget)
    assert lost <= sum(layer.loss(greedy.ranks[layer.name]) for layer in layers)


def test_marginal_allocation_keeps_a_cheap_layer_dense_only_when_it_pays():
    """A layer whose factored form would lose a lot for few parameters stays dense when the budget allows."""
    heavy = LayerBudget("heavy", 40, 40, 0, _convex_curve([100.0] * 40))
    light = LayerBudget("light", 40, 40, 0, _convex_curve([1e-6] * 40))
    alloc = allocate_marginal([heavy, light], 1600 + 80 * 2)
    assert alloc.ranks == {"heavy": None, "light": 2}


@pytest.mark.usefixtures("_offline")
def test_unreachable_reduction_names_the_largest_reachable_one(capsys):
    code, _, err = cli(capsys, "plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke",
                       "--set", "compression.reduction=0.99")
    line = one_line_error(err)
    assert code == 2 and not re.search(r"-\d", line.replace("--", "")), line
    match = re.search(r"largest reachable reduction is [\d.]+% \(reduction=([\d.]+)", line)
    assert match, line
    # and it is reachable: planning at that reduction works
    plan = _plan(capsys, "--set", f"compression.reduction={match.group(1)}")
    assert plan["reduction"] == pytest.approx(float(match.group(1)), abs=2e-3)


def test_allocation_policies_match_the_config_choices():
    assert tuple(POLICIES) == ALLOCATIONS
    assert [name for name, policy in POLICIES.items() if policy.records_trace] == \
        ["marginal", "integer", "lems", "flar", "svd_llm_v2", "comcat_search"]
    assert [name for name, policy in POLICIES.items() if policy.needs_probe] == ["lems", "flar"]
    with pytest.raises(ValueError, match="unknown allocation 'nope'; registered: uniform"):
        get_policy("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_policy(Policy("greedy", POLICIES["greedy"].curve, POLICIES["greedy"].run))


def test_the_slack_exchange_looks_past_layers_it_cannot_use():
    """One exchange fits the slack of 20 parameters: A down a rank (-20), B up one (+40). Before it come a dense layer
    (no rank to lower), a layer as the partner of itself, one too wide to raise within the slack (C: +100 - 20) and
    one with no rank at all: each is passed over, not taken as the end of the search. Counted by hand:
    25 + 5*20 + 1*100 + 5*40 = 425 spent, 445 allowed."""
    def layer(name: str, width: int) -> LayerBudget:
        return LayerBudget(name, width, width, 0, torch.linspace(1.0, 0.0, width + 1))

    layers = [layer("D", 5), layer("A", 10), layer("C", 50), layer("B", 20)]
    ranks = {"D": None, "A": 5, "C": 1, "B": 5}
    assert sum(lb.params(ranks[lb.name]) for lb in layers) == 425
    assert _exchange_slack(layers, ranks, 445, tolerance=0) == 445
    assert ranks == {"D": None, "A": 4, "C": 1, "B": 6}


# -------------------------------------------------------------- the edges of the allocators' rules, by hand


def _edge_layers() -> list[LayerBudget]:
    """a: 8x24, 32 a rank, dense 192, max_rank 5; b: 4x4 with z = 8, dense 16, max_rank 0 (rank 1 costs 16);
    c: 4x4 with z = 7, dense 16, max_rank 1 (rank 1 costs 15). Decreasing loss curves with distinct values."""
    return [_layer("a", 8, 24, 0, [1.0, 0.6, 0.35, 0.2, 0.1, 0.04, 0.01, 0.003, 0.0]),
            _layer("b", 4, 4, 8, [1.0, 0.5, 0.2, 0.05, 0.0]),
            _layer("c", 4, 4, 7, [1.0, 0.45, 0.15, 0.03, 0.0])]


def test_check_feasible_at_the_smallest_reachable_and_the_full_size():
    """The dense total is 192 + 16 + 16 = 224; the smallest reachable is 32 (a at rank 1) + 16 (b dense: no rank is
    cheaper) + 15 (c at rank 1) = 63. 63 and 223 are targets; 62 and 224 are not."""
    layers = _edge_layers()
    check_feasible(layers, 63)
    check_feasible(layers, 223)
    with pytest.raises(ValueError, match=r"needs 63 parameters there, and the target leaves 62$"):
        check_feasible(layers, 62)
    with pytest.raises(ValueError, match=r"leaves 224 parameters .* hold only 224: nothing to compress"):
        check_feasible(layers, 224)


def test_uniform_keeps_a_layer_without_a_cheaper_rank_dense_and_gives_a_layer_with_one_its_rank_one():
    """Budget 127 = 16 (b dense) + 15 (c at rank 1, its max_rank) + 3 x 32 (a at rank 3); a at rank 4 would need
    159."""
    allocation = allocate_uniform(_edge_layers(), 127)
    assert allocation.ranks == {"a": 3, "b": None, "c": 1} and allocation.params == 127


@pytest.mark.parametrize(("budget", "rank"), [(160, 5), (159, 4), (1000, 5)])
def test_fill_slack_raises_a_rank_up_to_the_budget_and_the_max_rank_inclusive(budget, rank):
    """8x24 at rank 1 (32): rank 5 costs 160, exactly its max_rank; a budget of 160 reaches it, 159 stops at 4
    (128), and no budget takes it past 5."""
    layer = _edge_layers()[0]
    ranks = {"a": 1}
    assert fill_slack([layer], ranks, budget, key=_gain) == 32 * rank and ranks == {"a": rank}


@pytest.mark.parametrize(("budget", "rank"), [(288, 8), (287, 3)])
def test_fill_slack_with_a_step_raises_to_the_next_multiple_only_where_it_fits(budget, rank):
    """18x18 (36 a rank, dense 324, max_rank 8) at rank 3: the next multiple of 8 is 8, costing 288 (< 324)."""
    layer = _layer("a", 18, 18, 0, [1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.0])
    ranks = {"a": 3}
    assert fill_slack([layer], ranks, budget, key=_gain, step=8) == 36 * rank and ranks == {"a": rank}


def test_fill_slack_stops_at_a_latency_rank_limit():
    layer = _layer("a", 8, 24, 0, [1.0, 0.6, 0.35, 0.2, 0.1, 0.04, 0.0])
    layer.rank_limit = 3
    ranks = {"a": 1}
    assert fill_slack([layer], ranks, 10_000, key=_gain) == 96 and ranks == {"a": 3}


def _exchange_pair() -> list[LayerBudget]:
    # "down": 6x6, 12 a rank, max_rank 2; "up": 8x24, 32 a rank, max_rank 5; one exchange moves 32 - 12 = 20
    return [_layer("down", 6, 6, 0, [1.0, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0]),
            _layer("up", 8, 24, 0, [1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.0, 0.0, 0.0])]


@pytest.mark.parametrize(("tolerance", "ranks", "spent"), [
    (20, {"down": 2, "up": 1}, 56),  # 20 unspent is within a tolerance of 20: nothing to exchange
    (19, {"down": 1, "up": 2}, 76),  # above it: down gives rank 2 -> 1 (its last allowed step), up takes one
])
def test_the_slack_exchange_stops_at_the_tolerance_and_may_lower_a_layer_to_rank_one(tolerance, ranks, spent):
    """down at 2 (24) + up at 1 (32) = 56 of a budget of 76: 20 unspent, exactly one exchange's worth."""
    held = {"down": 2, "up": 1}
    assert _exchange_slack(_exchange_pair(), held, 76, tolerance) == spent and held == ranks


def test_the_marginal_price_keeps_a_layer_factored_where_dense_costs_the_same():
    """8x24 at the price 1/64 a parameter: rank 5 costs 0.5 + 160/64 = 3.0, exactly dense's 192/64 = 3.0 (every
    lower rank costs 3.5). On the tie the layer is factored (it saves 32 parameters at no loss in the objective)."""
    from lowrank_vit.core.allocate import _LagrangianTable

    layer = _layer("a", 8, 24, 0, [4.0, 3.0, 2.5, 2.0, 1.5, 0.5, 0.0, 0.0, 0.0])
    layer.energy_losses = layer.energy_losses.double()
    table = _LagrangianTable([layer])
    assert table.ranks(1 / 64) == {"a": 5} and table.total(1 / 64) == 160
    assert table.ranks(1 / 64 * 0.99) == {"a": None}  # a cheaper price: dense wins outright


def test_marginal_compresses_a_layer_whose_only_cheaper_rank_is_one():
    """At the smallest reachable budget, 63 (see ``_edge_layers``), c (max_rank 1) must take its rank 1."""
    allocation = allocate_marginal(_edge_layers(), 63)
    assert allocation.ranks == {"a": 1, "b": None, "c": 1} and allocation.params == 63
