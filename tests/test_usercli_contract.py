"""``lowrank-vit compress / evaluate / finetune / export`` as a user meets their flags: what each flag reaches (the
model timm builds, the data module, the ONNX file), the line that says which weights were read, and the one-line
refusals (exit status 2) of what the commands cannot do. Tiny timm ViTs (pretrained=False) and a generated image
folder; each check runs in seconds, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, one_line_error

ARCH = "vit_tiny_patch16_224"
KWARGS = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
CLASSES, PER_CLASS, SIZE = 3, 5, 32


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """An image folder: one subfolder per class, RGB 32x32 PNGs whose brightness depends on the class."""
    from PIL import Image

    root = tmp_path_factory.mktemp("contract_imgs")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            Image.fromarray((rng.random((SIZE, SIZE, 3)) * 80 + c * 70).astype(np.uint8)).save(
                root / f"class{c}" / f"{i}.png")
    return root


def _tiny(**overrides):
    import timm

    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, img_size=SIZE, **{**KWARGS, **overrides}).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The user's own weights for the tiny architecture, as a safetensors state dict."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("contract_ckpt") / "weights.safetensors"
    save_file(_tiny().state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model directory (3x32x32 input, 3 classes) of a compressed model whose weights are 8-bit quantized, written by
    the API; the tests only read it."""
    from lowrank_vit import compress, quantize_, save_compressed

    model = _tiny()
    calib = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    compress(model, [calib], reduction=0.4, calib_samples=16, progress=False)
    quantize_(model, bits=8)
    return save_compressed(model, tmp_path_factory.mktemp("contract_dir") / "model",
                           metadata={"preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}})


def _argparse_refusal(capsys, *argv) -> str:
    """The command line is refused by the parser itself (before any file is read): exit status 2 and one line."""
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, *map(str, argv))
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------ what reaches the model


def test_a_one_channel_input_size_builds_a_one_channel_model_fed_one_channel_images(images, capsys):
    """``--input-size 1,H,W`` on a timm name: the model is built for grayscale input and the data module feeds it
    grayscale images. Were the channel count lost on the way to timm, the user's grayscale model could not be built
    (or would be built for RGB)."""
    code, out, err = cli(capsys, "evaluate", ARCH, "--no-pretrained", "--model-kwargs", json.dumps(KWARGS),
                         "--input-size", "1,32,32", "--data", str(images), "--workers", "0", "--json", "--quiet",
                         "--latency-batches")
    assert code == 0, err
    result = json.loads(out)
    assert result["preprocessing"]["input_size"] == [1, SIZE, SIZE]
    # the parameter count of a ViT whose patch embedding reads 1 channel, counted on a model built here directly
    assert result["params"] == sum(p.numel() for p in _tiny(in_chans=1).parameters())
    assert result["params"] != sum(p.numel() for p in _tiny(in_chans=3).parameters())
    assert result["images"] == CLASSES * PER_CLASS // 5  # the 20% hold-out was evaluated: the images fit the model


def test_the_description_says_the_weights_are_the_users_checkpoint(images, checkpoint, capsys):
    """A model built from ``--checkpoint FILE`` is described as "your checkpoint" in the output, never as random
    weights (which would tell the user their checkpoint was ignored)."""
    code, out, err = cli(capsys, "evaluate", ARCH, "--preprocessing", "timm", "--checkpoint", str(checkpoint),
                         "--model-kwargs",
                         json.dumps(KWARGS), "--input-size", str(SIZE), "--data", str(images), "--workers", "0",
                         "--json", "--quiet", "--latency-batches")
    assert code == 0, err
    assert json.loads(out)["model"] == f"timm {ARCH}, your checkpoint"


def test_a_hub_reference_to_a_model_directory_loads_that_directory(model_dir, images, capsys, monkeypatch):
    """``hf-hub:owner/name`` holding a model directory: the downloaded snapshot is read like a local model directory
    (its weights, its saved preprocessing). The hub itself is replaced by a local folder, as snapshot_download
    returns one."""
    from lowrank_vit.io import hub

    monkeypatch.setattr(hub, "download", lambda reference, cache_dir=None, token=None: model_dir)
    code, out, err = cli(capsys, "evaluate", "hf-hub:someone/tiny", "--data", str(images), "--workers", "0", "--json",
                         "--quiet", "--latency-batches")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == f"directory {model_dir}"
    assert result["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and result["preprocessing"]["crop_pct"] == 1.0


def test_a_dataset_name_is_looked_up_on_the_hugging_face_hub(tmp_path, capsys, monkeypatch):
    """``--data owner/name`` that is no local path is a Hugging Face dataset name: offline and not cached, the
    command says it could not load that dataset from the hub, on one line (not a traceback)."""
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    code, _, err = cli(capsys, "evaluate", ARCH, "--no-pretrained", "--model-kwargs", json.dumps(KWARGS),
                       "--input-size", str(SIZE), "--data", "someone/no-such-dataset", "--workers", "0", "--quiet",
                       "--latency-batches")
    assert code == 2
    line = one_line_error(err)
    assert "'someone/no-such-dataset'" in line and "Hugging Face hub" in line


# ------------------------------------------------------------------------------------------------ export


def test_export_writes_float_weights_unless_qdq_is_asked(model_dir, tmp_path, capsys):
    """The default of ``--quantized`` is ``dequantized``: a quantized model exports with its weights as float
    values (no DequantizeLinear node, no uint8 tensor), the form every ONNX runtime reads."""
    onnx = pytest.importorskip("onnx")
    target = tmp_path / "model.onnx"
    code, _, err = cli(capsys, "export", str(model_dir), "--output", str(target), "--no-check", "--quiet")
    assert code == 0, err
    graph = onnx.load(str(target)).graph
    assert "DequantizeLinear" not in {node.op_type for node in graph.node}
    assert all(t.data_type != onnx.TensorProto.UINT8 for t in graph.initializer)


def test_export_refuses_a_format_it_does_not_write(model_dir, tmp_path, capsys):
    """``--format`` other than onnx is refused by the parser, naming the flag; no file is written (rather than an
    ONNX file under the name the user gave for another format)."""
    target = tmp_path / "model.tflite"
    line = _argparse_refusal(capsys, "export", model_dir, "--format", "tflite", "--output", target, "--no-check")
    assert "--format" in line and "tflite" in line
    assert not target.exists()


# ---------------------------------------------------------------------------------------------- finetune


def test_max_steps_must_be_a_positive_integer(tmp_path, capsys):
    """``--max-steps 0`` (or text) is refused by the parser, naming the flag, before anything is read."""
    for bad in ("0", "two"):
        line = _argparse_refusal(capsys, "finetune", tmp_path / "nowhere", "--data", tmp_path, "--epochs", "1",
                                 "--max-steps", bad, "--output", tmp_path / "o")
        assert "--max-steps" in line and repr(bad) in line


def test_max_steps_stops_the_fine_tune_after_that_many_steps(model_dir, images, tmp_path, capsys):
    """``--max-steps 1``: one optimizer step, although an epoch of the 12 training images at batch size 4 is 3."""
    out = tmp_path / "ft"
    code, stdout, err = cli(capsys, "finetune", str(model_dir), "--data", str(images), "--workers", "0",
                            "--batch-size", "4", "--epochs", "1", "--max-steps", "1", "--output", str(out), "--quiet")
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["finetune"]["steps"] == 1
    assert "fine-tuned 1 steps" in stdout


# ------------------------------------------------------------------------------------------- bad model input


def test_a_misspelled_name_with_a_pretrained_tag_suggests_the_architecture(images, tmp_path, capsys):
    """A misspelled architecture with its pretrained tag (``vit_base_patch16_22.augreg_in21k``): the suggestion is
    the architecture the user meant (the tag is no part of what is compared with timm's names)."""
    code, _, err = cli(capsys, "compress", "vit_base_patch16_22.augreg_in21k", "--data", str(images), "--reduction",
                       "0.5", "--output", str(tmp_path / "o"))
    assert code == 2
    line = one_line_error(err)
    assert "did you mean vit_base_patch16_224" in line
    assert not (tmp_path / "o").exists()


def test_a_name_with_a_stray_space_is_refused_suggesting_the_name_without_it(images, tmp_path, capsys):
    """``"vit_tiny_patch16_224 "`` (a stray space, as from a quoted shell variable) is no timm name: refused on one
    line that suggests the name the user meant, before any model is built."""
    code, _, err = cli(capsys, "compress", f"{ARCH} ", "--no-pretrained", "--data", str(images), "--reduction", "0.5",
                       "--output", str(tmp_path / "o"))
    assert code == 2
    line = one_line_error(err)
    assert f"timm has no model '{ARCH} '" in line and f"did you mean {ARCH}" in line
    assert not (tmp_path / "o").exists()

def test_an_input_size_a_model_directory_does_not_take_is_refused_naming_both(model_dir, images, capsys):
    """``--input-size`` with a model directory built for another size: one line giving the size the model takes
    and the size asked for, not a traceback."""
    code, _, err = cli(capsys, "evaluate", str(model_dir), "--input-size", "48", "--data", str(images), "--workers",
                       "0", "--quiet", "--latency-batches")
    assert code == 2
    line = one_line_error(err)
    assert "the model takes 3x32x32 images, --input-size asks for 3x48x48" in line
    assert "a model directory keeps its size" in line


def test_an_input_size_that_contradicts_model_kwargs_names_the_kwargs(images, capsys):
    """A timm name whose --model-kwargs fix another size: the advice is to make them agree, not the directory's."""
    code, _, err = cli(capsys, "evaluate", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
                       '{"img_size": 64}', "--input-size", "32", "--data", str(images), "--workers", "0", "--quiet")
    assert code == 2
    line = one_line_error(err)
    assert "the model takes 3x64x64 images, --input-size asks for 3x32x32" in line and "--model-kwargs" in line
    assert "directory" not in line


def test_an_output_holding_a_damaged_model_is_refused_and_described_as_unreadable(tmp_path):
    """A model directory whose plan is not JSON (an interrupted copy) is still refused without --force, and the
    message says it cannot be read rather than failing on it."""
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.outputs import check_output_dir
    from lowrank_vit.io.surgery import PLAN_FILE

    out = tmp_path / "model"
    out.mkdir()
    (out / PLAN_FILE).write_text("{ not json")
    with pytest.raises(UserError, match=r"already holds a model \(unreadable\): give --force"):
        check_output_dir(out, force=False)


def test_a_checkpoint_without_preprocessing_is_refused_until_the_user_says_which(checkpoint, images, capsys):
    """timm's mean and std are those of timm's weights, not of the user's: with --checkpoint and no mean and std from
    the flags or the file, evaluate stops with one line naming the flags and --preprocessing timm; each way out
    works, and what it used is what the user said."""
    base = ["evaluate", ARCH, "--checkpoint", str(checkpoint), "--model-kwargs", json.dumps(KWARGS), "--input-size",
            str(SIZE), "--data", str(images), "--workers", "0", "--json", "--quiet", "--latency-batches"]
    code, _, err = cli(capsys, *base)
    assert code == 2
    line = one_line_error(err)
    assert "carries no mean or std" in line and "--mean" in line and "--preprocessing timm" in line
    code, _, err = cli(capsys, *base, "--mean", "0.5")  # the std is still unknown
    assert code == 2 and "carries no std" in one_line_error(err)
    code, out, err = cli(capsys, *base, "--mean", "0.25", "0.5", "0.75", "--std", "0.2", "0.3", "0.4")
    assert code == 0, err
    pre = json.loads(out)["preprocessing"]
    assert (pre["mean"], pre["std"]) == ([0.25, 0.5, 0.75], [0.2, 0.3, 0.4])
    code, out, err = cli(capsys, *base, "--preprocessing", "timm")
    assert code == 0, err
    import timm

    cfg = timm.create_model(ARCH, pretrained=False).pretrained_cfg
    pre = json.loads(out)["preprocessing"]
    assert (pre["mean"], pre["std"]) == (list(cfg["mean"]), list(cfg["std"]))


@pytest.mark.parametrize("flag, values, scaled", [("--mean", ["123.675", "116.28", "103.53"], "0.485 0.456 0.406"),
                                                  ("--std", ["58.395", "57.12", "57.375"], "0.229 0.224 0.225")])
def test_mean_or_std_on_the_0_255_scale_is_refused_with_the_values_divided(checkpoint, images, capsys, flag, values,
                                                                          scaled):
    other = ["--std", "0.2"] if flag == "--mean" else ["--mean", "0.5"]
    code, _, err = cli(capsys, "evaluate", ARCH, "--checkpoint", str(checkpoint), "--model-kwargs",
                       json.dumps(KWARGS), "--input-size", str(SIZE), "--data", str(images), "--workers", "0",
                       "--quiet", flag, *values, *other)
    assert code == 2
    line = one_line_error(err)
    assert "looks like the 0-255 scale" in line and f"({scaled})" in line


def test_evaluate_limit_takes_the_first_n_validation_images(checkpoint, images, capsys):
    """`evaluate --limit N`: a quick look on the first N images of the validation split, always the same ones."""
    base = ["evaluate", ARCH, "--checkpoint", str(checkpoint), "--model-kwargs", json.dumps(KWARGS), "--input-size",
            str(SIZE), "--preprocessing", "timm", "--data", str(images), "--workers", "0", "--json", "--quiet",
            "--latency-batches"]
    code, out, err = cli(capsys, *base, "--limit", "2")
    assert code == 0, err
    assert json.loads(out)["images"] == 2
    code, out, _ = cli(capsys, *base, "--limit", "100000")
    code_all, out_all, _ = cli(capsys, *base)
    assert code == code_all == 0 and json.loads(out)["images"] == json.loads(out_all)["images"] > 2
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal
        cli(capsys, *base, "--limit", "0")
    assert exit_.value.code == 2 and "--limit" in one_line_error(capsys.readouterr().err)


def test_a_limited_validation_loader_is_the_full_ones_first_images():
    from lowrank_vit.stages.data import DataConfig, build_datamodule

    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=4, num_workers=0))
    dm.setup("fit")
    full = torch.cat([x for x, _ in dm.val_dataloader()])[:6]
    first = torch.cat([x for x, _ in dm.val_dataloader(limit=6)])
    assert first.shape[0] == 6 and torch.equal(first, full)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        dm.val_dataloader(limit=0)


def test_an_interpolation_timm_does_not_have_is_refused_naming_the_choices(capsys):
    from lowrank_vit.stages.data_config import INTERPOLATIONS

    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "evaluate", ARCH, "--data", "x", "--interpolation", "lanczos5")
    line = one_line_error(capsys.readouterr().err)
    assert exit_.value.code == 2 and "--interpolation" in line and all(i in line for i in INTERPOLATIONS)


def test_finetune_needs_an_output_directory(capsys):
    """Without --output the fine-tuned model would have nowhere to go (the input is never written)."""
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "finetune", "somedir", "--data", "x", "--epochs", "1")
    assert exit_.value.code == 2 and "--output" in one_line_error(capsys.readouterr().err)


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
