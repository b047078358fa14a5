"""The ``lowrank-vit`` command: list/show/plan/run/reproduce, one-line errors with exit status 2, and the smoke
pipeline end to end (random-weight stand-ins and tiny budgets so it takes seconds; `make demo` runs the real one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_vit.cli.main import main

from conftest import cli, make_tiny_vit, one_line_error

REPO = Path(__file__).resolve().parents[1]

# Random-weight stand-in (no pretraining), few calibration images, a few fine-tuning steps.
QUICK = ["--set", "model.pretrained=false", "--set", "compression.calib_samples=32", "--set",
         "data.calib_samples=32", "--set", "finetune.max_steps=3", "--quiet", "--wandb", "disabled"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token, no cached weights


def test_list_and_show(capsys):
    code, out, _ = cli(capsys, "list", "table2/deit_s/*")
    assert code == 0 and out.split() == [
        "table2/deit_s/baseline", "table2/deit_s/ours-40", "table2/deit_s/loss-aware-40", "table2/deit_s/ours-50",
        "table2/deit_s/loss-aware-50", "table2/deit_s/ours-60", "table2/deit_s/loss-aware-60",
        "table2/deit_s/vanilla-svd-ft-40"]
    code, out, _ = cli(capsys, "list", "table4", "--json")
    entries = json.loads(out)
    assert code == 0 and len(entries) == 4
    assert {e["paper"]["size_mib"] for e in entries} == {165.2, 82.6, 41.7, 42.2}
    code, out, _ = cli(capsys, "show", "table3/vit_l/ours", "--scale", "full")
    shown = json.loads(out)
    assert code == 0 and shown["config"]["compression"]["target_params"] == 86_000_000
    assert shown["config"]["model"]["name"].startswith("vit_large_patch16_224")
    code, out, _ = cli(capsys, "show", "table3/vit_l/ours")
    assert set(json.loads(out)) >= {"full", "smoke", "paper"}


@pytest.mark.parametrize("argv, message", [
    (["show", "table2/deit_b/ours-5"], "did you mean table2/deit_b/ours-50"),
    (["list", "tabel2/*"], "no experiment matches"),
    (["run", "table2/deit_s/ours-50", "--devices", "0"], "positive integer"),
    (["run", "table2/deit_s/ours-50", "--scale", "huge"], "invalid choice"),
    (["run", "table2/deit_s/ours-50", "--set", "finetune.epochs=0"], "epochs must be a positive integer"),
    (["run", "table2/deit_s/ours-50", "--set", "finetune.epoch=3"], "no field 'epoch'"),
    (["run", "table2/deit_s/ours-50", "--set", "finetune.precision=bf16"], "precision must be one of"),
    (["run", "table2/deit_s/ours-50", "--scale", "smoke", "--accelerator", "cpu", "--set",
      "finetune.precision=16-mixed", "--output", "/nonexistent/never-written"], "16-mixed needs a GPU"),
    (["reproduce", "table9"], "unknown table 'table9'"),
    (["reproduce", "table2", "--rows", "table3/*"], "matches no row"),
    (["plan", "table2/deit_s/ours-51"], "unknown experiment"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert message in one_line_error(capsys.readouterr().err)


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


@pytest.mark.slow
def test_console_script_error_in_a_new_process():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lowrank_vit.cli.main", "show", "table2/nope/ours-50"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown experiment" in one_line_error(proc.stderr)


def test_plan_needs_no_flag_for_its_only_mode_and_the_version_is_the_installed_one(capsys):
    """`plan NAME` as the README writes it (synthetic is its only mode), and `--version` from the package metadata."""
    from importlib.metadata import version

    code, out, _ = cli(capsys, "plan", "table2/swin_b/ours-60", "--scale", "smoke", "--json")
    assert code == 0 and json.loads(out)["params_after"] < json.loads(out)["params_before"]
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"lowrank-vit {version('lowrank_vit')}"


def test_plan_smoke_rows(capsys):
    code, out, _ = cli(capsys, "plan", "table2/swin_b/ours-60", "--synthetic", "--scale", "smoke", "--json")
    plan = json.loads(out)
    assert code == 0 and set(plan) >= {"name", "params_before", "params_after", "paper_params"}
    assert plan["params_after"] / plan["params_before"] == pytest.approx(0.4, abs=1e-3)
    code, out, _ = cli(capsys, "plan", "table4/deit_b/ours-50-int8", "--synthetic", "--scale", "smoke", "--json")
    plan = json.loads(out)
    assert plan["paper_size_mib"] == 41.7 and 0 < plan["size_mib"] < plan["params_before"] * 2 / 2**20 / 3


def test_plan_full_scale_table3_deit_s(capsys):
    """The one full-size plan in the suite (DeiT-S -> 5.0M); `make check-plans` runs every row."""
    code, out, _ = cli(capsys, "plan", "table3/deit_s/ours", "--synthetic", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["params_before"] == 22_050_664 and plan["paper_params"] == 5_000_000
    assert abs(plan["params_after"] - 5_000_000) <= 5_000  # within 0.1%


def _result(out: Path, name: str) -> dict:
    return json.loads((out / name / "result.json").read_text())


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


@pytest.mark.slow
def test_run_ddp_two_cpu_processes(tmp_path):
    """`run --devices 2 --accelerator cpu`: Lightning relaunches the command per rank; rank zero alone writes and
    logs: one offline wandb run, in the row's directory, and none anywhere else (the processes run in tmp_path)."""
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "LOWRANK_VIT_CACHE": str(tmp_path / "c"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    quick = [arg for arg in QUICK if arg not in ("--wandb", "disabled")] + ["--wandb", "offline"]
    proc = subprocess.run([sys.executable, "-m", "lowrank_vit.cli.main", "run", "table2/deit_s/ours-50", "--scale",
                           "smoke", "--output", str(out), "--devices", "2", "--accelerator", "cpu", *quick],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = _result(out, "table2/deit_s/ours-50")
    assert row["finetune"]["world_size"] == 2 and row["finetune"]["steps"] == 3
    assert row["config"]["hardware"]["devices"] == 2
    assert (out / "table2/deit_s/ours-50/model/model.safetensors").is_file()
    runs = sorted(tmp_path.rglob("offline-run-*"))
    assert len(runs) == 1 and runs[0].parent == out / "table2/deit_s/ours-50/wandb", runs
    assert not list(out.rglob(".compressed-for-ranks"))  # rank zero's hand-over to the other rank is cleaned up


def test_rank_zero_hands_its_compressed_model_to_the_other_ranks(tmp_path, monkeypatch, calib_batches):
    """Under DDP the fine-tune's processes load rank zero's compressed model instead of compressing again; only a
    non-zero rank of the same row takes it, and nothing is left behind, even when the fine-tune fails."""
    from lowrank_vit import compress
    from lowrank_vit.io.surgery import load_compressed
    from lowrank_vit.repro.ddp import SHARED_ENV, share_compressed, shared_compressed

    model = make_tiny_vit()
    compress(model, calib_batches, reduction=0.5, calib_samples=64, progress=False)
    monkeypatch.delenv(SHARED_ENV, raising=False)
    monkeypatch.setenv("RANK", "1")
    with share_compressed(model, "row/a", tmp_path, enabled=True):
        path = shared_compressed("row/a")
        assert path is not None and path.parent == tmp_path.resolve()
        assert shared_compressed("row/b") is None  # another row's processes compress themselves
        monkeypatch.setenv("RANK", "0")
        assert shared_compressed("row/a") is None  # rank zero has its own
        monkeypatch.setenv("RANK", "1")
        loaded = load_compressed(path)
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert SHARED_ENV not in os.environ and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), share_compressed(model, "row/a", tmp_path, enabled=True):
        raise RuntimeError("the fine-tune failed")
    assert SHARED_ENV not in os.environ and list(tmp_path.iterdir()) == []
    with share_compressed(model, "row/a", tmp_path, enabled=False):  # one process: nothing to hand over
        assert shared_compressed("row/a") is None and list(tmp_path.iterdir()) == []


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


def test_results_of_an_older_version_still_count_as_finished(tmp_path):
    """A field added to the config since a row finished (filled with its default) does not orphan the result."""
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.runner import finished, standin_weights_fingerprint

    exp = get_experiment("compare/deit_s/ours-50")
    cfg = exp.config("smoke")
    old = cfg.to_dict()
    del old["model"]["checkpoint"]
    path = tmp_path / exp.name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": old, "standin_fingerprint": standin_weights_fingerprint("deit_s")}))
    assert finished(exp, cfg, tmp_path) is not None


def test_json_without_an_estimate_is_refused_on_reproduce_and_an_interrupt_ends_quietly(capsys, monkeypatch):
    code, _, err = cli(capsys, "reproduce", "table2", "--json")
    assert code == 2 and "--json prints an estimate: add --dry-run --estimate" in one_line_error(err)
    from lowrank_vit.cli import main as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli_module.COMMANDS, "list", interrupted)
    assert main(["list"]) == 130
    assert capsys.readouterr().err.strip() == "lowrank-vit: interrupted"


@pytest.mark.parametrize("accelerator", ["cpu", "gpu", "auto"])
def test_every_accelerator_choice_parses(accelerator):
    from lowrank_vit.cli.main import build_parser

    args = build_parser().parse_args(["run", "table2/deit_s/baseline", "--accelerator", accelerator])
    assert args.accelerator == accelerator
