"""Tests of lowrank_vit/cli/finetune.py."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from lowrank_vit.cli import main as cli_main
from lowrank_vit.io.surgery import load_compressed, read_plan
from tests.helpers import (
    _assert_one_line_error,
    _cli_compress,
    _cli_workdir,
    _compress,
    _digest,
    _run,
    cli,
    one_line_error,
)


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize("distill", [None, "0.5"])
def test_finetune_of_a_headless_model_needs_distill_1(place, compressed_headless, tmp_path, capsys, distill):
    extra = [] if distill is None else ["--distill", distill]
    code, _, err = cli(capsys, "finetune", str(compressed_headless), "--data", str(place / "imgs"), "--workers", "0",
                       "--epochs", "1", "--output", str(tmp_path / "ft"), "--quiet", *extra)
    assert code == 2
    assert one_line_error(err) == (
        f"lowrank-vit: error: {str(compressed_headless)!r} holds a model that is not a classifier "
        f"(num_classes=0): it fine-tunes toward the dense model's outputs alone, give "
        f"--distill 1 (got {distill or 0})"
    )
    assert not (tmp_path / "ft").exists() and not any(p.name.startswith(".ft") for p in tmp_path.iterdir())


@pytest.mark.usefixtures("one_thread")
def test_a_temperature_is_refused_for_a_likelihood_without_one(place, compressed_headless, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "finetune",
        str(compressed_headless),
        "--data",
        str(place / "imgs"),
        "--epochs",
        "1",
        "--distill",
        "1",
        "--distill-temperature",
        "2",
        "--output",
        str(tmp_path / "ft"),
        "--quiet",
    )
    assert code == 2
    assert "--distill-temperature softens class logits only; the 'gaussian' likelihood" in one_line_error(err)


@pytest.mark.usefixtures("offline")
def test_the_finetune_records_a_hub_name_as_given_and_a_folder_as_its_full_path(tmp_path, monkeypatch):
    """resume.json says which data the interrupted run read: a local folder by its absolute path (the same from any
    directory), a dataset name as it was typed (not as a path below the current directory)."""
    from lowrank_vit.cli.finetune import _finetune_run
    from lowrank_vit.io.surgery import WEIGHTS_FILE
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    model = tmp_path / "model"
    model.mkdir()
    (model / WEIGHTS_FILE).write_bytes(b"weights")
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    config = FinetuneConfig(epochs=1)
    for data, recorded in (("someone/dataset", "someone/dataset"), ("imgs", str(tmp_path.resolve() / "imgs"))):
        run = _finetune_run(argparse.Namespace(data=data, augment=False), model, config)
        assert run["data"] == recorded


def _matching_stage(tmp_path: Path) -> tuple[Path, dict]:
    from lowrank_vit.cli.finetune import RESUME_FILE

    stage = tmp_path / ".out.partial"
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    run = {"input": "/somewhere/model", "data": "imgs", "augment": False, "finetune": {"lr": 0.001}}
    (stage / RESUME_FILE).write_text(json.dumps(run))
    return stage, run


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("quiet", [False, True])
def test_resuming_a_finetune_says_so_unless_quiet(quiet, tmp_path, capsys):
    """The same fine-tune command after an interruption resumes from last.ckpt and says so on stderr; --quiet
    prints nothing there."""
    from lowrank_vit.cli.finetune import _resume_or_start

    stage, run = _matching_stage(tmp_path)
    _resume_or_start(argparse.Namespace(quiet=quiet), stage, run)
    err = capsys.readouterr().err
    assert err == ("" if quiet else f"resuming from {stage / 'checkpoints' / 'last.ckpt'}\n")


@pytest.mark.usefixtures("offline")
def test_a_finetune_stopped_before_its_first_checkpoint_starts_over_in_the_same_stage(tmp_path):
    """The staging directory of a run interrupted before any checkpoint exists (with its record): the same command
    starts over there, recording the run it now is."""
    from lowrank_vit.cli.finetune import RESUME_FILE, _resume_or_start

    stage = tmp_path / ".out.partial"
    (stage / "checkpoints").mkdir(parents=True)
    (stage / RESUME_FILE).write_text(json.dumps({"input": "/old"}))
    run = {"input": "/m", "data": "/d", "augment": False, "finetune": {"lr": 1e-4}}
    _resume_or_start(argparse.Namespace(quiet=True), stage, run)
    assert json.loads((stage / RESUME_FILE).read_text()) == run


@pytest.mark.usefixtures("offline")
def test_the_checkpoint_interval_is_not_part_of_what_makes_a_finetune_the_same_run(tmp_path):
    """Like --epochs and --max-steps, --checkpoint-every may differ when an interrupted run is resumed."""
    from lowrank_vit.cli.finetune import _finetune_run
    from lowrank_vit.io.surgery import WEIGHTS_FILE
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    (tmp_path / WEIGHTS_FILE).write_bytes(b"weights")
    args = argparse.Namespace(data="someone/dataset", augment=False)
    runs = [
        _finetune_run(args, tmp_path, FinetuneConfig(epochs=1, checkpoint_every_n_steps=every)) for every in (50, 500)
    ]
    assert runs[0] == runs[1]
    assert "lr" in runs[0]["finetune"]


@pytest.mark.usefixtures("offline")
def test_a_finetune_records_the_sha256_of_its_inputs_weights(tmp_path):
    from lowrank_vit.cli.finetune import _finetune_run
    from lowrank_vit.io.surgery import WEIGHTS_FILE
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    (tmp_path / WEIGHTS_FILE).write_bytes(b"some weights")
    run = _finetune_run(argparse.Namespace(data="someone/dataset", augment=False), tmp_path, FinetuneConfig(epochs=1))
    assert run["input_sha256"] == hashlib.sha256(b"some weights").hexdigest()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_finetune_evaluate_export_after_cuda(tmp_path, capsys):
    """The rest of a practitioner's path on the GPU: ``finetune --device cuda`` of a directory compressed there (bf16
    mixed precision, distillation from the dense model rebuilt from what compress recorded) moves the trained
    parameters and no factor; ``evaluate --device cuda`` agrees with the CPU's on the result; ``export`` runs it in
    onnxruntime against PyTorch."""
    from safetensors.torch import load_file

    _cli_compress(capsys, tmp_path, _cli_workdir(tmp_path), "cuda")
    code, _, err = cli(
        capsys,
        "finetune",
        str(tmp_path / "cuda"),
        "--data",
        str(tmp_path / "imgs"),
        "--workers",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--precision",
        "bf16-mixed",
        "--distill",
        "0.5",
        "--device",
        "cuda",
        "--quiet",
        "--output",
        str(tmp_path / "ft"),
    )
    assert code == 0, err
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["finetune"]["steps"] == 3 and report["finetune"]["precision"] == "bf16-mixed"
    before, after = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cuda", "ft"))
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert "head.weight" in moved and not any(k.endswith((".U", ".V")) for k in moved), sorted(moved)
    results = {}
    for device in ("cpu", "cuda"):
        code, out, err = cli(
            capsys,
            "evaluate",
            str(tmp_path / "ft"),
            "--data",
            str(tmp_path / "imgs"),
            "--workers",
            "0",
            "--json",
            "--latency-batches",
            "--device",
            device,
            "--quiet",
        )
        assert code == 0, err
        results[device] = json.loads(out)
    assert results["cuda"]["device"].startswith("cuda") and results["cpu"]["device"] == "cpu"
    assert results["cuda"]["images"] == results["cpu"]["images"] == 6
    assert abs(results["cuda"]["top1"] - results["cpu"]["top1"]) <= 100 / 6 + 1e-9  # one image of six
    code, _, err = cli(capsys, "export", str(tmp_path / "ft"), "--output", str(tmp_path / "m.onnx"), "--quiet")
    assert code == 0, err
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_finetune_writes_a_new_directory_and_leaves_its_input(compressed, tmp_path, capsys):
    weights = compressed / "model.safetensors"
    before = _digest(weights)
    out = tmp_path / "ft"
    code, stdout, err = _run(
        capsys,
        "finetune",
        compressed,
        "--data",
        compressed.parent / "imgs",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--output",
        out,
        "--quiet",
    )
    assert code == 0, err
    assert _digest(weights) == before
    assert {"model.safetensors", "lowrank_vit.json", "report.json", "README.md", "ranks.png"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "checkpoints").exists() and not (tmp_path / ".ft.partial").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["steps"] >= 1 and "final" in report["accuracy"] and "after" in report["accuracy"]
    assert report["finetune"]["precision"] == "32-true"
    card = (out / "README.md").read_text()
    assert "Fine-tuned (partial: norms, biases, head, patch embedding)" in card and "distilled" not in card
    trained, original = load_compressed(out).state_dict(), load_compressed(compressed).state_dict()
    changed = [k for k in original if not torch.equal(original[k], trained[k])]
    assert changed and all(not k.endswith((".U", ".V")) for k in changed), changed  # factors stay frozen
    assert read_plan(out)["metadata"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    code, _, err = _run(
        capsys, "finetune", compressed, "--data", compressed.parent / "imgs", "--epochs", "1", "--output", compressed
    )
    _assert_one_line_error(code, err, "input")
    assert _digest(weights) == before


def test_finetune_float16_needs_a_gpu(tmp_path, capsys, monkeypatch):
    """--precision 16-mixed on a CPU: one line, exit 2, before any model is read or any directory is made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "model").mkdir()
    code, _, err = _run(
        capsys,
        "finetune",
        tmp_path / "model",
        "--data",
        tmp_path,
        "--epochs",
        "1",
        "--precision",
        "16-mixed",
        "--output",
        tmp_path / "out",
    )
    _assert_one_line_error(code, err, "16-mixed needs a GPU", "bf16-mixed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(SystemExit):
        cli_main.main(
            [
                "finetune",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path),
                "--epochs",
                "1",
                "--precision",
                "bf16-true",
                "--output",
                str(tmp_path / "out"),
            ]
        )


def test_finetune_distills_from_the_recorded_dense_model(compressed, workdir, tmp_path, capsys):
    """--distill rebuilds the dense model from what compress recorded (here: the checkpoint, checked by its digest),
    or from --teacher-checkpoint when the recorded file is gone; --train-factors trains U and V too."""
    out = tmp_path / "ft-distilled"
    args = ["--data", workdir / "imgs", "--workers", "0", "--epochs", "1", "--max-steps", "2", "--quiet"]
    code, _, err = _run(
        capsys,
        "finetune",
        compressed,
        *args,
        "--distill",
        "0.5",
        "--distill-temperature",
        "2",
        "--train-factors",
        "--output",
        out,
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (report["finetune"]["distill"], report["finetune"]["distill_temperature"]) == (0.5, 2.0)
    assert report["finetune"]["train_factors"] is True
    card = (out / "README.md").read_text()  # the card says how it was fine-tuned
    assert "Fine-tuned (all weights: the low-rank factors" in card and "distilled from the model before" in card
    trained, original = load_compressed(out).state_dict(), load_compressed(compressed).state_dict()
    assert any(k.endswith(".U") and not torch.equal(original[k], trained[k]) for k in original)  # factors trained
    moved = tmp_path / "moved"  # the same directory, compressed from a checkpoint that is no longer there
    moved.mkdir()
    for f in compressed.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    plan = json.loads((moved / "lowrank_vit.json").read_text())
    plan["metadata"]["source"]["checkpoint"] = str(tmp_path / "gone.safetensors")
    (moved / "lowrank_vit.json").write_text(json.dumps(plan))
    code, _, err = _run(capsys, "finetune", moved, *args, "--distill", "0.5", "--output", tmp_path / "x")
    _assert_one_line_error(code, err, "gone.safetensors", "is gone", "--teacher-checkpoint")
    other = tmp_path / "other.safetensors"  # a file at the recorded path, but not the weights compress read
    other.write_bytes((compressed / "model.safetensors").read_bytes())
    plan["metadata"]["source"]["checkpoint"] = str(other)
    (moved / "lowrank_vit.json").write_text(json.dumps(plan))
    code, _, err = _run(capsys, "finetune", moved, *args, "--distill", "0.5", "--output", tmp_path / "x")
    _assert_one_line_error(code, err, "other.safetensors", "changed", "--teacher-checkpoint")
    assert not (tmp_path / "x").exists()
    code, _, err = _run(
        capsys,
        "finetune",
        moved,
        *args,
        "--distill",
        "0.5",
        "--output",
        tmp_path / "y",
        "--teacher-checkpoint",
        workdir / "weights.safetensors",
    )
    assert code == 0, err


def test_finetune_distill_needs_a_recorded_dense_model_and_a_weight_in_range(compressed_plain, tmp_path, capsys):
    args = ["--data", tmp_path, "--epochs", "1", "--output", tmp_path / "out"]
    code, _, err = _run(capsys, "finetune", compressed_plain, *args, "--distill", "0.5")
    _assert_one_line_error(code, err, "does not record", "without --distill")
    for flag, value, needle in (
        ("--distill", "1.5", "distill must lie in [0, 1]"),
        ("--distill-temperature", "0", "distill_temperature must be a positive number"),
    ):
        code, _, err = _run(capsys, "finetune", compressed_plain, *args, flag, value)
        _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_an_interrupted_finetune_resumes_from_its_checkpoints(compressed, tmp_path, capsys, monkeypatch):
    from lowrank_vit.cli import finetune as finetunecli

    out = tmp_path / "ft"
    argv = [
        "finetune",
        compressed,
        "--data",
        compressed.parent / "imgs",
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--output",
        out,
    ]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        # after training, before the directory is written
        patch.setattr(finetunecli, "evaluate_on_user_data", interrupted)
        code, _, _ = _run(capsys, *argv, "--epochs", "1", "--quiet", "--checkpoint-every", "2")
    assert code == 130 and not out.exists()
    assert (tmp_path / ".ft.partial" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / ".ft.partial" / "checkpoints" / "step00000002.ckpt").is_file()  # mid-epoch, as asked
    from lowrank_vit.stages.finetune import PartialFinetune

    steps_run = []
    original_step = PartialFinetune.training_step

    def counting_step(self, batch, batch_idx):
        steps_run.append(batch_idx)
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(PartialFinetune, "training_step", counting_step)
    code, _, err = _run(capsys, *argv, "--epochs", "2")
    assert code == 0, err
    assert "resuming from" in err
    steps_per_epoch = 3  # 24 training images in batches of 8
    assert len(steps_run) == steps_per_epoch, "the first epoch ran again instead of resuming"
    assert json.loads((out / "report.json").read_text())["finetune"]["steps"] == 2 * steps_per_epoch
    assert not (tmp_path / ".ft.partial").exists()


def test_checkpoints_of_another_model_are_not_resumed(compressed, workdir, tmp_path, capsys, monkeypatch):
    from lowrank_vit.cli import finetune as finetunecli

    other = tmp_path / "other"
    assert _compress(capsys, workdir, other, "--reduction", "0.5", "--no-eval", "--recipe", "vanilla")[0] == 0
    out = tmp_path / "ft"
    common = ["--data", workdir / "imgs", "--workers", "0", "--epochs", "1", "--output", out, "--quiet"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(finetunecli, "evaluate_on_user_data", interrupted)
        assert _run(capsys, "finetune", compressed, *common)[0] == 130
    code, _, err = _run(capsys, "finetune", other, *common)
    _assert_one_line_error(code, err, "remove", ".ft.partial")
    assert not out.exists()


@pytest.mark.parametrize("report", [None, "{not json", "[1, 2]"])
def test_finetune_of_a_directory_without_a_readable_report(compressed, tmp_path, capsys, report):
    """A directory written by ``save_compressed`` (the API) has weights and a plan and nothing else, and a report
    edited by hand may not parse: the fine-tune starts its report from scratch instead of failing."""
    import shutil

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("model.safetensors", "lowrank_vit.json"):
        shutil.copy(compressed / name, plain / name)
    if report is not None:
        (plain / "report.json").write_text(report)
    before = sorted((p.name, p.read_bytes()) for p in plain.iterdir())
    code, _, err = _run(
        capsys,
        "finetune",
        plain,
        "--data",
        compressed.parent / "imgs",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--output",
        tmp_path / "ft",
        "--quiet",
    )
    assert code == 0, err
    written = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert set(written["accuracy"]) == {"final"} and written["params"]["after"] > 0 and written["layers"]
    assert sorted((p.name, p.read_bytes()) for p in plain.iterdir()) == before


def test_a_fine_tune_resumes_only_the_run_it_was(tmp_path, capsys):
    import argparse

    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.finetune import RESUME_FILE, _resume_or_start

    args = argparse.Namespace(quiet=False)
    stage = tmp_path / ".out.partial"
    run = {"input": "/m", "input_sha256": "ab", "data": "/d", "augment": False, "finetune": {"lr": 1e-4}}
    _resume_or_start(args, stage, run)  # a first run records itself
    assert json.loads((stage / RESUME_FILE).read_text()) == run
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "last.ckpt").write_bytes(b"")
    _resume_or_start(args, stage, run)  # the same command again: resumed
    assert "resuming from" in capsys.readouterr().err
    for changed, needle in (
        ({"input_sha256": "cd"}, "another input_sha256"),
        ({"finetune": {"lr": 0.5}}, "another finetune"),
    ):
        with pytest.raises(UserError, match=f"{needle}: rerun that command to resume it, or remove"):
            _resume_or_start(args, stage, {**run, **changed})
    (stage / RESUME_FILE).unlink()  # checkpoints that do not say what they were are not resumed either
    with pytest.raises(UserError, match="does not say what it was"):
        _resume_or_start(args, stage, run)


def test_a_hand_edited_report_does_not_break_the_fine_tune_report(tmp_path):
    from lowrank_vit.cli.finetune import _read_report

    path = tmp_path / "report.json"
    path.write_text(json.dumps({"accuracy": "x", "params": 5, "name": "m", "layers": []}))
    assert _read_report(path) == {"name": "m", "layers": []}
    path.write_text(json.dumps({"accuracy": {"before": {"top1": 50.0}}, "params": {"before": 9}}))
    assert _read_report(path) == {"accuracy": {"before": {"top1": 50.0}}, "params": {"before": 9}}


def test_a_stopped_fine_tune_says_how_to_resume(compressed, workdir, tmp_path, capsys, monkeypatch):
    import lowrank_vit.stages.finetune as stage

    written: list[str] = []

    def stopped(*args, checkpoint_dir, **kwargs):  # what Lightning does on Ctrl-C: a graceful shutdown, then exit(1)
        for name in written:  # the checkpoints Lightning had written before the interruption
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_dir) / name).write_bytes(b"")
        raise SystemExit(1)

    monkeypatch.setattr(stage, "finetune", stopped)
    argv = [
        "finetune",
        compressed,
        "--data",
        workdir / "imgs",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--quiet",
        "--output",
        tmp_path / "ft",
        "--checkpoint-every",
        "7",
    ]
    code, _, err = _run(capsys, *argv)  # stopped before the first checkpoint: no promise of a resume
    assert code == 130 and "interrupted" in err and "resumes" not in err
    assert "no checkpoint had been written yet (one every 7 steps and at each epoch's end)" in err
    assert not (tmp_path / "ft").exists()
    shutil.rmtree(tmp_path / ".ft.partial")
    written[:] = ["step00000007.ckpt", "step00000014.ckpt", "epoch000.ckpt", "last.ckpt"]
    code, _, err = _run(capsys, *argv)
    assert code == 130 and "the same command resumes it from its last checkpoint (step 14)" in err


def test_max_steps_stops_the_fine_tune_after_that_many_steps(model_dir, images, tmp_path, capsys):
    """``--max-steps 1``: one optimizer step, although an epoch of the 12 training images at batch size 4 is 3."""
    out = tmp_path / "ft"
    code, stdout, err = cli(
        capsys,
        "finetune",
        str(model_dir),
        "--data",
        str(images),
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--output",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["finetune"]["steps"] == 1
    assert "fine-tuned 1 steps" in stdout


def test_the_ctrl_c_note_names_the_newest_checkpoint_from_the_files_names(tmp_path):
    """What an interrupted fine-tune tells the user, read from the checkpoints' names: the newest step, else the
    newest epoch's end, else that nothing was written (no last.ckpt: nothing to resume from)."""
    from lowrank_vit.cli.finetune import _resume_note

    assert "no checkpoint had been written yet (one every 5 steps" in _resume_note(tmp_path, 5)
    (tmp_path / "step00000010.ckpt").write_bytes(b"")
    assert "starts over" in _resume_note(tmp_path, 5)  # a step file but no last.ckpt: not resumable
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "step00000030.ckpt").write_bytes(b"")
    (tmp_path / "epoch001.ckpt").write_bytes(b"")
    assert f"resumes it from its last checkpoint (step 30) in {tmp_path}" in _resume_note(tmp_path, 5)
    for f in tmp_path.glob("step*.ckpt"):
        f.unlink()
    assert "(the end of epoch 2)" in _resume_note(tmp_path, 5)


@pytest.mark.usefixtures("offline")
def test_an_interrupted_finetune_of_another_input_directory_is_not_resumed_even_with_the_same_weights(
    tmp_path, monkeypatch
):
    """An input directory holds more than its weights (the plan, the preprocessing the data is read with), so the
    interrupted fine-tune of `model` is not resumed by the same command on `copy` (same weights file); the same
    directory named by a relative path from elsewhere is the same run and resumes."""
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.finetune import _finetune_run, _resume_or_start
    from lowrank_vit.io.surgery import WEIGHTS_FILE
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    model, copy = tmp_path / "model", tmp_path / "copy"
    for directory in (model, copy):
        directory.mkdir()
        (directory / WEIGHTS_FILE).write_bytes(b"the same weights")
    args = argparse.Namespace(data="someone/dataset", augment=False, quiet=True)
    config = FinetuneConfig(epochs=1)
    stage = tmp_path / ".out.partial"
    _resume_or_start(args, stage, _finetune_run(args, model, config))  # the first run records itself
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    with pytest.raises(UserError, match="another input: rerun that command to resume it, or remove"):
        _resume_or_start(args, stage, _finetune_run(args, copy, config))
    monkeypatch.chdir(copy)
    _resume_or_start(args, stage, _finetune_run(args, Path("../model"), config))  # resumed, not refused
