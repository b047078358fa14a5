"""Layer latency tables and the latency-aware allocation (issue: speed you can ship), each against an independent
truth: quartiles against numpy, the latency-priced allocation against brute force, the rank cap against the table's
own timings, the rows a layer sees against the token count of the model's geometry; a stale or foreign table refused.

Timings measured here are never asserted on (no timed tests): fabricated tables with known times drive the
allocation tests, and the measured ones are only checked for their structure."""

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
    knapsack,
    latency_report,
    predicted_ms,
    rank_limits,
    shape_key,
)
from lowrank_vit.nn.factorized import FactorizedLinear, LowRankZ
from lowrank_vit.speed import cached_profile, environment, interleaved_timings, profile_model, rows_per_layer
from lowrank_vit.speed.profile import rank_grid, time_models

from conftest import cli, one_line_error

# a ViT unlike the defaults: odd width, non-square MLP ratio, 3 blocks, 40 px images in 8 px patches, biases on
ARCH = "vit_tiny_patch16_224"
KWARGS = dict(img_size=40, patch_size=8, embed_dim=36, depth=3, num_heads=3, mlp_ratio=3.0, num_classes=5)


def _model(seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, **KWARGS).eval()


def _t(ms: float) -> Timing:
    return Timing(ms, 0.95 * ms, 1.05 * ms, 5)


def _fabricated(model: torch.nn.Module, batch: int = 2, slow: tuple[int, int] | None = None,
                **changes) -> LatencyTable:
    """A table with known times for ``model``'s layers on this machine: dense k m n c, factored (k + m) r n c plus a
    fixed overhead per layer (so small layers break even well below their equal-cost rank); the ``slow`` shape
    (in, out) is slower factored than dense at every rank."""
    from lowrank_vit.nn.adapters import get_adapter

    layers = get_adapter(model).compressible_layers(model)
    rows = rows_per_layer(model, batch, (3, KWARGS["img_size"], KWARGS["img_size"]))
    here = environment("cpu", "torch")
    shapes, keys = {}, {}
    c = 1e-6
    for name, layer in layers.items():
        k, m, n = layer.in_features, layer.out_features, rows[name]
        key = shape_key(k, m, n, layer.bias is not None)
        keys[name] = key
        ranks = tuple(rank_grid(k, m, 4))
        dense = k * m * n * c
        if slow == (k, m):
            factored = tuple(_t(dense * (1.1 + 0.01 * r)) for r in ranks)
        else:
            factored = tuple(_t((k + m) * r * n * c + 0.3 * dense) for r in ranks)
        shapes[key] = ShapeLatency(k, m, n, True, _t(dense), ranks, factored)
    total = sum(shapes[keys[name]].dense.median for name in layers)
    fields = dict(model=ARCH, batch=batch, device="cpu", device_name=here["device_name"], runtime="torch",
                  dtype="float32", threads=here["threads"], versions=here["versions"], model_ms=_t(1.5 * total),
                  layers=keys, shapes=shapes, rank_step=4)
    fields.update(changes)
    return LatencyTable(**fields)


def _images(n: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, KWARGS["img_size"], KWARGS["img_size"], generator=g)]


# --------------------------------------------------------------------------------------------------- the data


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
    table = _fabricated(_model())
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
    model = _model()
    path = _fabricated(model, **change).save(tmp_path / "t.json")
    cfg = CompressionConfig(reduction=0.3, latency_table=str(path), calib_samples=12, progress=False)
    with pytest.raises(ValueError, match=match) as err:
        compress(copy.deepcopy(model), _images(), cfg)
    assert "re-profile" in str(err.value)


def test_a_table_of_another_model_is_refused(tmp_path):
    import timm

    other = timm.create_model(ARCH, pretrained=False, **{**KWARGS, "embed_dim": 48}).eval()
    path = _fabricated(other).save(tmp_path / "t.json")
    with pytest.raises(ValueError, match="profile this model"):
        compress(_model(), _images(), CompressionConfig(reduction=0.3, latency_table=str(path), calib_samples=12,
                                                        progress=False))


# ---------------------------------------------------------------------------------------------- the allocation


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
        shapes[key] = ShapeLatency(k, m, 10, True, _t(dense), ranks,
                                   tuple(_t(rng.uniform(0.2, 1.3) * dense * (0.3 + r / ranks[-1])) for r in ranks))
        keys[name] = key
    total = sum(s.dense.median for s in shapes.values())
    table = LatencyTable("random", 1, "cpu", "x", "torch", "float32", 1, {}, _t(total + rng.uniform(0.5, 3)),
                         keys, shapes, 4)
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
        fits = [sum(layer.loss(r[layer.name]) for layer in layers) for r in combos
                if predicted_ms(layers, table, r) <= limit + 1e-12]
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
        best = min((sum(g[i][1] for g, i in zip(groups, combo, strict=True)), combo)
                   for combo in itertools.product(*(range(len(g)) for g in groups))
                   if sum(g[i][0] for g, i in zip(groups, combo, strict=True)) <= budget) \
            if any(sum(g[i][0] for g, i in zip(groups, c, strict=True)) <= budget
                   for c in itertools.product(*(range(len(g)) for g in groups))) else None
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


# ------------------------------------------------------------------------------------------------- in compress


def test_with_a_table_no_compressed_layer_is_slower_than_dense_and_a_layer_with_no_faster_rank_stays_dense(tmp_path):
    model = _model()
    table = _fabricated(model, slow=(36, 108))  # fc1: 36 -> 108, never faster factored
    path = table.save(tmp_path / "t.json")
    for compensation in ("none", "lowrank"):
        compressed = copy.deepcopy(model)
        report = compress(compressed, _images(), CompressionConfig(
            reduction=0.2, latency_table=str(path), compensation=compensation, calib_samples=12, progress=False))
        budgets = []
        for layer in report.layers:
            budgets.append(LayerBudget(layer.name, layer.in_features, layer.out_features, layer.z_params,
                                       torch.zeros(1)))
            shape = table.shape_of(layer.name)
            if (layer.in_features, layer.out_features) == (36, 108):
                assert layer.rank is None
            if layer.rank is not None:
                q = layer.z_params // (layer.in_features + layer.out_features)
                assert shape.factored_ms(layer.rank + q) < shape.dense.median, layer
        assert any(layer.rank is not None for layer in report.layers)
        assert report.latency["predicted_ms"] == pytest.approx(predicted_ms(budgets, table, report.ranks))
        assert report.latency["predicted_ms"] < report.latency["dense_ms"]
    # parameters only: the same table, no cap; the slow layer is compressed again
    free = compress(copy.deepcopy(model), _images(), CompressionConfig(
        reduction=0.2, latency_table=str(path), latency_limit=False, calib_samples=12, progress=False))
    assert any(layer.rank is not None and (layer.in_features, layer.out_features) == (36, 108)
               for layer in free.layers)


def test_target_speedup_meets_its_prediction_and_spends_the_loss_aware_losses(tmp_path):
    model = _model()
    table = _fabricated(model)
    path = table.save(tmp_path / "t.json")
    compressed = copy.deepcopy(model)
    report = compress(compressed, _images(), CompressionConfig(target_speedup=1.2, latency_table=str(path),
                                                               calib_samples=12, progress=False))
    assert report.latency["predicted_speedup"] >= 1.2 - 1e-9
    assert 0 < report.reduction < 1
    assert report.params_after == sum(p.numel() for p in compressed.parameters())
    assert "target speedup 1.2x" in report.summary()
    for layer in report.layers:  # every chosen rank is one the table measured
        assert layer.rank is None or layer.rank in table.shape_of(layer.name).ranks


@pytest.mark.parametrize("fields, match", [
    (dict(target_speedup=1.5), "needs a latency_table"),
    (dict(target_speedup=1.5, latency_table="t.json", allocation="greedy"), "'marginal'"),
    (dict(target_speedup=1.0, latency_table="t.json"), r"target_speedup must be a finite number > 1"),
    (dict(target_speedup=1.5, reduction=0.5, latency_table="t.json"), "exactly one of"),
    (dict(reduction=0.5, latency_table="t.json", compensation="sparse"), "not timed"),
    (dict(reduction=0.5, latency_table=3), "path of a table"),
    (dict(reduction=0.5, latency_table="t.json", latency_limit="yes"), "latency_limit"),
])
def test_latency_configuration_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**fields)


# ---------------------------------------------------------------------------------------------- measuring


def test_profile_covers_every_layer_with_the_rows_of_the_models_geometry(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path))
    model = _model()
    table, path, fresh = cached_profile(model, batch=3, rank_step=8, repeats=1, warmup=1, min_time=0.0,
                                        progress=False)
    tokens = (KWARGS["img_size"] // KWARGS["patch_size"]) ** 2 + 1  # patches + the class token
    assert fresh and path.parent == tmp_path / "latency"
    assert len(table.layers) == 4 * KWARGS["depth"]
    assert {(s.in_features, s.out_features) for s in table.shapes.values()} == {(36, 108), (36, 36), (36, 108),
                                                                               (108, 36)}
    for s in table.shapes.values():
        assert s.rows == 3 * tokens
        assert list(s.ranks) == [r for r in range(8, s.in_features * s.out_features // (s.in_features +
                                                                                           s.out_features) + 1, 8)]
        assert len(s.factored) == len(s.ranks) and all(t.median > 0 and t.repeats == 1 for t in s.factored)
    assert table.model_ms.median > 0 and table.batch == 3
    again, path2, fresh2 = cached_profile(model, batch=3, rank_step=8, repeats=1, warmup=1, min_time=0.0,
                                          progress=False)
    assert (again, path2, fresh2) == (table, path, False)
    # a different torch version is a different cache entry, measured anew
    monkeypatch.setattr(torch, "__version__", "9.9")
    _, path3, fresh3 = cached_profile(model, batch=3, rank_step=8, repeats=1, warmup=1, min_time=0.0,
                                      progress=False)
    assert fresh3 and path3 != path


def test_profile_refuses_a_compressed_model_and_a_runtime_it_cannot_run():
    model = _model()
    with pytest.raises(ValueError, match="runs float32"):
        profile_model(model, batch=1, runtime="onnxruntime", dtype="bfloat16")
    compress(model, _images(), CompressionConfig(reduction=0.3, calib_samples=12, progress=False))
    with pytest.raises(ValueError, match="dense model"):
        profile_model(model, batch=1)


def test_interleaved_timing_rotates_the_order_of_every_repeat():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timings = interleaved_timings(calls, repeats=3, warmup=1, min_time=0.0)
    assert order[3:] == list("abc" "bca" "cab")  # after one warm-up call each
    assert all(t.repeats == 3 for t in timings.values())


def test_time_models_times_the_folded_copy_and_leaves_the_model_alone():
    model = _model()
    compress(model, _images(), CompressionConfig(reduction=0.3, compensation="lowrank", decomposition="whitened",
                                                 allocation="greedy", calib_samples=12, progress=False))
    zs = [m for m in model.modules() if isinstance(m, LowRankZ)]
    assert zs
    times = time_models({"m": model}, batch=2, input_size=(3, 40, 40), repeats=2, warmup=1, min_time=0.0,
                        progress=False)
    assert times["m"].repeats == 2
    assert [m for m in model.modules() if isinstance(m, LowRankZ)] == zs  # not folded in place
    assert all(isinstance(m, FactorizedLinear) for m in model.modules() if hasattr(m, "U"))


# ------------------------------------------------------------------------------------------------------ CLI

CLI_MODEL = [ARCH, "--model-kwargs", json.dumps(KWARGS)]


def test_cli_profile_prints_the_table_and_writes_the_figure(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    code, out, err = cli(capsys, "profile", *CLI_MODEL, "--batch", "2", "--repeats", "1", "--plot",
                         str(tmp_path / "figs"), "--output", str(tmp_path / "tables"), "--quiet")
    assert code == 0, err
    assert "break-even" in out and "36x108" in out
    assert len(list((tmp_path / "figs").glob("*.png"))) == 1
    (table_file,) = (tmp_path / "tables").glob("*.json")
    assert LatencyTable.load(table_file).batch == 2


@pytest.mark.parametrize("extra, match", [
    (["--runtime", "onnxruntime", "--dtype", "float16"], "runs float32"),
    (["--device", "cuda"], "cuda"),
])
def test_cli_profile_bad_input_is_one_line_with_status_2(capsys, tmp_path, monkeypatch, extra, match):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path))
    code, _, err = cli(capsys, "profile", *CLI_MODEL, "--quiet", *extra)
    assert code == 2
    assert match in one_line_error(err)


def test_cli_compress_refuses_a_stale_table_and_an_unreachable_speedup_in_one_line(capsys, tmp_path):
    model = _model()
    stale = _fabricated(model, versions={"torch": "0.0.1"}).save(tmp_path / "stale.json")
    good = _fabricated(model).save(tmp_path / "good.json")
    (tmp_path / "nodata").mkdir()  # a folder without images: both refusals come before any data is read
    base = ["compress", *CLI_MODEL, "--no-pretrained", "--data", str(tmp_path / "nodata"), "--quiet",
            "--output", str(tmp_path / "out")]
    code, _, err = cli(capsys, *base, "--reduction", "0.3", "--latency-table", str(stale))
    assert code == 2 and "re-profile" in one_line_error(err)
    code, _, err = cli(capsys, *base, "--target-speedup", "40", "--latency-table", str(good))
    assert code == 2 and "out of reach" in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_cli_compress_for_a_target_speedup_reports_predicted_and_measured_latency(capsys, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(25):  # five classes, as the model has
        folder = tmp_path / "imgs" / f"c{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 40, 3)) * 120 + 25 * (i % 5)).astype(np.uint8)).save(folder / f"{i}.png")
    model = _model()
    table = _fabricated(model, batch=4)
    path = table.save(tmp_path / "t.json")
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "compress", *CLI_MODEL, "--no-pretrained", "--data", str(tmp_path / "imgs"),
                            "--target-speedup", "1.25", "--latency-table", str(path), "--calib-samples", "16",
                            "--no-eval", "--mean", "0.5", "--std", "0.5", "--quiet", "--output", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    latency = report["latency"]
    assert latency["batch"] == 4 and latency["predicted_speedup"] >= 1.25 - 1e-9
    assert latency["measured"]["dense"]["repeats"] == 7 and latency["measured_speedup"] > 0
    assert "predicted" in stdout and "measured at batch 4" in stdout
    assert report["compression"]["config"]["rank_multiple"] == 8  # the profiled grid's step, by default
    plan = json.loads((out / "lowrank_vit.json").read_text())
    assert plan["metadata"]["compression_config"]["target_speedup"] == 1.25


def test_each_shapes_times_are_scaled_to_the_models_common_time():
    """A shape whose run saw the model at 20 ms (a busy machine) against a median of 15 ms is scaled by 15/20, one
    that saw 10 ms by 15/10: the layers are compared at one load."""
    from lowrank_vit.speed.profile import _common_load

    def shape(ms: float) -> ShapeLatency:
        return ShapeLatency(4, 4, 2, True, _t(ms), (1, 2), (_t(ms / 2), _t(ms)), _t(ms / 10))

    model_ms, scaled = _common_load({"a": (shape(4.0), _t(10.0)), "b": (shape(8.0), _t(20.0)),
                                     "c": (shape(6.0), _t(15.0))})
    assert model_ms.median == 15.0 and model_ms.repeats == 15
    assert scaled["a"].dense.median == pytest.approx(6.0) and scaled["b"].dense.median == pytest.approx(6.0)
    assert scaled["a"].factored[0].median == pytest.approx(3.0) and scaled["b"].overhead.median == pytest.approx(0.6)
    assert scaled["c"] == shape(6.0)


def test_the_predicted_model_time_is_the_raw_timings_arithmetic_with_the_call_overhead_taken_out():
    """Against a hand computation from the table's raw medians, with a non-zero per-call overhead (0.3 ms): a layer
    inside the model costs its measured median less the overhead, so the dense model's 10 ms loses, per factorized
    layer, (dense - overhead) - (factored - overhead). Layer a at rank 12 lies halfway between the grid's 8 (0.6 ms)
    and 16 (0.8 ms): 0.7 - 0.3 = 0.4 inside the model against 1.0 - 0.3 = 0.7 dense; c at rank 4, below the grid,
    costs the first rank's 0.6 - 0.3 against 0.7; b stays dense. Predicted: 10 - 0.3 - 0.4 = 9.3 ms."""
    def timing(ms: float) -> Timing:
        return Timing(ms, ms, ms, 5)

    shape = ShapeLatency(64, 64, 16, True, timing(1.0), (8, 16), (timing(0.6), timing(0.8)), timing(0.3))
    table = LatencyTable("hand", 1, "cpu", "cpu", "torch", "float32", 1, {}, timing(10.0),
                         {name: shape.key for name in "abc"}, {shape.key: shape})
    layers = [LayerBudget(name, 64, 64, 0, torch.zeros(65)) for name in "abc"]
    report = latency_report(layers, table, {"a": 12, "b": None, "c": 4})
    assert report["layers_ms"] == pytest.approx({"a": 0.7 - 0.3, "b": 1.0 - 0.3, "c": 0.6 - 0.3})
    assert report["predicted_ms"] == pytest.approx(10.0 - ((1.0 - 0.3) - (0.7 - 0.3)) - ((1.0 - 0.3) - (0.6 - 0.3)))
    assert report["predicted_ms"] == pytest.approx(9.3)
    assert report["predicted_speedup"] == pytest.approx(10.0 / 9.3)
