"""Tests of lowrank_vit/cli/preprocessing.py."""

from __future__ import annotations

import argparse
import json

import pytest

from lowrank_vit.io.surgery import read_plan
from tests.helpers import (
    ARCH,
    FOLDER_SIZE,
    IMAGE_SIZE,
    ONE_BLOCK_KWARGS,
    _assert_one_line_error,
    _compress_argv,
    _model_args,
    _run,
    cli,
    make_tiny_vit,
    one_line_error,
)


@pytest.mark.usefixtures("offline")
def test_the_printed_preprocessing_says_the_input_size_is_the_models_own(images_and_weights, tmp_path, capsys):
    """The line every command prints first: the input size comes from the model (it is never a flag or a
    carried field), whatever a directory carries."""
    assert cli(capsys, *_compress_argv(images_and_weights, tmp_path / "m", "--quiet", "--no-eval"))[0] == 0
    code, _, err = cli(
        capsys,
        "evaluate",
        str(tmp_path / "m"),
        "--data",
        str(images_and_weights / "imgs"),
        "--workers",
        "0",
        "--latency-batches",
    )
    assert code == 0
    line = next(line for line in err.splitlines() if line.startswith("preprocessing:"))
    assert f"input 3x{FOLDER_SIZE}x{FOLDER_SIZE} (model)" in line and "mean 0.5,0.5,0.5 (directory" in line


@pytest.mark.usefixtures("offline")
def test_the_preprocessing_line_separates_its_fields_with_commas():
    """The line every command prints first, whole: each field, where it came from, ", " between them."""
    from lowrank_vit.cli.preprocessing import describe_preprocessing

    pre = {
        "input_size": (3, 32, 48),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
    }
    origin = {
        "input_size": "model",
        "mean": "checkpoint",
        "std": "--std",
        "crop_pct": "timm config",
        "interpolation": "timm config",
    }
    assert describe_preprocessing(pre, origin) == (
        "preprocessing: input 3x32x48 (model), mean 0.485,0.456,0.406 (checkpoint), std 0.5,0.5,0.5 (--std), "
        "crop_pct 0.9 (timm config), interpolation bicubic (timm config)"
    )


@pytest.mark.usefixtures("offline")
def test_a_checkpoint_without_normalization_is_refused_even_by_a_command_without_preprocessing_flags():
    """`finetune` has no --preprocessing flag; a model that records a checkpoint but carries no mean and std is
    still refused in words, never guessed (nor an AttributeError)."""
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.preprocessing import resolve_model_preprocessing
    from lowrank_vit.cli.sources import Source

    source = Source(make_tiny_vit(seed=0), ARCH, "a model", record={"checkpoint": "w.pt"})
    with pytest.raises(UserError, match=r"^--checkpoint w\.pt carries no mean or std: give the values"):
        resolve_model_preprocessing(source, argparse.Namespace())


def test_compress_prints_the_preprocessing_and_its_origin(workdir, tmp_path, capsys):
    code, out, err = _run(
        capsys,
        "compress",
        *_model_args(workdir),
        "--data",
        workdir / "imgs",
        "--workers",
        "0",
        "--calib-samples",
        "8",
        "--no-eval",
        "--recipe",
        "vanilla",
        "--reduction",
        "0.3",
        "--mean",
        "0.4",
        "--output",
        tmp_path / "m",
    )
    assert code == 0, err
    line = next(line for line in err.splitlines() if line.startswith("preprocessing:"))
    assert "mean 0.4,0.4,0.4 (flag)" in line and "std 0.5,0.5,0.5 (checkpoint" in line
    assert "input 3x32x32" in line
    assert read_plan(tmp_path / "m")["metadata"]["preprocessing"]["mean"] == [0.4, 0.4, 0.4]
    assert str(tmp_path / "m") in out


@pytest.mark.parametrize(
    "flags, needle", [(["--crop-pct", "1.5"], "crop_pct"), (["--std", "0"], "std"), (["--mean", "0.1", "0.2"], "mean")]
)
def test_bad_preprocessing_flags(workdir, tmp_path, capsys, flags, needle):
    code, _, err = _run(
        capsys,
        "compress",
        *_model_args(workdir),
        "--data",
        workdir / "imgs",
        "--workers",
        "0",
        "--reduction",
        "0.5",
        "--quiet",
        "--output",
        tmp_path / "o",
        *flags,
    )
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_an_input_size_a_model_directory_does_not_take_is_refused_naming_both(model_dir, images, capsys):
    """``--input-size`` with a model directory built for another size: one line giving the size the model takes
    and the size asked for, not a traceback."""
    code, _, err = cli(
        capsys,
        "evaluate",
        str(model_dir),
        "--input-size",
        "48",
        "--data",
        str(images),
        "--workers",
        "0",
        "--quiet",
        "--latency-batches",
    )
    assert code == 2
    line = one_line_error(err)
    assert "the model takes 3x32x32 images, --input-size asks for 3x48x48" in line
    assert "a model directory keeps its size" in line


def test_an_input_size_that_contradicts_model_kwargs_names_the_kwargs(images, capsys):
    """A timm name whose --model-kwargs fix another size: the advice is to make them agree, not the directory's."""
    code, _, err = cli(
        capsys,
        "evaluate",
        "vit_tiny_patch16_224",
        "--no-pretrained",
        "--model-kwargs",
        '{"img_size": 64}',
        "--input-size",
        "32",
        "--data",
        str(images),
        "--workers",
        "0",
        "--quiet",
    )
    assert code == 2
    line = one_line_error(err)
    assert "the model takes 3x64x64 images, --input-size asks for 3x32x32" in line and "--model-kwargs" in line
    assert "directory" not in line


def test_a_checkpoint_without_preprocessing_is_refused_until_the_user_says_which(checkpoint, images, capsys):
    """timm's mean and std are those of timm's weights, not of the user's: with --checkpoint and no mean and std from
    the flags or the file, evaluate stops with one line naming the flags and --preprocessing timm; each way out
    works, and what it used is what the user said."""
    base = [
        "evaluate",
        ARCH,
        "--checkpoint",
        str(checkpoint),
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        str(IMAGE_SIZE),
        "--data",
        str(images),
        "--workers",
        "0",
        "--json",
        "--quiet",
        "--latency-batches",
    ]
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


@pytest.mark.parametrize(
    "flag, values, scaled",
    [
        ("--mean", ["123.675", "116.28", "103.53"], "0.485 0.456 0.406"),
        ("--std", ["58.395", "57.12", "57.375"], "0.229 0.224 0.225"),
    ],
)
def test_mean_or_std_on_the_0_255_scale_is_refused_with_the_values_divided(
    checkpoint, images, capsys, flag, values, scaled
):
    other = ["--std", "0.2"] if flag == "--mean" else ["--mean", "0.5"]
    code, _, err = cli(
        capsys,
        "evaluate",
        ARCH,
        "--checkpoint",
        str(checkpoint),
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        str(IMAGE_SIZE),
        "--data",
        str(images),
        "--workers",
        "0",
        "--quiet",
        flag,
        *values,
        *other,
    )
    assert code == 2
    line = one_line_error(err)
    assert "looks like the 0-255 scale" in line and f"({scaled})" in line
