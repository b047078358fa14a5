"""Tests of lowrank_vit/cli/data.py."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_vit.cli import main as cli_main
from lowrank_vit.io.surgery import read_plan
from tests.helpers import (
    ARCH,
    IMAGE_SIZE,
    ONE_BLOCK_KWARGS,
    TWO_BLOCK_KWARGS,
    _assert_one_line_error,
    _images,
    _model_args,
    _run,
    cli,
    make_tiny_vit,
    one_line_error,
)


@pytest.mark.usefixtures('one_thread')
def test_a_label_column_for_a_model_that_is_not_a_classifier_is_refused(place, compressed_headless, capsys):
    code, _, err = cli(
        capsys,
        "evaluate",
        str(compressed_headless),
        "--data",
        str(place / "imgs"),
        "--label-column",
        "label",
        "--quiet",
    )
    assert code == 2
    assert one_line_error(err) == (
        "lowrank-vit: error: --label-column 'label': the model is not a classifier "
        "(num_classes=0), its data is read without labels; drop --label-column"
    )


@pytest.mark.usefixtures("offline")
def test_a_parquet_validation_split_without_labels_is_refused_in_one_line(tmp_path, capsys):
    """A split published without labels gets an all-null label column when datasets reads the folder: refused at
    once, naming the split and how to choose another (it used to end in a TypeError inside the data loader)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def image(seed: int) -> dict:
        buffer = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    data = tmp_path / "d"
    data.mkdir()
    pq.write_table(
        pa.table({"img": [image(i) for i in range(8)], "label": [i % 2 for i in range(8)]}), data / "train.parquet"
    )
    pq.write_table(pa.table({"img": [image(100 + i) for i in range(4)]}), data / "validation.parquet")
    kwargs = {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 2}
    code, out, err = cli(
        capsys,
        "evaluate",
        "vit_tiny_patch16_224",
        "--no-pretrained",
        "--model-kwargs",
        json.dumps(kwargs),
        "--input-size",
        "8",
        "--data",
        str(data),
        "--workers",
        "0",
        "--quiet",
    )
    assert code == 2
    assert one_line_error(err) == (
        f"lowrank-vit: error: the 'validation' split of '{data}' has 4 of 4 rows without a "
        f"label in column 'label' (labels withheld, as in a published test split): set "
        f"--val-split or --train-split to a labelled split"
    )


def _data_args(data: Path) -> argparse.Namespace:
    return argparse.Namespace(
        workers=0,
        data=str(data),
        image_column="image",
        label_column="label",
        train_split="train",
        val_split="validation",
        batch_size=4,
    )


@pytest.mark.usefixtures("offline")
def test_a_model_of_non_square_input_is_refused_naming_its_size(tmp_path):
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.data import _data_config

    pre = {"input_size": (3, 32, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(UserError) as info:
        _data_config(_data_args(tmp_path), pre, calib_samples=8)
    assert str(info.value) == "the data loaders take square images; the model takes 32x16"


@pytest.mark.usefixtures("offline")
def test_the_data_loaders_take_the_models_square_size_and_channels(tmp_path):
    from lowrank_vit.cli.data import _data_config

    pre = {"input_size": (1, 24, 24), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0}
    cfg = _data_config(_data_args(tmp_path), pre, calib_samples=8)
    assert (cfg.img_size, cfg.in_chans) == (24, 1)


@pytest.mark.usefixtures("offline")
def test_the_data_config_keeps_the_models_interpolation_and_crop(tmp_path):
    from lowrank_vit.cli.data import _data_config

    args = argparse.Namespace(
        workers=0,
        data=str(tmp_path),
        image_column=None,
        label_column=None,
        train_split="train",
        val_split=None,
        batch_size=4,
    )
    pre = {
        "input_size": (3, 24, 24),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 0.75,
        "interpolation": "bicubic",
    }
    cfg = _data_config(args, pre, calib_samples=8)
    assert (cfg.interpolation, cfg.crop_pct) == ("bicubic", 0.75)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("quiet", [False, True])
def test_an_evaluation_shows_its_progress_bar_unless_quiet(quiet, monkeypatch):
    from lowrank_vit.cli import data as userdata

    seen = {}

    class Data:
        def val_dataloader(self, limit=None):
            return "loader"

    monkeypatch.setattr(
        userdata,
        "evaluate",
        lambda model, loader, device, progress, desc: seen.update(progress=progress, loader=loader, desc=desc) or {},
    )
    userdata.evaluate_on_user_data(
        None, Data(), torch.device("cpu"), argparse.Namespace(quiet=quiet, limit=None), "evaluate x"
    )
    assert seen == {"progress": not quiet, "loader": "loader", "desc": "evaluate x"}


def test_parquet_with_named_columns(workdir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for array, label in _images(seed=1):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        rows.append({"picture": {"bytes": buffer.getvalue(), "path": None}, "target": label})
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    common = [
        "compress",
        *_model_args(workdir),
        "--data",
        path,
        "--workers",
        "0",
        "--calib-samples",
        "8",
        "--no-eval",
        "--recipe",
        "paper",
        "--reduction",
        "0.3",
        "--quiet",
    ]
    code, _, err = _run(capsys, *common, "--output", tmp_path / "a")
    _assert_one_line_error(code, err, "image column")
    assert not (tmp_path / "a").exists()
    code, _, err = _run(
        capsys, *common, "--image-column", "picture", "--label-column", "wrong", "--output", tmp_path / "a"
    )
    _assert_one_line_error(code, err, "wrong")
    code, _, err = _run(
        capsys, *common, "--image-column", "picture", "--label-column", "target", "--output", tmp_path / "a"
    )
    assert code == 0, err
    assert read_plan(tmp_path / "a")["metadata"]["recipe"] == "paper"


def test_the_users_preprocessing_reaches_the_pixels_the_commands_feed(workdir):
    """The audit's defect: --mean/--std printed and saved while the images were normalized with other values. Here
    the flags differ from timm's for the name and from the checkpoint's (0.5 both), and the independent truth is the
    pixel itself: each one the evaluation split yields is (x / 255 - mean) / std for the user's values."""
    from PIL import Image

    from lowrank_vit.cli.data import build_data
    from lowrank_vit.cli.preprocessing import resolve_model_preprocessing
    from lowrank_vit.cli.sources import load_source

    args = cli_main.build_parser().parse_args(
        [
            "evaluate",
            *map(str, _model_args(workdir)),
            "--data",
            str(workdir / "imgs"),
            "--mean",
            "0.1",
            "0.2",
            "0.3",
            "--std",
            "0.25",
            "--crop-pct",
            "1.0",
            "--interpolation",
            "bilinear",
            "--workers",
            "0",
        ]
    )
    source = load_source(args)
    pre, origin = resolve_model_preprocessing(source, args)
    assert origin["mean"] == origin["std"] == "flag"
    dm = build_data(args, source.model, pre, calib_samples=1)
    for index in (0, len(dm.val_dataset) - 1):
        image, _ = dm.val_dataset[index]
        raw = dm.val_dataset.dataset.dataset[dm.val_dataset.indices[index]]["image"]
        pixels = np.asarray(Image.open(raw["path"]) if isinstance(raw, dict) else raw).astype(np.float32)
        mean = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
        expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean) / 0.25
        assert torch.allclose(image, expected, atol=1e-5)


def test_missing_data_path_and_folder_without_images(workdir, tmp_path, capsys):
    base = ["compress", *_model_args(workdir), "--workers", "0", "--reduction", "0.5", "--quiet"]
    code, _, err = _run(capsys, *base, "--data", tmp_path / "nowhere", "--output", tmp_path / "o")
    _assert_one_line_error(code, err, "nowhere")
    empty = tmp_path / "empty" / "class0"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    code, _, err = _run(capsys, *base, "--data", tmp_path / "empty", "--output", tmp_path / "o")
    _assert_one_line_error(code, err)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_class_count_is_checked_before_calibration(workdir, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(ARCH, pretrained=False, img_size=IMAGE_SIZE, **{**TWO_BLOCK_KWARGS, "num_classes": 5})
    save_file(model.state_dict(), str(tmp_path / "five.safetensors"))
    code, _, err = _run(
        capsys,
        "compress",
        ARCH,
        "--preprocessing",
        "timm",
        "--checkpoint",
        tmp_path / "five.safetensors",
        "--model-kwargs",
        json.dumps({**TWO_BLOCK_KWARGS, "num_classes": 5}),
        "--input-size",
        str(IMAGE_SIZE),
        "--data",
        workdir / "imgs",
        "--workers",
        "0",
        "--reduction",
        "0.5",
        "--quiet",
        "--output",
        tmp_path / "o",
    )
    _assert_one_line_error(code, err, "5 classes", "has 3")
    assert not (tmp_path / "o").exists()


def test_messages_fit_what_was_given(compressed_plain, workdir, tmp_path, capsys):
    code, _, err = _run(
        capsys,
        "compress",
        ARCH,
        "--checkpoint",
        tmp_path,
        "--reduction",
        "0.5",
        "--data",
        workdir / "imgs",
        "--output",
        tmp_path / "o",
    )
    _assert_one_line_error(code, err, "is a directory: give --checkpoint a safetensors or PyTorch file")
    # a model directory's class count cannot be changed by --checkpoint or --model-kwargs: not suggested
    code, _, err = _run(capsys, "evaluate", compressed_plain, "--data", workdir / "imgs", "--workers", "0")
    _assert_one_line_error(code, err, "classes", "give data with the classes it was compressed for")
    assert "--model-kwargs" not in err


def test_data_errors_name_the_flags_not_the_library_fields(compressed_plain, workdir, tmp_path, capsys):
    # a label column the data does not have (a folder of one class, which the folder builder gives no labels, used
    # to be the example: a classifier now reads such data without labels, tests/cli/test_compress.py)
    code, _, err = _run(
        capsys, "evaluate", compressed_plain, "--data", workdir / "imgs", "--workers", "0", "--label-column", "nope"
    )
    _assert_one_line_error(code, err, "has no label column 'nope'", "--label-column")
    assert "label_column=" not in err


def test_cores_counts_the_cores_this_process_may_use(monkeypatch):
    import os

    from lowrank_vit.cli import data as userdata

    assert userdata._cores() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS and Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert userdata._cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert userdata._cores() == 1


def test_a_dataset_name_is_looked_up_on_the_hugging_face_hub(tmp_path, capsys, monkeypatch):
    """``--data owner/name`` that is no local path is a Hugging Face dataset name: offline and not cached, the
    command says it could not load that dataset from the hub, on one line (not a traceback)."""
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    code, _, err = cli(
        capsys,
        "evaluate",
        ARCH,
        "--no-pretrained",
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        str(IMAGE_SIZE),
        "--data",
        "someone/no-such-dataset",
        "--workers",
        "0",
        "--quiet",
        "--latency-batches",
    )
    assert code == 2
    line = one_line_error(err)
    assert "'someone/no-such-dataset'" in line and "Hugging Face hub" in line


def _argv(command: str, tmp_path: Path, data: str) -> list[str]:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return {
        "compress": ["compress", ARCH, "--data", data, "--reduction", "0.5", "--output", str(tmp_path / "o")],
        "evaluate": ["evaluate", ARCH, "--data", data],
        "finetune": ["finetune", str(model), "--data", data, "--epochs", "1", "--output", str(tmp_path / "o")],
    }[command]


@pytest.mark.parametrize("command", ["compress", "evaluate", "finetune"])
@pytest.mark.parametrize(
    "data", ["{tmp}/nowhere", "./no-such-folder-41", "~/no-such-folder-41", "imgs/val/cats", "owner/name/"]
)
def test_a_missing_data_path_is_refused_before_any_model_is_built(
    command, data, tmp_path, capsys, no_model, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    data = data.format(tmp=tmp_path)
    code, _, err = cli(capsys, *_argv(command, tmp_path, data))
    assert code == 2
    assert one_line_error(err) == (
        f"lowrank-vit: error: no data at {data!r}: give --data an image folder, parquet "
        f"file(s) or a Hugging Face dataset name"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("data", ["mnist-5k", "digits", "uoft-cs/cifar10", "imagenet-1k"])
def test_dataset_names_are_not_taken_for_missing_paths(data, tmp_path, capsys, no_model, monkeypatch):
    """A name that may be a dataset reaches the model loading (here: the stand-in that fails the test), where the
    data module then decides."""
    from lowrank_vit.cli.data import check_data_path

    monkeypatch.chdir(tmp_path)
    check_data_path(data)
    with pytest.raises(AssertionError, match="a model was loaded"):
        cli(capsys, *_argv("evaluate", tmp_path, data))


def test_the_reason_for_no_top1_names_what_is_missing_word_for_word():
    """The line that says fidelity stands in for top-1 gives the reason a user can act on: a headless model's
    num_classes, or data without labels and the flag that names a label column."""
    from lowrank_vit.cli.data import no_top1_reason

    assert no_top1_reason(make_tiny_vit(num_classes=0), None) == "the model is not a classifier (num_classes=0)"
    assert no_top1_reason(make_tiny_vit(), None) == (
        "the data has no labels (its training split has no label column, or only an empty one; --label-column "
        "names one)")


def test_the_output_key_a_compression_recorded_wins_over_its_saved_config():
    """A model directory's recorded output (``metadata["output"]``) names the likelihood and output key that the
    compression used; its saved ``compression_config`` is only a fallback, read where the output records no key.
    A recorded key of None (the whole output) stands, even where the config names one."""
    from lowrank_vit.cli.data import recorded_output

    config = {"likelihood": "gaussian", "output_key": "from_config"}
    assert recorded_output({"output": {"likelihood": "categorical", "output_key": "logits"},
                            "compression_config": config}) == ("categorical", "logits")
    assert recorded_output({"output": {"output_key": None}, "compression_config": config}) == ("gaussian", None)
    assert recorded_output({"output": {}, "compression_config": config}) == ("gaussian", "from_config")
    assert recorded_output({}) == ("auto", None)
