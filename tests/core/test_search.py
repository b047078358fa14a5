"""Tests of lowrank_vit/core/search.py."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from lowrank_vit.core.budget import LayerBudget
from lowrank_vit.core.search import (
    allocate_integer,
    allocate_svd_llm_v2,
    candidate_ranks,
    equal_cost_rank,
    layer_kind,
    scale_to_budget,
    search_grid,
    smallest_passing,
    svd_llm_v2_keeps,
)


def random_choices(seed: int):
    rng = np.random.default_rng(seed)
    choices = []
    for _ in range(int(rng.integers(2, 5))):
        options = [(r, int(rng.integers(1, 200)), float(10.0 ** rng.uniform(-6, 2)))  # errors over 8 decades
                   for r in range(1, int(rng.integers(2, 6)) + 1)]
        dense = max(p for _, p, _ in options) + int(rng.integers(0, 100))
        choices.append(options + [(None, dense, 0.0)])
    smallest = sum(min(p for _, p, _ in options) for options in choices)
    largest = sum(max(p for _, p, _ in options) for options in choices)
    return choices, int(rng.integers(smallest, largest + 1))


@pytest.mark.parametrize("seed", range(60))
def test_allocate_integer_finds_the_brute_force_optimum(seed):
    choices, budget = random_choices(seed)
    names = [f"l{i}" for i in range(len(choices))]
    best = min(sum(e for _, _, e in combo) for combo in itertools.product(*choices)
               if sum(p for _, p, _ in combo) <= budget)
    allocation = allocate_integer(choices, names, budget)
    picked = [next(o for o in options if o[0] == allocation.ranks[name])
              for name, options in zip(names, choices, strict=True)]
    assert allocation.params == sum(p for _, p, _ in picked) <= budget
    assert sum(e for _, _, e in picked) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert allocation.trace[0]["objective"] == pytest.approx(best, rel=1e-6, abs=1e-12)


def test_allocate_integer_is_exact_when_errors_span_many_magnitudes():
    # brute force: "a" dense and "b" at rank 1 (152 parameters, error 1e-6) beats every other affordable pair
    choices = [[(1, 59, 4.0), (2, 73, 1e-5), (3, 30, 2e-6), (None, 74, 0.0)],
               [(1, 78, 1e-6), (2, 56, 0.03), (3, 99, 1e-5), (None, 100, 0.0)]]
    assert allocate_integer(choices, ["a", "b"], 172).ranks == {"a": None, "b": 1}


def test_allocate_integer_rejects_an_infeasible_budget():
    choices = [[(1, 10, 1.0), (None, 20, 0.0)], [(1, 15, 1.0), (None, 30, 0.0)]]
    with pytest.raises(ValueError, match="no feasible allocation"):
        allocate_integer(choices, ["a", "b"], 24)
    assert allocate_integer(choices, ["a", "b"], 25).ranks == {"a": 1, "b": 1}  # the same problem, just feasible


def budget_layer(k: int, m: int, z: int = 0, name: str = "layer") -> LayerBudget:
    p = min(k, m)
    tail = torch.linspace(1.0, 0.0, p + 1, dtype=torch.float64)
    return LayerBudget(name, k, m, z_params=z, energy_losses=tail)


@pytest.mark.parametrize("k, m, floor, ceiling, multiple", [
    (64, 192, 0.1, 0.95, 8), (32, 96, 0.1, 0.95, 8), (8, 8, 0.1, 0.95, 8), (100, 37, 0.2, 0.9, 4),
    (384, 1536, 0.1, 0.95, 8), (5, 300, 0.1, 0.95, 1), (64, 64, 0.5, 1.0, 8),
])
def test_candidate_ranks_are_the_aligned_ranks_between_floor_and_ceiling(k, m, floor, ceiling, multiple):
    layer = budget_layer(k, m)
    eq = k * m // (k + m)
    window = [r for r in range(1, layer.max_rank + 1) if r >= math.floor(floor * eq) and r < math.floor(ceiling * eq)]
    aligned = [r for r in window if r % multiple == 0]
    assert window  # each case has a non-empty window
    assert candidate_ranks(layer, floor, ceiling, multiple) == (aligned or window)


def test_candidate_ranks_hand_checked():
    # 64 x 192: equal-cost rank 48, floor 4.8 -> 4, ceiling 45.6 -> below 45, multiples of 8
    assert candidate_ranks(budget_layer(64, 192), 0.1, 0.95, 8) == [8, 16, 24, 32, 40]
    # 8 x 8: equal-cost rank 4, no multiple of 8 below 3: every rank in [1, 3)
    assert candidate_ranks(budget_layer(8, 8), 0.1, 0.95, 8) == [1, 2]


@pytest.mark.parametrize("k, m, z, step", [(64, 192, 0, 8), (32, 96, 0, 8), (8, 8, 0, 8), (40, 40, 200, 4),
                                           (6, 6, 0, 8)])
def test_search_grid_is_the_multiples_below_the_max_rank(k, m, z, step):
    layer = budget_layer(k, m, z)
    affordable = [r for r in range(1, k * m) if r * (k + m) + z < k * m]
    multiples = [r for r in affordable if r % step == 0]
    assert search_grid(layer, step) == (multiples or affordable)


@pytest.mark.parametrize("seed", range(10))
def test_smallest_passing_equals_a_linear_scan(seed):
    rng = np.random.default_rng(seed)
    grid = sorted(rng.choice(np.arange(1, 200), size=int(rng.integers(1, 30)), replace=False).tolist())
    for threshold in [0, *grid, grid[-1] + 1, *rng.integers(0, 210, size=5).tolist()]:
        calls: list[int] = []

        def passes(r, t=threshold, seen=calls):
            seen.append(r)
            return r >= t

        expected = next((r for r in grid if r >= threshold), None)  # the linear scan
        assert smallest_passing(grid, passes) == expected
        assert len(calls) <= math.ceil(math.log2(len(grid) + 1))  # a binary search, not a scan


@pytest.mark.parametrize("seed", range(8))
def test_scale_to_budget_fits_aligns_and_leaves_no_affordable_step(seed):
    rng = np.random.default_rng(seed)
    step = int(rng.choice([1, 4, 8]))
    shapes = [(32, 96), (32, 32), (128, 32), (96, 32), (16, 200), (64, 64)]
    layers = [budget_layer(k, m, name=f"l{i}") for i, (k, m) in enumerate(shapes[: int(rng.integers(2, 7))])]
    searched = {}
    for layer in layers:
        grid = search_grid(layer, step)
        searched[layer.name] = None if rng.random() < 0.2 else int(rng.choice(grid))
    full = sum(layer.dense_params for layer in layers)
    # the smallest model the rule reaches: the layers left dense, every other one at its grid's first rank
    smallest = sum(layer.dense_params if searched[layer.name] is None else layer.params(min(step, layer.max_rank))
                   for layer in layers)
    if smallest >= full:
        return
    budget = int(rng.integers(smallest, full))
    ranks, total = scale_to_budget(layers, searched, budget, step)
    assert total == sum(layer.params(ranks[layer.name]) for layer in layers) <= budget
    for layer in layers:
        r = ranks[layer.name]
        if searched[layer.name] is None:  # FLAR-SVD's rule: what its search left dense stays dense
            assert r is None
        if r is None:
            continue
        assert 1 <= r <= layer.max_rank and (r % step == 0 or r < step)
        up = (r // step + 1) * step  # the next rank of the grid: unaffordable or too large
        assert up > layer.max_rank or total + (up - r) * layer.rank_step > budget


def test_scale_to_budget_hand_checked_keeps_the_dense_layer_and_scales_the_others():
    # 32x96 (128 a rank) searched at 16, 64x64 (128 a rank) at 24, a 32x32 layer left dense (1,024): with 4,096
    # parameters, one factor c < 1 on both searched ranks (multiples of 8) gives 8 and 16: 1,024 + 128 x 24 = 4,096
    layers = [budget_layer(32, 96, name="a"), budget_layer(64, 64, name="b"), budget_layer(32, 32, name="c")]
    ranks, total = scale_to_budget(layers, {"a": 16, "b": 24, "c": None}, 4096, 8)
    assert ranks == {"a": 8, "b": 16, "c": None} and total == 4096
    # one parameter less than the dense layer plus both at rank 8: the published rule cannot meet it
    with pytest.raises(ValueError, match="the 1 layer.*left dense.*1 parameters more.*threshold"):
        scale_to_budget(layers, {"a": 16, "b": 24, "c": None}, 1024 + 128 * 16 - 1, 8)


def test_svd_llm_v2_keeps_follow_the_published_formula():
    losses, f = [2.0, 5.0, 40.0, 1.5], 0.6
    scores = [1 / math.log(value + 1e-12) for value in losses]
    expected = [1 - len(losses) * (1 - f) * s / sum(scores) for s in scores]
    keeps = svd_llm_v2_keeps(losses, f)
    assert keeps == pytest.approx(expected, rel=1e-12)
    assert sum(1 - k for k in keeps) / len(keeps) == pytest.approx(1 - f, rel=1e-12)  # mean compression kept
    assert keeps[2] > keeps[1] > keeps[0] > keeps[3]  # the larger the loss, the more is kept


@pytest.mark.parametrize("losses", [[0.5, 0.9], [0.0, 0.5], [0.2, 0.3, 0.7], [1.0 - 1e-12, 3.0]])
def test_svd_llm_v2_falls_back_to_uniform_where_the_scores_are_invalid(losses):
    # the scores' sum is negative (every L < 1) or infinite (log(L + 1e-12) = 0): the published fallback keeps f0
    assert svd_llm_v2_keeps(losses, 0.4) == [0.4] * len(losses)


def test_svd_llm_v2_keeps_a_negative_score_when_the_sum_is_valid():
    # one L below 1 (a negative score) beside larger ones: the published code keeps the formula (no fallback), so that
    # layer keeps more than its share
    keeps = svd_llm_v2_keeps([0.5, 1.5, 2.0], 0.5)
    scores = [1 / math.log(v + 1e-12) for v in (0.5, 1.5, 2.0)]
    assert sum(scores) > 0 and keeps[0] > 1.0
    assert keeps == pytest.approx([1 - 3 * 0.5 * sc / sum(scores) for sc in scores], rel=1e-12)


@pytest.mark.parametrize("name, kind", [
    ("blocks.3.attn.qkv", "blocks.attn.qkv"), ("layers.0.blocks.1.mlp.fc2", "layers.blocks.mlp.fc2"),
    ("blocks.11.mlp.fc1", "blocks.mlp.fc1"), ("head", "head"),
    ("stages.2.blocks.10.attn.proj", "stages.blocks.attn.proj"),
])
def test_layer_kind_drops_the_indices(name, kind):
    assert layer_kind(name) == kind


def test_svd_llm_v2_falls_back_to_uniform_on_small_losses_and_says_so():
    # tails of 1e-6 of the squared spectrum: every discarded singular value about 1.8e-4, so every L < 1 and the
    # scores' sum is negative: the kind falls back to the uniform ratio, and the trace names it
    small = [replace(budget_layer(32, 96, name=f"blocks.{i}.attn.qkv"),
                     energy_losses=torch.linspace(1e-6, 0.0, 33, dtype=torch.float64)) for i in range(2)]
    budget = sum(layer.dense_params for layer in small) // 2
    allocation = allocate_svd_llm_v2(small, budget)
    assert allocation.trace[0]["uniform_fallback_kinds"] == ["blocks.attn.qkv"]
    assert len(set(allocation.ranks.values())) == 1 and allocation.params <= budget  # one shape: equal ranks
    # the same tails at full scale: L > 1, valid scores, equal kept fractions because the layers are equal, and no
    # fallback reported
    large = [budget_layer(32, 96, name=f"blocks.{i}.attn.qkv") for i in range(2)]
    allocation = allocate_svd_llm_v2(large, budget)
    assert allocation.trace[0]["uniform_fallback_kinds"] == []
    assert len({t["kept_fraction"] for t in allocation.trace[1:]}) == 1


def test_truncation_loss_is_the_first_power_sum_of_the_discarded_singular_values():
    from lowrank_vit.core.decompose import energy_tail_curve
    from lowrank_vit.core.search import truncation_loss

    s = torch.tensor([9.0, 4.0, 2.5, 1.0, 0.25], dtype=torch.float64)
    layer = LayerBudget("blocks.0.mlp.fc1", 5, 40, 0, energy_tail_curve(s))
    assert truncation_loss(layer, 2) == pytest.approx(2.5 + 1.0 + 0.25, rel=1e-12)
    assert truncation_loss(layer, 0) == pytest.approx(16.75, rel=1e-12)
    assert truncation_loss(layer, 5) == 0.0


def test_svd_llm_v2_allocation_scores_the_first_power_losses_at_the_uniform_fraction():
    """The kept fractions the allocation records are the formula on the first-power losses at f0 (a group of two
    layers of one shape, large singular values so that every L > 1)."""
    from lowrank_vit.core.decompose import energy_tail_curve
    from lowrank_vit.core.search import truncation_loss

    g = torch.Generator().manual_seed(0)
    layers = []
    for i in range(2):
        s = torch.sort(torch.rand(32, generator=g, dtype=torch.float64) * 50 * (1 + i), descending=True)[0]
        layers.append(LayerBudget(f"blocks.{i}.attn.qkv", 32, 96, 0, energy_tail_curve(s)))
    budget = sum(layer.dense_params for layer in layers) // 2
    allocation = allocate_svd_llm_v2(layers, budget)
    f0 = allocation.trace[0]["uniform_kept_fraction"]
    reference = math.floor(f0 * 24)  # the equal-cost rank of 32 x 96 is 24
    hand = [sum(math.sqrt(float(a - b)) for a, b in zip(layer.energy_losses[reference:-1],
                                                          layer.energy_losses[reference + 1:], strict=True))
            for layer in layers]
    assert hand == pytest.approx([truncation_loss(layer, reference) for layer in layers], rel=1e-9)
    assert [t["kept_fraction"] for t in allocation.trace[1:]] == pytest.approx(svd_llm_v2_keeps(hand, f0), rel=1e-9)
    assert allocation.trace[0]["uniform_fallback_kinds"] == [] and allocation.params <= budget


@pytest.mark.parametrize("seed", range(6))
def test_the_integer_policy_is_never_worse_than_the_marginal_one_on_the_same_curves(seed):
    """Both allocations fit the budget; the integer program's is the exact optimum of the summed losses, so the
    marginal (Lagrangian) allocation, another feasible point, can only tie or lose."""
    from lowrank_vit.core.allocate import allocate_marginal
    from lowrank_vit.core.decompose import energy_tail_curve
    from lowrank_vit.core.search import IntegerSettings, allocate_integer_on_curves

    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (k, m) in enumerate([(12, 36), (12, 12), (36, 12), (12, 36), (20, 8)]):
        s = torch.sort(torch.rand(min(k, m), generator=g, dtype=torch.float64) * 10.0 ** (i % 3), descending=True)[0]
        layers.append(LayerBudget(f"l{i}", k, m, 0, energy_tail_curve(s)))
    budget = int(sum(layer.dense_params for layer in layers) * (0.3 + 0.1 * (seed % 4)))
    exact = allocate_integer_on_curves(layers, budget, IntegerSettings())
    lagrangian = allocate_marginal(layers, budget)
    assert exact.params <= budget and lagrangian.params <= budget
    total = lambda a: sum(layer.loss(a.ranks[layer.name]) for layer in layers)  # noqa: E731
    assert total(exact) <= total(lagrangian) * (1 + 1e-9) + 1e-12


class _StubProbe:
    """What LEMS asks of a probe, with sensitivities fixed by hand (KL = 1 / (1 + layer index))."""

    def __init__(self) -> None:
        self.calls, self.asked = 0, []

    def kl(self, ranks, temperature):
        self.calls += 1
        self.asked.append(dict(ranks))
        (name, _), = ranks.items()
        return 1.0 / (1 + int(name[1:]))


def test_lems_is_the_brute_force_optimum_of_its_error_model_and_never_probes_a_layer_without_ranks():
    from lowrank_vit.core.decompose import energy_loss_curve
    from lowrank_vit.core.search import LemsSettings, allocate_lems

    g = torch.Generator().manual_seed(3)
    layers = []
    for i, (k, m) in enumerate([(16, 48), (16, 16), (48, 16), (1, 1)]):
        s = torch.sort(torch.rand(min(k, m), generator=g, dtype=torch.float64), descending=True)[0]
        layers.append(LayerBudget(f"l{i}", k, m, 0, energy_loss_curve(s)))
    budget = sum(layer.dense_params for layer in layers) // 2
    settings = LemsSettings(rank_step=2)
    probe = _StubProbe()
    allocation = allocate_lems(layers, budget, settings, probe)
    assert [list(a) for a in probe.asked] == [["l0"], ["l1"], ["l2"]]  # the 1 x 1 layer has no rank to measure
    options = []
    for i, layer in enumerate(layers[:3]):
        eq = layer.dense_params // layer.rank_step
        floor = max(1, math.floor(0.1 * eq))
        ranks = [r for r in range(floor, min(math.floor(0.95 * eq), layer.max_rank + 1)) if r % 2 == 0]
        kl = 1.0 / (1 + i)
        options.append([(r, layer.params(r), kl * layer.loss(r) / max(layer.loss(floor), 1e-6)) for r in ranks]
                       + [(None, layer.dense_params, 0.0)])
    room = budget - layers[3].dense_params
    best = min((sum(e for _, _, e in combo), combo) for combo in itertools.product(*options)
               if sum(p for _, p, _ in combo) <= room)
    assert allocation.ranks["l3"] is None
    assert [allocation.ranks[f"l{i}"] for i in range(3)] == [r for r, _, _ in best[1]]


# ----------------------------------------------------------------------- the edges of the rank rules, by hand


def test_equal_cost_rank_is_the_floor_of_km_over_k_plus_m():
    # 34x34: 1,156 / 68 = 17 exactly (rank 17 costs what dense does); 10x30: 300 / 40 = 7.5 -> 7; 5x7: 35 / 12 -> 2
    assert [equal_cost_rank(budget_layer(k, m)) for k, m in ((34, 34), (10, 30), (5, 7), (1, 9))] == [17, 7, 2, 0]


def test_the_search_grid_reaches_the_max_rank_when_it_is_a_multiple_of_the_step():
    # 34x34: max_rank 16 (16 x 68 = 1,088 < 1,156; 17 x 68 = 1,156 is not cheaper)
    layer = budget_layer(34, 34)
    assert search_grid(layer, 8) == [8, 16]
    assert search_grid(layer, 16) == [16]
    assert search_grid(layer, 17) == list(range(1, 17))  # no multiple of 17 is cheaper: every rank
    assert search_grid(layer, 5) == [5, 10, 15]


def test_candidate_ranks_reach_the_max_rank_and_stay_below_the_ceiling():
    layer = budget_layer(34, 34)  # equal-cost rank 17, max_rank 16
    # ceiling 1.0: below 17, i.e. up to the max rank 16 itself
    assert candidate_ranks(layer, 0.1, 1.0, 8) == [8, 16]
    # ceiling 0.95: 16.15 -> below 16, so 16 is not a candidate
    assert candidate_ranks(layer, 0.1, 0.95, 8) == [8]
    # floor 8/17 = 0.47: 7.99.. -> 7 (rounded down); floor 0.5: 8.5 -> 8
    assert candidate_ranks(layer, 0.47, 1.0, 1) == list(range(7, 17))
    assert candidate_ranks(layer, 0.5, 1.0, 1) == list(range(8, 17))
    # 12x12: equal-cost rank 6, max_rank 5 (5 x 24 = 120 < 144): a ceiling of 1.0 stops at 5
    assert candidate_ranks(budget_layer(12, 12), 0.1, 1.0, 1) == [1, 2, 3, 4, 5]


def _flar_pair() -> list[LayerBudget]:
    # "a" 34x34: 68 a rank, max_rank 16, dense 1,156; "b" 64x192: 256 a rank, max_rank 47, dense 12,288
    return [budget_layer(34, 34, name="a"), budget_layer(64, 192, name="b")]


def test_a_layer_scaled_exactly_to_its_max_rank_stays_factored():
    """FLAR-SVD's budget rule at its edge. "a" searched at 8, "b" at 16, step 8: a factor c in [2.5, 3) scales them
    to a = floor(8 c) = 20..23 -> 16 (exactly its max_rank: still cheaper than dense) and b = floor(16 c) = 40..47 ->
    40: 16 x 68 + 40 x 256 = 1,088 + 10,240 = 11,328 parameters, the budget. At c = 3, a = 24 passes its max_rank and
    goes dense and b = 48 > 47 goes dense too (13,444, over the budget)."""
    ranks, total = scale_to_budget(_flar_pair(), {"a": 8, "b": 16}, 11_328, 8)
    assert ranks == {"a": 16, "b": 40} and total == 11_328


def test_a_layer_scaled_one_step_past_its_max_rank_goes_dense():
    """Searched at 8 each, budget 7,300: c in [3, 4) gives a = 24 > 16 (dense, 1,156) and b = 24 (6,144): 7,300
    exactly; c in [2, 3) gives a = 16, b = 16 (1,088 + 4,096 = 5,184) and the largest factor that fits is taken."""
    ranks, total = scale_to_budget(_flar_pair(), {"a": 8, "b": 8}, 7_300, 8)
    assert ranks == {"a": None, "b": 24} and total == 7_300


def test_a_layer_whose_max_rank_is_below_the_step_keeps_its_max_rank_as_its_floor():
    # 10x10: max_rank 4 (4 x 20 = 80 < 100), below the step 8: its floor is rank 4, not 8 (which would be dense);
    # with b at 8 (2,048): 80 + 2,048 = 2,128 is the smallest model the rule reaches
    layers = [budget_layer(10, 10, name="a"), budget_layer(64, 192, name="b")]
    ranks, total = scale_to_budget(layers, {"a": 4, "b": 8}, 2_128, 8)
    assert ranks == {"a": 4, "b": 8} and total == 2_128
    with pytest.raises(ValueError, match="1 parameters more"):
        scale_to_budget(layers, {"a": 4, "b": 8}, 2_127, 8)
