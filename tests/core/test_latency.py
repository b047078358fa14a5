"""Tests of lowrank_vit/core/latency.py."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from lowrank_vit import CompressionConfig, compress
from lowrank_vit.core.budget import LayerBudget
from lowrank_vit.core.latency import (
    LatencyTable,
    ShapeLatency,
    Timing,
    allocate_latency,
    check_speedup,
    knapsack,
    latency_choices,
    latency_report,
    predicted_ms,
    rank_limits,
)
from lowrank_vit.speed.profile import rank_grid
from tests.helpers import LATENCY_ARCH, LATENCY_KWARGS, _fabricated, _latency_images, _latency_model, _t


def test_timing_quartiles_equal_numpys():
    rng = random.Random(3)
    for n in (1, 2, 5, 8, 13):
        samples = [rng.uniform(1, 9) for _ in range(n)]
        t = Timing.of(samples)
        assert (t.median, t.low, t.high) == pytest.approx(tuple(np.percentile(samples, [50, 25, 75])))
        assert t.repeats == n
    with pytest.raises(ValueError, match="at least one"):
        Timing.of([])


def test_factored_time_interpolates_between_profiled_ranks_and_break_even_is_the_largest_faster_rank():
    s = ShapeLatency(8, 8, 4, True, _t(5.0), (4, 8, 12), (_t(2.0), _t(6.0), _t(4.0)))
    assert [s.factored_ms(r) for r in (4, 8, 12)] == [2.0, 6.0, 4.0]
    assert s.factored_ms(6) == pytest.approx(4.0) and s.factored_ms(10) == pytest.approx(5.0)
    assert s.factored_ms(2) == pytest.approx(2.0)  # never predicted faster than the smallest rank measured
    assert s.break_even() == 12  # 12 is faster than dense although 8 is not
    never = ShapeLatency(8, 8, 4, True, _t(1.0), (4, 8), (_t(2.0), _t(3.0)))
    assert never.break_even() == 0


def test_table_round_trips_through_json_and_refuses_what_it_cannot_read(tmp_path):
    table = _fabricated(_latency_model())
    path = table.save(tmp_path / "t.json")
    assert LatencyTable.load(path) == table
    data = json.loads(path.read_text())
    for broken, match in [({**data, "format": 99}, "re-profile"), ({k: v for k, v in data.items() if k != "shapes"},
                                                                   "malformed"),
                          ({**data, "layers": {"blocks.0.attn.qkv": "nope"}}, "no measured shape")]:
        (tmp_path / "b.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            LatencyTable.load(tmp_path / "b.json")
    with pytest.raises(ValueError, match="does not exist"):
        LatencyTable.load(tmp_path / "missing.json")


@pytest.mark.parametrize("change, match", [
    ({"versions": {"torch": "0.0.1"}}, "torch 0.0.1"),
    ({"device_name": "Some Other CPU"}, "device_name"),
    ({"threads": 999}, "threads"),
])
def test_a_table_from_another_machine_or_other_versions_is_refused(tmp_path, change, match):
    model = _latency_model()
    path = _fabricated(model, **change).save(tmp_path / "t.json")
    cfg = CompressionConfig(reduction=0.3, latency_table=str(path), calib_samples=12, progress=False)
    with pytest.raises(ValueError, match=match) as err:
        compress(copy.deepcopy(model), _latency_images(), cfg)
    assert "re-profile" in str(err.value)


def test_a_table_of_another_model_is_refused(tmp_path):
    import timm

    other = timm.create_model(LATENCY_ARCH, pretrained=False, **{**LATENCY_KWARGS, "embed_dim": 48}).eval()
    path = _fabricated(other).save(tmp_path / "t.json")
    with pytest.raises(ValueError, match="profile this model"):
        compress(
            _latency_model(),
            _latency_images(),
            CompressionConfig(reduction=0.3, latency_table=str(path), calib_samples=12, progress=False),
        )


def _random_problem(seed: int) -> tuple[list[LayerBudget], LatencyTable]:
    """3-4 layers of random shapes, random convex-ish loss curves and random (non-monotone) timings."""
    rng = random.Random(seed)
    layers, shapes, keys = [], {}, {}
    for i in range(rng.randint(3, 4)):
        k, m = rng.choice([(12, 20), (16, 16), (24, 8), (20, 28)])
        ranks = tuple(rank_grid(k, m, rng.choice([2, 4])))
        values = sorted((rng.uniform(0, 1) ** 3 for _ in range(min(k, m))), reverse=True)
        tails = torch.tensor([sum(values[r:]) for r in range(len(values) + 1)], dtype=torch.float64)
        q = rng.choice([0, 0, 1])
        name = f"l{i}"
        layers.append(LayerBudget(name, k, m, q * (k + m), tails))
        dense = rng.uniform(1, 3)
        key = f"{name}-{k}x{m}"
        shapes[key] = ShapeLatency(
            k,
            m,
            10,
            True,
            _t(dense),
            ranks,
            tuple(_t(rng.uniform(0.2, 1.3) * dense * (0.3 + r / ranks[-1])) for r in ranks),
        )
        keys[name] = key
    total = sum(s.dense.median for s in shapes.values())
    table = LatencyTable(
        "random", 1, "cpu", "x", "torch", "float32", 1, {}, _t(total + rng.uniform(0.5, 3)), keys, shapes, 4
    )
    return layers, table


@pytest.mark.parametrize("seed", range(24))
def test_latency_allocation_is_the_brute_force_optimum_within_its_resolution(seed):
    """The knapsack's loss lies between the brute-force optimum at the budget (it fits the budget) and the optimum at
    the budget less one step per layer (it loses no more than that): both bounds by enumeration."""
    layers, table = _random_problem(seed)
    names = [layer.name for layer in layers]
    options = []
    for layer in layers:
        q = layer.z_params // layer.rank_step
        ranks = [r - q for r in table.shape_of(layer.name).ranks if 1 <= r - q <= layer.max_rank]
        options.append([None, *ranks])
    combos = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*options)]
    fastest = min(predicted_ms(layers, table, ranks) for ranks in combos)
    target = random.Random(seed).uniform(1.01, 0.98 * table.model_ms.median / fastest)
    goal = table.model_ms.median / target
    resolution = 64  # coarse, so that the lower bound is tested apart from the upper one

    def optimum(limit: float) -> float:
        fits = [
            sum(layer.loss(r[layer.name]) for layer in layers)
            for r in combos
            if predicted_ms(layers, table, r) <= limit + 1e-12
        ]
        return min(fits, default=math.inf)

    allocation = allocate_latency(layers, table, target, resolution=resolution)
    got = sum(layer.loss(allocation.ranks[layer.name]) for layer in layers)
    fixed = table.model_ms.median - sum(table.shape_of(name).dense_ms for name in names)
    step = (goal - fixed) / resolution
    assert predicted_ms(layers, table, allocation.ranks) <= goal + 1e-9
    assert optimum(goal) - 1e-12 <= got <= optimum(goal - len(layers) * step) + 1e-12
    assert allocation.params == sum(layer.params(allocation.ranks[layer.name]) for layer in layers)
    fine = allocate_latency(layers, table, target)  # the default resolution: one step is 1/8192 of the budget
    bound = optimum(goal - len(layers) * (goal - fixed) / 8192)
    assert optimum(goal) - 1e-12 <= sum(layer.loss(fine.ranks[layer.name]) for layer in layers) <= bound + 1e-12


def test_knapsack_is_exact_on_whole_step_costs():
    rng = random.Random(11)
    for _ in range(30):
        groups = [[(float(rng.randint(0, 6)), rng.random()) for _ in range(rng.randint(1, 4))] for _ in range(4)]
        budget = rng.randint(0, 20)
        best = (
            min(
                (sum(g[i][1] for g, i in zip(groups, combo, strict=True)), combo)
                for combo in itertools.product(*(range(len(g)) for g in groups))
                if sum(g[i][0] for g, i in zip(groups, combo, strict=True)) <= budget
            )
            if any(
                sum(g[i][0] for g, i in zip(groups, c, strict=True)) <= budget
                for c in itertools.product(*(range(len(g)) for g in groups))
            )
            else None
        )
        if best is None:
            with pytest.raises(ValueError):
                knapsack(groups, budget, resolution=max(budget, 1))
            continue
        picks = knapsack(groups, budget, resolution=max(budget, 1))
        assert sum(g[i][1] for g, i in zip(groups, picks, strict=True)) == pytest.approx(best[0])
        assert sum(g[i][0] for g, i in zip(groups, picks, strict=True)) <= budget


def test_an_unreachable_speedup_names_the_largest_reachable_one_which_is_reachable():
    layers, table = _random_problem(5)
    with pytest.raises(ValueError, match="out of reach") as err:
        allocate_latency(layers, table, 50.0)
    reachable = float(str(err.value).split("at most ")[1].split("x")[0])
    assert reachable > 1
    allocate_latency(layers, table, reachable)  # as printed: reachable


def test_rank_limits_subtract_the_folded_z_rank_from_the_break_even_rank():
    with_z = 0
    for seed in range(10):
        layers, table = _random_problem(seed)
        limits = rank_limits(layers, table)
        for layer in layers:
            q = layer.z_params // layer.rank_step
            assert limits[layer.name] == max(0, table.shape_of(layer.name).break_even() - q)
            with_z += q > 0 and table.shape_of(layer.name).break_even() > 0
    assert with_z >= 3  # the fixture exercises the subtraction


def test_the_predicted_model_time_is_the_raw_timings_arithmetic_with_the_call_overhead_taken_out():
    """Against a hand computation from the table's raw medians, with a non-zero per-call overhead (0.3 ms): a layer
    inside the model costs its measured median less the overhead, so the dense model's 10 ms loses, per factorized
    layer, (dense - overhead) - (factored - overhead). Layer a at rank 12 lies halfway between the grid's 8 (0.6 ms)
    and 16 (0.8 ms): 0.7 - 0.3 = 0.4 inside the model against 1.0 - 0.3 = 0.7 dense; c at rank 4, below the grid,
    costs the first rank's 0.6 - 0.3 against 0.7; b stays dense. Predicted: 10 - 0.3 - 0.4 = 9.3 ms."""

    def timing(ms: float) -> Timing:
        return Timing(ms, ms, ms, 5)

    shape = ShapeLatency(64, 64, 16, True, timing(1.0), (8, 16), (timing(0.6), timing(0.8)), timing(0.3))
    table = LatencyTable(
        "hand",
        1,
        "cpu",
        "cpu",
        "torch",
        "float32",
        1,
        {},
        timing(10.0),
        {name: shape.key for name in "abc"},
        {shape.key: shape},
    )
    layers = [LayerBudget(name, 64, 64, 0, torch.zeros(65)) for name in "abc"]
    report = latency_report(layers, table, {"a": 12, "b": None, "c": 4})
    assert report["layers_ms"] == pytest.approx({"a": 0.7 - 0.3, "b": 1.0 - 0.3, "c": 0.6 - 0.3})
    assert report["predicted_ms"] == pytest.approx(10.0 - ((1.0 - 0.3) - (0.7 - 0.3)) - ((1.0 - 0.3) - (0.6 - 0.3)))
    assert report["predicted_ms"] == pytest.approx(9.3)
    assert report["predicted_speedup"] == pytest.approx(10.0 / 9.3)


# --------------------------------------------------------------- the edges of the latency rank rules, by hand


def _edge_table(factored_ms: tuple[float, ...], ranks: tuple[int, ...] = (4, 8, 12), dense_ms: float = 2.0,
                model_ms: float = 10.0) -> LatencyTable:
    shape = ShapeLatency(8, 24, 10, True, _t(dense_ms), ranks, tuple(_t(ms) for ms in factored_ms))
    return LatencyTable("edge", 1, "cpu", "x", "torch", "float32", 1, {}, _t(model_ms), {"a": "s"}, {"s": shape}, 4)


@pytest.mark.parametrize(("factored", "expected"), [
    ((1.0, 2.0, 3.0), 4),  # rank 8 takes exactly the dense time: not faster
    ((1.0, 1.999, 3.0), 8),  # just below it: faster
    ((2.0, 2.5, 3.0), 0),  # no profiled rank is faster: 0 keeps the layer dense
])
def test_break_even_is_the_largest_rank_strictly_faster_than_dense(factored, expected):
    assert _edge_table(factored).shape_of("a").break_even() == expected


@pytest.mark.parametrize(("z", "limit"), [(0, 8), (127, 5), (128, 4), (256, 0), (288, 0)])
def test_rank_limits_subtract_the_whole_ranks_of_z_and_never_go_below_zero(z, limit):
    """8x24 (32 a rank) breaking even at 8: a Z of 127 parameters folds into 3 ranks (127 // 32) -> 5; 128 is 4
    ranks -> 4; 256 is 8 -> 0; 288 is 9, past the break-even rank -> 0 (dense), not -1."""
    layer = LayerBudget("a", 8, 24, z, torch.zeros(9, dtype=torch.float64))
    assert rank_limits([layer], _edge_table((1.0, 1.5, 3.0))) == {"a": limit}


def test_latency_choices_are_the_profiled_ranks_from_one_to_the_max_rank_inclusive():
    """Grid (1, 3, 5, 6) on 8x24 (max_rank 5): 1, 3 and 5 are options, 6 is not. With a Z of one rank (32, max_rank
    now (192 - 32 - 1) // 32 = 4) the U V^T ranks are the grid less 1: 0 is no option, 2 and 4 are, 5 is not."""
    table = _edge_table((1.0, 1.2, 1.4, 1.5), ranks=(1, 3, 5, 6))
    plain = LayerBudget("a", 8, 24, 0, torch.zeros(9, dtype=torch.float64))
    with_z = LayerBudget("a", 8, 24, 32, torch.zeros(9, dtype=torch.float64))
    assert [rank for rank, _, _ in latency_choices(plain, table)] == [1, 3, 5, None]
    assert [rank for rank, _, _ in latency_choices(with_z, table)] == [2, 4, None]


def test_a_speedup_reachable_exactly_is_accepted_and_the_next_float_is_not():
    """Model 10 ms, the layer 4 ms dense and 2 ms at its fastest rank (4): the fastest model is 10 - 4 + 2 = 8 ms,
    so 10 / 8 = 1.25 is reachable exactly; the target must be above 1."""
    layer = LayerBudget("a", 8, 24, 0, torch.zeros(9, dtype=torch.float64))
    table = _edge_table((2.0, 3.0, 3.5), dense_ms=4.0)
    check_speedup([layer], table, 1.25)
    with pytest.raises(ValueError, match=r"at most 1\.25x"):
        check_speedup([layer], table, math.nextafter(1.25, 2.0))
    with pytest.raises(ValueError, match=r"target_speedup must be a finite number > 1, got 1"):
        check_speedup([layer], table, 1)


@pytest.mark.parametrize(("budget", "pick"), [(2.0, 0), (1.99, 1)])
def test_knapsack_takes_an_option_costing_exactly_the_budget(budget, pick):
    """Costs are rounded up to whole steps of budget / 64: 2.0 is 64 steps of a budget of 2.0 (fits), 64.3 -> 65 steps
    of a budget of 1.99 (does not)."""
    assert knapsack([[(2.0, 1.0), (0.0, 5.0)]], budget, resolution=64) == [pick]
