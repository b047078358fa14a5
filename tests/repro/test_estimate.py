"""Tests of lowrank_vit/repro/estimate.py."""

from __future__ import annotations

import json

import pytest

from lowrank_vit.config import RECIPES, resolve_gram_precision
from lowrank_vit.repro import estimate
from lowrank_vit.repro.registry import get_experiment, list_experiments
from tests.helpers import (
    REPO,
    ROWS,
    cli,
)

ROOT = REPO


BENCHMARK = ROOT / "benchmarks" / "results" / "compress_time_deit_small_estimate_check.json"


def _stage(est: dict, name: str) -> dict:
    return next(s for s in est["stages"] if s["name"] == name)


def test_more_images_epochs_and_devices_move_the_estimate_the_right_way():
    exp = get_experiment(ROWS["loss-aware"])
    base = estimate.estimate_row(exp, device="a100")
    more_calib = estimate.estimate_row(exp, device="a100", overrides=["compression.calib_samples=2048",
                                                                       "data.calib_samples=2048"])
    for stage in ("calibration forward", "calibration backward", "statistics"):
        assert _stage(more_calib, stage)["flops"] == pytest.approx(2 * _stage(base, stage)["flops"])
    more_epochs = estimate.estimate_row(exp, device="a100", overrides=["finetune.epochs=40"])
    assert _stage(more_epochs, "fine-tune")["seconds"] == pytest.approx(2 * _stage(base, "fine-tune")["seconds"])
    eight = estimate.estimate_row(exp, device="a100", devices=8)
    assert _stage(eight, "fine-tune")["seconds"] < _stage(base, "fine-tune")["seconds"] / 7.9
    for stage in ("calibration forward", "evaluation final"):  # one process compresses, rank zero evaluates
        assert _stage(eight, stage)["seconds"] == _stage(base, stage)["seconds"]
    assert eight["total_seconds"] < base["total_seconds"]
    faster = estimate.estimate_row(exp, device="h100")
    assert faster["total_seconds"] < base["total_seconds"]
    more_removed = estimate.estimate_row(get_experiment("table2/deit_s/loss-aware-60"), device="a100")
    assert _stage(more_removed, "fine-tune")["flops"] < _stage(base, "fine-tune")["flops"]


def test_a_table_evaluates_each_dense_model_once():
    exps = list_experiments("table2/deit_s/*")
    data = estimate.estimate_rows(exps, device="a100")
    dense = [r["name"] for r in data["rows"] if any(s["name"] == "evaluation dense" for s in r["stages"])]
    assert dense == [exps[0].name]
    assert data["total_seconds"] == pytest.approx(sum(r["total_seconds"] for r in data["rows"]))


def test_float64_warning_follows_its_rule_on_every_device():
    """Warned exactly when the float64 products of the statistics exceed a third of the estimated compression time
    (the hooks' host time on a GPU, which does not depend on the precision, is not part of the share); float64 at
    1/32 of float32 (A6000) makes them a larger share than on an H100, and float32 products silence it."""
    exp = get_experiment(ROWS["paper"])
    shares = {}
    for device in estimate.DEVICES:
        est = estimate.estimate_row(exp, device=device, overrides=["compression.gram_precision=float64"])
        stats = _stage(est, "statistics")
        assert stats["precision"] == "float64"
        hooks = stats["seconds"] - stats["products_seconds"]
        assert hooks == 0.0 if device == "cpu" else hooks > 0.0, device
        shares[device] = stats["products_seconds"] / est["compress_seconds"]
        warned = any("gram_precision=float32" in w for w in est["warnings"])
        assert warned == (shares[device] > estimate.F64_SHARE_WARNING), device
    assert shares["a6000"] > shares["h100"] and shares["rtx4090"] > shares["a100"]
    assert shares["a6000"] > estimate.F64_SHARE_WARNING  # what the issue asked to flag, at the figures used
    quiet = estimate.estimate_row(exp, device="a6000", overrides=["compression.gram_precision=float32"])
    assert not any("gram_precision" in w for w in quiet["warnings"])


def test_statistics_precision_is_the_one_the_run_resolves():
    """"auto" is float32 on every GPU for every method and float64 on the CPU for the paper's recipe (as
    resolve_gram_precision decides where the statistics run); an explicit value is kept."""
    for name, on_cpu in (("loss-aware", "fp32"), ("paper", "fp64")):
        cfg = get_experiment(ROWS[name]).full.compression
        assert cfg.gram_precision is None
        assert estimate.statistics_precision(cfg, "cpu") == on_cpu
        assert all(estimate.statistics_precision(cfg, gpu) == "fp32" for gpu in estimate.DEVICES if gpu != "cpu")
        est = estimate.estimate_row(get_experiment(ROWS[name]), device="a6000")
        assert not any("gram_precision" in w for w in est["warnings"])  # auto: nothing in float64 on a GPU
        assert _stage(est, "statistics")["precision"] == "float32" and "float32 products" in \
            _stage(est, "statistics")["detail"]
    est = estimate.estimate_row(get_experiment(ROWS["loss-aware"]), device="a6000",
                                overrides=["compression.gram_precision=float64"])
    assert _stage(est, "statistics")["precision"] == "float64"


def test_plan_estimate_json(capsys):
    code, out, _ = cli(capsys, "plan", ROWS["paper"], "--estimate", "--gpu", "h100", "--devices", "2", "--json")
    assert code == 0
    data = json.loads(out)
    assert {"stages", "total_seconds", "device", "devices", "name"} <= set(data)
    assert data["device"] == "h100" and data["devices"] == 2 and data["estimate"] is True
    for stage in data["stages"]:
        assert {"flops", "seconds", "memory_gib"} <= set(stage)
    assert data["total_seconds"] == pytest.approx(sum(s["seconds"] for s in data["stages"]))


def test_printed_estimates_are_labelled(capsys):
    code, out, _ = cli(capsys, "plan", ROWS["paper"], "--estimate", "--gpu", "a6000",
                       "--set", "compression.gram_precision=float64")
    assert code == 0 and "estimated" in out.splitlines()[0]
    assert "warning:" in out and "--set compression.gram_precision=float32" in out
    code, out, _ = cli(capsys, "reproduce", "table2", "--rows", "table2/deit_s/*", "--dry-run", "--estimate")
    assert code == 0
    lines = out.splitlines()
    assert all("estimated" in line for line in lines if line.startswith("  table2/"))
    assert len([line for line in lines if line.startswith("  table2/")]) == len(list_experiments("table2/deit_s/*"))
    assert any(line.startswith("estimated total:") for line in lines)


def test_api_rejects_zero_devices():
    with pytest.raises(ValueError, match="positive integer"):
        estimate.estimate_row(get_experiment(ROWS["paper"]), devices=0)


def test_cpu_estimate_agrees_with_the_committed_benchmark_within_2x():
    """The issue's bar: the estimated compression of DeiT-S with 256 calibration images on `--gpu cpu` within a
    factor of 2 of benchmarks/compress_time.py measured on the development CPU (the committed JSON, its whole
    `compress` time, for every recipe it timed)."""
    bench = json.loads(BENCHMARK.read_text())
    assert "--model deit_small --calib 256" in bench["command"]
    assert {row["recipe"] for row in bench["rows"]} == set(ROWS)
    for row in bench["rows"]:
        exp = get_experiment(ROWS[row["recipe"]])
        compression = exp.full.compression
        for key, value in RECIPES[row["recipe"]].items():  # the row is the benchmark's recipe
            assert getattr(compression, key) == value, (row["recipe"], key)
        assert resolve_gram_precision(compression, "cpu") == row["gram_precision"] and exp.reduction == row["reduction"]
        est = estimate.estimate_row(exp, device="cpu", overrides=[
            f"compression.calib_samples={row['calib_images']}", f"data.calib_samples={row['calib_images']}"])
        ratio = est["compress_seconds"] / row["total_s"]
        assert 0.5 <= ratio <= 2.0, (row["recipe"], est["compress_seconds"], row["total_s"])


def test_pass_stages_are_their_flops_at_the_gemm_rate():
    """Evaluations and the fine-tune, by hand: val (train) images times the compressed model's forward (times 3
    for a training step), at the float32 peak times the GEMM efficiency (the fine-tune divided over devices)."""
    exp = get_experiment(ROWS["paper"])
    est = estimate.estimate_row(exp, device="a100", devices=4)
    shapes = estimate.model_shapes(exp.full.model)
    rate = estimate.DEVICES["a100"].peak_tflops["fp32"] * 1e12 * estimate.GEMM_EFFICIENCY
    train, val = estimate.DATASET_SIZES["imagenet-1k"]
    assert _stage(est, "evaluation dense")["flops"] == pytest.approx(val * shapes.forward_flops)
    final = _stage(est, "evaluation final")
    assert final["seconds"] == pytest.approx(final["flops"] / rate)
    compressed = final["flops"] / val
    assert shapes.forward_flops * 0.4 < compressed < shapes.forward_flops * 0.7  # -50% of the parameters
    tune = _stage(est, "fine-tune")
    batch = exp.full.finetune.batch_size
    steps = exp.full.finetune.epochs * -(-train // (batch * 4))
    assert tune["flops"] == pytest.approx(3 * compressed * steps * batch * 4)
    assert tune["seconds"] == pytest.approx(tune["flops"] / rate / 4)


def test_cpu_stages_agree_with_the_benchmark_within_3x():
    """Stage by stage, looser than the whole: the calibration forward, the statistics (with the loss-aware
    backward, which the benchmark counts in them) and the decompositions, each within a factor of 3."""
    bench = json.loads(BENCHMARK.read_text())
    for row in bench["rows"]:
        est = estimate.estimate_row(get_experiment(ROWS[row["recipe"]]), device="cpu", overrides=[
            f"compression.calib_samples={row['calib_images']}", f"data.calib_samples={row['calib_images']}"])
        seconds = {s["name"]: s["seconds"] for s in est["stages"]}
        pairs = {"calibration_forward_s": seconds["calibration forward"],
                 "statistics_s": seconds["statistics"] + seconds.get("calibration backward", 0.0),
                 "decomposition_s": seconds["decomposition"]}
        for key, value in pairs.items():
            assert 1 / 3 <= value / row[key] <= 3, (row["recipe"], key, value, row[key])


def test_compression_memory_agrees_with_the_measured_vit_l_peak_within_2x():
    """The largest model of the tables: the estimated peak of the compress stages of ViT-L with the loss-aware
    recipe within a factor of 2 of the peak resident memory measured by benchmarks/compress_time.py --peak-memory
    (the committed JSON, one fresh process per number of images; the measurement includes the process's own
    footprint, the estimate does not). Before the estimate counted every layer's kept factors it said 3.1 GiB
    against 10 GiB."""
    bench = json.loads((ROOT / "benchmarks" / "results" / "peak_memory_vit_large_loss_aware.json").read_text())
    command = bench["command"]
    assert "--model vit_large_patch16_224" in command and "--recipe loss-aware" in command
    assert "--batch-size 8" in command
    exp = get_experiment("table3/vit_l/loss-aware")
    assert exp.full.compression.decomposition == RECIPES["loss-aware"]["decomposition"]
    for row in bench["memory"]:
        n = row["calib_images"]
        est = estimate.estimate_row(exp, device="cpu", overrides=[
            f"compression.calib_samples={n}", f"data.calib_samples={n}", "finetune.batch_size=8"])
        compress_names = {"calibration forward", "calibration backward", "statistics", "decomposition",
                          "allocation", "compensation", "report"}
        stages = {s["name"]: s["memory_gib"] for s in est["stages"] if s["name"] in compress_names}
        measured_gib = row["peak_rss_mib"] / 1024
        assert 0.5 <= max(stages.values()) / measured_gib <= 2.0, (n, stages, measured_gib)
        # where the peak falls, as measured stage by stage (docs/rehearse.md): after the decompositions, with every
        # layer's factors held for the allocation, not in the calibration's backward
        assert max(stages, key=stages.get) == "decomposition", stages


def test_comcat_search_is_estimated_as_its_training_steps():
    """compare/deit_s/comcat-search-50: 30 rounds of batch 64 over the row's 1,024 calibration images: 29 search passes
    and 30 training passes of 16 steps each, 944 steps of four forward-equivalents of 64 images."""
    exp = get_experiment("compare/deit_s/comcat-search-50-noft")
    est = estimate.estimate_row(exp, device="a100")
    stage, forward = _stage(est, "search"), _stage(est, "calibration forward")
    steps = 29 * 16 + 30 * 16
    assert stage["flops"] == pytest.approx(steps * 64 * 4 * forward["flops"] / 1024)
    assert "COMCAT: 944 steps of 64 images over 30 rounds" in stage["detail"]
    shorter = estimate.estimate_row(exp, device="a100", overrides=["compression.settings.search_rounds=2"])
    assert _stage(shorter, "search")["flops"] == pytest.approx((1 * 16 + 2 * 16) * 64 * 4 * forward["flops"] / 1024)


def test_refit_adds_its_stage_to_the_compression():
    """``compression.refit=true``: a "refit" stage of about five forwards over the calibration images (both streams),
    counted in the compression's time, holding the dense copy beside the compressed model."""
    exp = get_experiment(ROWS["loss-aware"])
    base = estimate.estimate_row(exp, device="a100")
    refit = estimate.estimate_row(exp, device="a100", overrides=["compression.refit=true"])
    assert "refit" not in {s["name"] for s in base["stages"]}
    stage = _stage(refit, "refit")
    forward = _stage(refit, "calibration forward")
    assert stage["flops"] > estimate.REFIT_FORWARDS * forward["flops"]
    assert stage["memory_gib"] > _stage(refit, "calibration forward")["memory_gib"]
    assert refit["compress_seconds"] == pytest.approx(base["compress_seconds"] + stage["seconds"])


def test_distillation_is_estimated_as_its_steps_and_its_checks():
    """``compression.distill_steps=40`` with a batch of 16: 40 steps of four forward-equivalents of 16 images, plus
    five passes over the calibration images (the loss before and after in both models, the layers' errors), counted
    in the compression's time; its memory is more than the calibration forward's."""
    exp = get_experiment(ROWS["loss-aware"])
    base = estimate.estimate_row(exp, device="a100")
    est = estimate.estimate_row(exp, device="a100", overrides=["compression.distill_steps=40",
                                                               "compression.distill_batch_size=16"])
    assert "distillation" not in {s["name"] for s in base["stages"]}
    stage, forward = _stage(est, "distillation"), _stage(est, "calibration forward")
    images = int(forward["detail"].split()[0])
    assert stage["flops"] == pytest.approx((40 * 16 * 4 + 5 * images) * forward["flops"] / images)
    assert "40 steps of 16 images" in stage["detail"]
    assert stage["memory_gib"] > forward["memory_gib"]
    assert est["compress_seconds"] == pytest.approx(base["compress_seconds"] + stage["seconds"])


def test_the_distillations_memory_follows_its_micro_batch_and_its_time_does_not():
    """``distill_micro_batch`` bounds the activations held for the backward: the estimate's memory grows linearly
    with it (32, 16, 4 images of a batch of 64) and its FLOPs stay (the same steps); a micro-batch above the batch
    holds no more than the batch."""
    exp = get_experiment(ROWS["loss-aware"])
    stages = {micro: _stage(estimate.estimate_row(exp, device="a100", overrides=[
        "compression.distill_steps=40", f"compression.distill_micro_batch={micro}"]), "distillation")
        for micro in (4, 16, 32, 64, 128)}
    assert len({s["flops"] for s in stages.values()}) == 1
    memory = {micro: s["memory_gib"] for micro, s in stages.items()}
    assert 0 < memory[4] < memory[16] < memory[32] < memory[64] == memory[128]
    assert (memory[32] - memory[16]) / 16 == pytest.approx((memory[16] - memory[4]) / 12)


def test_the_refit_memory_counts_the_widest_blocks_recorded_inputs():
    """The refit records the dense block's layer inputs at once: the estimate's memory counts the block whose layers
    see the most input values per image, blocks as the adapter groups them (a Swin's, across its stages, too)."""
    from lowrank_vit.repro.modelshapes import LinearShape, model_shapes

    layers = (LinearShape("blocks.0.attn.qkv", 8, 24, 5, "blocks.0"),
              LinearShape("blocks.0.mlp.fc2", 32, 8, 5, "blocks.0"),
              LinearShape("layers.1.blocks.0.attn.qkv", 16, 48, 3, "layers.1.blocks.0"),
              LinearShape("layers.1.blocks.0.mlp.fc2", 64, 16, 3, "layers.1.blocks.0"),
              LinearShape("layers.1.blocks.1.mlp.fc2", 64, 16, 3, "layers.1.blocks.1"))
    assert estimate._widest_block_inputs(layers) == 16 * 3 + 64 * 3  # 240, against 8 * 5 + 32 * 5 = 200
    assert estimate._widest_block_inputs(()) == 0
    shapes = model_shapes(get_experiment(ROWS["loss-aware"]).full.model)  # DeiT-S: 12 blocks of 4 layers
    blocks = {layer.block for layer in shapes.layers}
    assert len(blocks) == 12 and all(block.startswith("blocks.") for block in blocks)
    assert estimate._widest_block_inputs(shapes.layers) == 197 * (384 * 3 + 1536)  # qkv, proj, fc1 and fc2


def test_refit_estimate_agrees_with_its_benchmark_within_2x():
    """The refit stage and the whole compression with it, estimated on `--gpu cpu`, within a factor of 2 of
    benchmarks/compress_time.py's committed measurement (DeiT-S, 256 images, the loss-aware-refit recipe), both in
    units of the calibration forward (estimated and measured beside them): that measurement is redone whenever the
    refit changes, on whatever speed this shared CPU has that day (its forward has taken 12 s to 37 s), and the
    estimate's absolute CPU rate has its own check (test_cpu_estimate_agrees_with_the_committed_benchmark_within_2x)."""
    bench = json.loads((ROOT / "benchmarks" / "results" / "compress_time_deit_small_refit.json").read_text())
    row = next(r for r in bench["rows"] if r["recipe"] == "loss-aware-refit")
    assert RECIPES["loss-aware-refit"]["refit"] is True and row["refit_s"] > 0
    est = estimate.estimate_row(get_experiment(ROWS["loss-aware"]), device="cpu", overrides=[
        f"compression.calib_samples={row['calib_images']}", f"data.calib_samples={row['calib_images']}",
        "compression.refit=true"])
    forward_est, forward = _stage(est, "calibration forward")["seconds"], row["calibration_forward_s"]
    refit_forwards = (_stage(est, "refit")["seconds"] / forward_est) / (row["refit_s"] / forward)
    assert 0.5 <= refit_forwards <= 2.0, refit_forwards
    assert 0.5 <= (est["compress_seconds"] / forward_est) / (row["total_s"] / forward) <= 2.0


def test_h100_compression_agrees_with_the_benchmark():
    """The compress stages on --gpu h100 against the H100 measurements (benchmarks/results/compress_time_*_cuda_h100
    .json, 1024 images in batches of 64): the whole compression within 2x, the calibration forward and the
    statistics (with the backward) within 3x. The hooks' host time per layer and batch was fitted on DeiT-B; DeiT-S
    is the check it was not fitted on. The paper's decompositions are not held to 3x: cuSOLVER's SVD took 3-4x the
    estimate (docs/estimate.md)."""
    for model, tag in (("deit_base", "deit_b"), ("deit_small", "deit_s")):
        bench = json.loads((ROOT / "benchmarks" / "results" / f"compress_time_{model}_cuda_h100.json").read_text())
        assert bench["environment"]["gpu"].startswith("NVIDIA H100")
        rows = {row["recipe"]: row for row in bench["rows"]}
        for recipe, row_name in (("loss-aware", f"table2/{tag}/loss-aware-50"), ("paper", f"table2/{tag}/ours-50")):
            row = rows[recipe]
            est = estimate.estimate_row(get_experiment(row_name), device="h100", overrides=[
                f"compression.calib_samples={row['calib_images']}", f"data.calib_samples={row['calib_images']}",
                f"finetune.batch_size={row['batch_size']}"])
            seconds = {s["name"]: s["seconds"] for s in est["stages"]}
            assert 0.5 <= est["compress_seconds"] / row["total_s"] <= 2.0, (model, recipe)
            pairs = {"calibration_forward_s": seconds["calibration forward"],
                     "statistics_s": seconds["statistics"] + seconds.get("calibration backward", 0.0)}
            for key, value in pairs.items():
                assert 1 / 3 <= value / row[key] <= 3, (model, recipe, key, value, row[key])


def test_a_vmeanba_row_is_estimated_with_one_pass_per_scan_block():
    """VMamba-T has 2+2+8+2 = 14 selective-scan blocks: the impact scores take the dense reference, one pass per
    block and the final KL over the row's 1,024 calibration images; a baseline of the same model has no such stage."""
    from lowrank_vit.repro.estimate import estimate_row

    est = estimate_row(get_experiment("vmeanba/vmamba_t/vmeanba-k2"), "full")
    stage = next(s for s in est["stages"] if s["name"] == "vmeanba")
    assert stage["detail"].startswith("16 passes over 1,024 images")
    per_image = est["forward_gflops_per_image"] * 1e9
    assert stage["flops"] == pytest.approx(per_image * (16 * 1024 + 4 * 5 * 32))  # + dense/switched timing, 5 x 32
    base = estimate_row(get_experiment("vmeanba/vmamba_t/baseline"), "full")
    assert "vmeanba" not in {s["name"] for s in base["stages"]}


def test_a_pruning_row_is_estimated_as_a_cheap_stage_over_the_block_weights():
    """Pruning reads weights, not images: a few operations per block linear weight of VMamba-T (the adapter's
    layers), a fraction of a second, after VMeanba's stage; a row without pruning has no such stage."""
    from lowrank_vit.repro.modelshapes import model_shapes

    exp = get_experiment("vmeanba/vmamba_t/vmeanba-k4-prune-40")
    est = estimate.estimate_row(exp, "full")
    names = [s["name"] for s in est["stages"]]
    assert names.index("vmeanba") + 1 == names.index("pruning")
    weights = sum(layer.in_features * layer.out_features for layer in model_shapes(exp.full.model).layers)
    stage = _stage(est, "pruning")
    assert stage["flops"] == estimate.PRUNING_OPS_PER_WEIGHT * weights and stage["seconds"] < 1.0
    assert stage["detail"] == f"40% of {weights:,} block weights by magnitude, global scope"
    narrow = estimate.estimate_row(exp, "full", overrides=["pruning.scope=layer"])
    assert _stage(narrow, "pruning")["memory_gib"] < stage["memory_gib"]  # one layer's magnitudes at a time
    assert "pruning" not in {s["name"] for s in estimate.estimate_row(
        get_experiment("vmeanba/vmamba_t/vmeanba-k4"), "full")["stages"]}


def test_the_anchored_refit_adds_each_blocks_last_layer_once_and_one_product():
    """``refit_target="block"``: the refit stage grows by, per block, its last layer's forward once (the compressed
    block run to its output; the dense layer's outputs are recorded, not recomputed) and one product of its inputs
    with E, counted by hand from the model's shapes; its memory by the recorded outputs of the widest such layer; the
    rest of the stage is the plain refit's."""
    from lowrank_vit.repro.modelshapes import model_shapes

    exp = get_experiment(ROWS["loss-aware"])
    overrides = ["compression.refit=true", "compression.calib_samples=256", "data.calib_samples=256"]
    plain = estimate.estimate_row(exp, device="a100", overrides=overrides)
    anchored = estimate.estimate_row(exp, device="a100",
                                     overrides=[*overrides, 'compression.settings={"refit_target": "block"}'])
    shapes = model_shapes(exp.full.model)
    fc2 = [layer for layer in shapes.layers if layer.name.endswith("mlp.fc2")]
    assert len(fc2) == len({layer.block for layer in shapes.layers})
    extra = 256 * sum(layer.tokens * 4.0 * layer.in_features * layer.out_features for layer in fc2)
    assert _stage(anchored, "refit")["flops"] - _stage(plain, "refit")["flops"] == pytest.approx(extra)
    outputs = 256 * max(layer.tokens * layer.out_features for layer in fc2) * 4 / 2 ** 30
    assert _stage(anchored, "refit")["memory_gib"] - _stage(plain, "refit")["memory_gib"] == pytest.approx(outputs)
    assert "each block anchored" in _stage(anchored, "refit")["detail"]
    assert "anchored" not in _stage(plain, "refit")["detail"]
