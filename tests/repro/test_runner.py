"""Tests of lowrank_vit/repro/runner.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lowrank_vit.repro.registry import get_experiment
from lowrank_vit.repro.rows import BaselineGuardError
from lowrank_vit.repro.runner import run_row
from tests.helpers import QUICK, ROW, _result, cli, one_line_error

KWARGS = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(honest, head-permuted) safetensors checkpoints of a tiny DeiT trained for three epochs on the digits."""
    import timm
    from safetensors.torch import save_file

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    torch.manual_seed(0)
    name = get_experiment(ROW).full.model.name
    model = timm.create_model(name, pretrained=False, **KWARGS)
    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=64, augment=False), model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):  # about 85% on the validation digits
        for images, labels in dm.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()
    folder = tmp_path_factory.mktemp("guard")
    honest = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    permuted = dict(honest)
    for key in ("head.weight", "head.bias"):  # class c's logit now answers for class c + 1
        permuted[key] = honest[key].roll(1, dims=0).contiguous()
    save_file(honest, str(folder / "honest.safetensors"))
    save_file(permuted, str(folder / "permuted.safetensors"))
    return folder / "honest.safetensors", folder / "permuted.safetensors"


def _overrides(checkpoint) -> list[str]:
    return [f"model.kwargs={json.dumps(KWARGS)}", f"model.checkpoint={checkpoint}", "data.name=mnist-5k",
            "data.num_workers=0", "data.calib_samples=32", "compression.calib_samples=32", "finetune.epochs=1",
            "finetune.max_steps=1", "finetune.batch_size=64"]


def _run(checkpoint, output, extra: tuple[str, ...] = ()):
    return run_row(get_experiment(ROW), "full", output=output, accelerator="cpu", devices=1,
                   overrides=_overrides(checkpoint) + list(extra), wandb="disabled", progress=False)


def test_wrong_class_order_stops_the_row_before_compressing(checkpoints, tmp_path):
    _, permuted = checkpoints
    with pytest.raises(BaselineGuardError) as info:
        _run(permuted, tmp_path)
    message = str(info.value)
    assert "under half the paper's 79.80%" in message and "table2/deit_s/baseline" in message
    for cause in ("class order", "preprocessing", "wrong weights", "run.skip_baseline_guard=true"):
        assert cause in message
    assert not (tmp_path / ROW / "result.json").exists()  # nothing compressed, nothing written as a result


def test_override_runs_the_row_and_an_honest_model_passes(checkpoints, tmp_path):
    honest, permuted = checkpoints
    forced = _run(permuted, tmp_path / "forced", ("run.skip_baseline_guard=true",))
    assert forced["dense"]["top1"] < 0.5 * 79.8 and forced["params"] < forced["params_before"]
    result = _run(honest, tmp_path / "honest")
    assert result["dense"]["top1"] >= 0.5 * 79.8, result["dense"]
    assert (tmp_path / "honest" / ROW / "result.json").is_file()


@pytest.mark.usefixtures("offline_no_token")
def test_full_scale_without_imagenet_says_how(capsys, tmp_path):
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "full", "--output", str(tmp_path / "r"))
    assert code == 2
    line = one_line_error(err)
    assert "ImageNet" in line and "HF_TOKEN" in line and "path" in line
    assert not (tmp_path / "r").exists()
    # with data but no network for the weights
    (tmp_path / "imagenet" / "train" / "a").mkdir(parents=True)
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "full", "--accelerator", "cpu",
                       "--set", f"data.path={tmp_path / 'imagenet'}", "--output", str(tmp_path / "r"))
    assert code == 2 and "pretrained weights" in one_line_error(err)


@pytest.mark.usefixtures("offline_no_token")
@pytest.mark.slow
def test_run_and_reproduce_smoke_end_to_end(capsys, tmp_path):
    out = tmp_path / "results"
    code, _, _ = cli(capsys, "run", "table2/deit_s/baseline", "--scale", "smoke", "--output", str(out), *QUICK)
    assert code == 0
    base = _result(out, "table2/deit_s/baseline")
    assert base["params"] == base["params_before"] and base["reduction"] == 0.0
    assert 0 <= base["top1"] <= 100 and base["top5"] >= base["top1"] and base["val_images"] == 1000
    assert not (out / "table2/deit_s/baseline/model").exists()  # nothing compressed, nothing to save

    code, stdout, err = cli(capsys, "reproduce", "table2", "--scale", "smoke", "--rows", "table2/deit_s/ours-50",
                            "--output", str(out), *QUICK)
    assert code == 0, err
    row = _result(out, "table2/deit_s/ours-50")
    assert row["params"] / row["params_before"] == pytest.approx(0.5, abs=1e-3)
    assert row["finetune"]["steps"] == 3 and row["finetune"]["world_size"] == 1
    assert row["config"]["finetune"]["max_steps"] == 3 and row["residual_error"] is not None
    assert set(row["stage_seconds"]) >= {"load", "compress", "finetune", "evaluate", "total"}
    assert (out / "table2/deit_s/ours-50/model/model.safetensors").is_file()
    assert not (out / "table2/deit_s/ours-50/checkpoints").exists()
    table = {r["name"]: r for r in json.loads((out / "table2.json").read_text())["rows"]}
    assert len(table) == 32 and {n for n, r in table.items() if r["finished"]} == {
        "table2/deit_s/baseline", "table2/deit_s/ours-50"}
    ours = table["table2/deit_s/ours-50"]
    assert ours["paper_top1"] == 79.34 and ours["params_m"] == row["params"] / 1e6
    assert ours["diff_top1"] == pytest.approx(row["top1"] - 79.34)
    md = (out / "table2.md").read_text()
    assert "`table2/deit_s/ours-50` [" in md and "| 11.1 |" in md and "Not run yet" in md
    assert "`table2/deit_s/ours-50` [" in stdout and "`table2/deit_s/baseline`" not in stdout  # the rows asked for

    from lowrank_vit import load_compressed

    model = load_compressed(out / "table2/deit_s/ours-50/model")
    assert sum(p.numel() for p in model.parameters()) == row["params"]

    # finished rows are skipped; a different config in the way is an error, --force replaces it
    code, _, err = cli(capsys, "reproduce", "table2", "--scale", "smoke", "--rows", "table2/deit_s/ours-50",
                       "--output", str(out), *QUICK[:-3])
    assert code == 0 and "already finished, skipped" in err
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "smoke", "--output", str(out), *QUICK,
                       "--set", "finetune.lr=0.01")
    assert code == 2 and "another config" in one_line_error(err)
    assert _result(out, "table2/deit_s/ours-50") == row  # untouched


@pytest.mark.usefixtures("offline_no_token")
def test_a_row_with_distillation_fine_tunes_against_the_dense_model(capsys, tmp_path, monkeypatch):
    """--set finetune.distill=... hands the fine-tune a teacher: the model as built, before compression."""
    import lowrank_vit.stages.finetune as stage
    from lowrank_vit.nn.factorized import FactorizedLinear

    real, seen = stage.finetune, {}

    def spy(model, *args, teacher=None, **kwargs):
        seen.update(teacher=teacher, model=model)
        return real(model, *args, teacher=teacher, **kwargs)

    monkeypatch.setattr(stage, "finetune", spy)
    out = tmp_path / "results"
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "smoke", "--output", str(out), *QUICK,
                       "--set", "finetune.distill=0.5")
    assert code == 0, err
    teacher, row = seen["teacher"], _result(out, "table2/deit_s/ours-50")
    assert teacher is not None and teacher is not seen["model"]
    assert not any(isinstance(m, FactorizedLinear) for m in teacher.modules())
    assert sum(p.numel() for p in teacher.parameters()) == row["params_before"]
    assert row["config"]["finetune"]["distill"] == 0.5


@pytest.mark.usefixtures("offline_no_token")
@pytest.mark.slow
def test_reproduce_a_quantized_table4_row_beside_a_failing_one_then_force(capfd, tmp_path):
    """`reproduce table4` end to end on the smoke scale: the int8 row compresses, fine-tunes, quantizes to 8 bits
    and saves integer codes, and its size is Table 4's accounting of the saved model; a row that fails (its output
    directory is blocked by a file) is reported, the command exits 1 and the table is written with what finished.
    Then --force replaces the finished row's result with a run of another config, which plain `run` refuses."""
    from lowrank_vit import load_compressed, model_size_mib

    out = tmp_path / "results"
    blocked = out / "table4/deit_b/ours-50-fp16"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a directory")
    code, stdout, err = cli(capfd, "reproduce", "table4", "--scale", "smoke", "--rows", "table4/deit_b/ours-50-*",
                            "--output", str(out), *QUICK)
    assert code == 1 and "1 row(s) failed: table4/deit_b/ours-50-fp16" in err
    assert "Traceback" not in err and "lowrank-vit: error: cannot write the results of table4/deit_b/ours-50-fp16" \
        in err  # the failing row's own one-line error (its process writes to the same stderr), before any work
    assert blocked.read_text() == "not a directory"  # nothing of the user's overwritten
    rows = {r["name"]: r for r in json.loads((out / "table4.json").read_text())["rows"]}
    assert rows["table4/deit_b/ours-50-int8"]["finished"] and not rows["table4/deit_b/ours-50-fp16"]["finished"]
    assert "table4/deit_b/ours-50-int8" in (out / "table4.md").read_text() and stdout

    row = _result(out, "table4/deit_b/ours-50-int8")
    assert row["config"]["quantization"]["bits"] == 8 and rows["table4/deit_b/ours-50-int8"]["paper_size_mib"] == 41.7
    model = load_compressed(out / "table4/deit_b/ours-50-int8/model")
    record = model.lowrank_vit_quantization
    assert record and {r["bits"] for r in record.values()} == {8}
    assert row["size_mib"] == pytest.approx(model_size_mib(model)) and row["params"] == sum(
        p.numel() for p in model.parameters())
    assert row["size_mib"] < 0.75 * row["params"] * 2 / 2**20  # U, V at 8 bits: well below FP16

    args = ["run", "table4/deit_b/ours-50-int8", "--scale", "smoke", "--output", str(out), *QUICK,
            "--set", "finetune.lr=0.01"]
    code, _, err = cli(capfd, *args)
    assert code == 2 and "another config" in one_line_error(err)
    assert _result(out, "table4/deit_b/ours-50-int8") == row
    code, _, err = cli(capfd, *args, "--force")
    assert code == 0, err
    forced = _result(out, "table4/deit_b/ours-50-int8")
    assert forced["config"]["finetune"]["lr"] == 0.01 and row["config"]["finetune"]["lr"] != 0.01


def _write_cifar_like(folder: Path, n_train: int = 48, n_test: int = 24) -> Path:
    """A CIFAR-10-shaped parquet directory (32x32 RGB, ``img``/``label``) small enough for a test."""
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(n)]}).to_parquet(
            str(folder / f"{split}.parquet"))
    return folder


@pytest.mark.usefixtures("offline_no_token")
def test_run_from_own_checkpoint_on_local_data(capsys, tmp_path, monkeypatch):
    """A comparison row on a model the user trained (``model.checkpoint``, safetensors) and local parquet data, with
    the overrides experiments/cifar10.py passes: it runs, records the checkpoint's digest, reruns when the weights
    change, and a missing, corrupted or mismatched checkpoint is one line with exit status 2."""
    import timm
    import torch
    from safetensors.torch import save_file

    from experiments.cifar10 import Recipe, overrides

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    data = _write_cifar_like(tmp_path / "cifar")
    recipe = Recipe(model_kwargs={"img_size": 32, "num_classes": 3, "patch_size": 8, "embed_dim": 64, "depth": 4,
                                  "num_heads": 2, "global_pool": "avg", "class_token": False})
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False, **recipe.model_kwargs)
    save_file(model.state_dict(), str(weights))
    sets = [a for s in overrides(str(data), weights.parent, recipe, finetune_steps=2) for a in ("--set", s)]
    quick = [*sets, "--set", "compression.calib_samples=16", "--set", "data.calib_samples=16", "--quiet",
             "--wandb", "disabled"]
    out = tmp_path / "results"
    name = "compare/deit_s/ours-50-noft"
    code, _, err = cli(capsys, "run", name, "--scale", "smoke", "--output", str(out), *quick)
    assert code == 0, err
    row = _result(out, name)
    assert row["config"]["model"]["checkpoint"] == str(weights.resolve())
    assert row["params_before"] == sum(p.numel() for p in model.parameters()) and row["val_images"] == 24
    assert row["params"] / row["params_before"] == pytest.approx(0.5, abs=1e-3)
    assert len(row["checkpoint_sha256"]) == 64

    # the dense accuracy is evaluated once per weights and data: another row reuses it (planted value to prove it)
    (cached,) = (out / ".dense").glob("*.json")
    assert json.loads(cached.read_text())["top1"] == row["dense"]["top1"]
    cached.write_text(json.dumps({**row["dense"], "top1": 12.5}))
    code, _, err = cli(capsys, "run", "compare/deit_s/plain-50-noft", "--scale", "smoke", "--output", str(out), *quick)
    assert code == 0, err
    assert _result(out, "compare/deit_s/plain-50-noft")["dense"]["top1"] == 12.5
    stamp = (out / name / "result.json").stat().st_mtime_ns
    code, _, err = cli(capsys, "run", name, "--scale", "smoke", "--output", str(out), *quick)
    assert code == 0 and (out / name / "result.json").stat().st_mtime_ns == stamp  # finished: skipped
    torch.manual_seed(1)  # other weights under the same path: the result is stale and the row runs again
    save_file(timm.create_model("deit_small_patch16_224", pretrained=False, **recipe.model_kwargs).state_dict(),
              str(weights))
    code, _, err = cli(capsys, "run", name, "--scale", "smoke", "--output", str(out), *quick)
    assert code == 0 and (out / name / "result.json").stat().st_mtime_ns != stamp
    assert _result(out, name)["checkpoint_sha256"] != row["checkpoint_sha256"]
    assert len(list((out / ".dense").glob("*.json"))) == 2  # other weights: evaluated afresh

    bad = tmp_path / "bad.safetensors"
    for content, message in ((None, "does not exist"), (b"not a safetensors file", "neither a safetensors file nor")):
        if content is not None:
            bad.write_bytes(content)
        code, _, err = cli(capsys, "run", name, "--scale", "smoke", "--output", str(tmp_path / "r2"), *quick,
                           "--set", f"model.checkpoint={bad}")
        assert code == 2 and message in one_line_error(err)
    code, _, err = cli(capsys, "run", name, "--scale", "smoke", "--output", str(tmp_path / "r2"), *quick,
                       "--set", "model.kwargs={\"img_size\": 32, \"num_classes\": 3, \"patch_size\": 8}")
    assert code == 2 and "does not fit" in one_line_error(err)
    code, _, err = cli(capsys, "run", name, "--scale", "smoke", "--output", str(tmp_path / "r2"), *quick,
                       "--set", "model.source=standin",
                       "--set", "model.name=deit_s")
    assert code == 2 and "needs model source 'timm'" in one_line_error(err)


def test_residual_mean_is_undefined_when_a_unit_has_none():
    """COMCAT's attention units have no per-layer eq. 5 error (NaN): the row's mean residual is None, not NaN."""
    from lowrank_vit.repro.runner import _mean

    assert _mean([1.0, 3.0]) == 2.0
    assert _mean([1.0, math.nan]) is None
    assert _mean([]) is None


# ------------------------------------------------------------------------------------------- the registry's rows
_QUICK = ["model.pretrained=false", "data.calib_samples=8", "vmeanba.calib_samples=8", "vmeanba.repeats=1",
          "vmeanba.latency_batch=4"]


@pytest.mark.parametrize("row", ["vmeanba/vmamba_t/vmeanba-k2", pytest.param(
    "vmeanba/vmamba_t/vmeanba-k4-loss-aware-40", marks=pytest.mark.slow)])
def test_a_registry_row_runs_vmeanba_saves_it_and_the_saved_model_scores_what_the_run_recorded(tmp_path, row):
    """The smoke scale's stand-in (random weights here: no pretraining in a test) through `lowrank-vit run`'s driver:
    the K blocks of least impact by the run's own scores are switched, the table shows them, and the saved model
    has exactly those blocks switched and scores the recorded top-1."""
    from lowrank_vit.io.surgery import load_compressed
    from lowrank_vit.methods.vmeanba import scan_blocks
    from lowrank_vit.repro.models import build_model
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.rows import evaluate
    from lowrank_vit.repro.runner import MODEL_DIR, run_row
    from lowrank_vit.repro.tables import render_table
    from lowrank_vit.stages.data import build_datamodule

    exp = get_experiment(row)
    extra = ["finetune.max_steps=1", "compression.calib_samples=8"] if exp.smoke.compression else []
    result = run_row(exp, "smoke", output=tmp_path, wandb="disabled", overrides=_QUICK + extra, progress=False)
    scores, chosen = result["vmeanba"]["scores"], result["vmeanba"]["chosen"]
    k = exp.smoke.vmeanba.num_blocks
    assert len(scores) == 14 and chosen == sorted(scores, key=scores.get)[:k]
    model = load_compressed(tmp_path / row / MODEL_DIR)
    assert sorted(name for name, op in scan_blocks(model).items() if op.mean_scan) == sorted(chosen)
    if exp.smoke.compression is not None:
        assert result["params"] < 0.7 * result["params_before"] and result["finetune"]["steps"] == 1
    else:
        assert result["params"] == result["params_before"] and "finetune" not in result
    cfg = exp.smoke.override(_QUICK)
    dm = build_datamodule(cfg.data, build_model(cfg.model, progress=False))
    dm.setup("fit")
    top1 = evaluate(model, dm.val_dataloader(batch_size=256), torch.device("cpu"), progress=False)["top1"]
    assert top1 == pytest.approx(result["top1"], abs=1e-9)
    table = render_table("vmeanba", [exp], "smoke", tmp_path)
    assert f"| {k} | {result['vmeanba']['scan_speedup']:.2f}x | {result['vmeanba']['measured_speedup']:.2f}x |" \
        in table


@pytest.mark.parametrize("row", ["vmeanba/vmamba_t/prune-40", pytest.param(
    "vmeanba/vmamba_t/vmeanba-k4-prune-40", marks=pytest.mark.slow)])
def test_a_registry_pruning_row_prunes_saves_the_zeros_and_records_them(tmp_path, row):
    """The runner hands the row's pruning to the flow: 40% of the stand-in's block linear weights are zero in the saved
    model, the result and the saved metadata say so, and nothing is fine-tuned."""
    from lowrank_vit.io.surgery import load_compressed
    from lowrank_vit.methods.prune import measure_sparsity
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.runner import MODEL_DIR, run_row

    exp = get_experiment(row)
    result = run_row(exp, "smoke", output=tmp_path, wandb="disabled", overrides=_QUICK, progress=False)
    assert result["pruning"]["sparsity"] == pytest.approx(0.4, abs=1e-3)
    assert "finetune" not in result and result["params"] == result["params_before"]
    saved = measure_sparsity(load_compressed(tmp_path / row / MODEL_DIR))
    assert saved.sparsity == pytest.approx(result["pruning"]["sparsity"], abs=1e-9)
    assert "vmeanba" in result if "vmeanba-" in row else "vmeanba" not in result


def test_a_vmeanba_row_on_a_model_without_scans_fails_before_the_model_is_evaluated(tmp_path):
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.runner import run_row

    with pytest.raises(ValueError, match="no selective-scan"):
        run_row(get_experiment("vmeanba/vmamba_t/vmeanba-k2"), "smoke", output=tmp_path, wandb="disabled",
                overrides=[*_QUICK, "model.name=deit_s"], progress=False)
    assert not (tmp_path / "vmeanba/vmamba_t/vmeanba-k2").exists()
