"""Tests of lowrank_vit/cli/outputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowrank_vit.io.surgery import read_plan
from tests.helpers import (
    ARCH,
    _assert_one_line_error,
    _checkpoint_argv,
    _compress,
    _compress_argv,
    _compressed,
    _digest,
    _run,
    cli,
    one_line_error,
)


@pytest.mark.usefixtures("offline")
def test_a_finetune_whose_output_holds_its_input_names_the_input(images_and_weights, tmp_path, capsys):
    """The refusal names the input directory it protects, so the user sees which one."""
    assert cli(capsys, *_compress_argv(images_and_weights, tmp_path / "inner" / "m", "--quiet", "--no-eval"))[0] == 0
    code, _, err = cli(capsys, "finetune", str(tmp_path / "inner" / "m"), "--data", str(images_and_weights / "imgs"),
                       "--epochs", "1", "--output", str(tmp_path / "inner"), "--force")
    assert code == 2
    assert f"holds the input directory {str(tmp_path / 'inner' / 'm')!r}" in err


@pytest.fixture(scope="module")
def compressed_dir(images_and_weights, tmp_path_factory) -> Path:
    from lowrank_vit.cli.main import main

    out = tmp_path_factory.mktemp("written") / "my-model"
    assert (
        main(
            [
                "compress",
                *_checkpoint_argv(images_and_weights),
                "--calib-samples",
                "8",
                "--reduction",
                "0.3",
                "--recipe",
                "vanilla",
                "--output",
                str(out),
                "--quiet",
                "--no-eval",
            ]
        )
        == 0
    )
    return out


@pytest.mark.usefixtures("offline")
def test_the_model_card_is_titled_with_the_output_directorys_name(compressed_dir):
    card = (compressed_dir / "README.md").read_text()
    assert "\n# my-model\n" in card
    assert ".my-model" not in card  # never the hidden staging directory it was written in


@pytest.mark.usefixtures("offline")
def test_the_reports_layer_rows_carry_the_compressions_output_errors(compressed_dir):
    """report.json's per-layer rows are the compression's: "per-layer ranks and errors" (docs/cli.md), each
    layer's factored count rank x (in + out) for the vanilla recipe (no Z)."""
    rows = json.loads((compressed_dir / "report.json").read_text())["layers"]
    assert len(rows) == 4  # one block: qkv, proj, fc1, fc2
    for row in rows:
        assert isinstance(row["output_error"], float) and 0 < row["output_error"] < 1, row
        if row["rank"] is not None:
            assert row["factored_params"] == row["rank"] * (row["in_features"] + row["out_features"])


@pytest.mark.usefixtures("offline")
def test_an_output_written_by_save_compressed_is_described_by_its_architecture(tmp_path):
    """A model directory the library's save_compressed wrote (no record of where the model came from) is still
    named in the refusal to overwrite it."""
    from lowrank_vit import save_compressed
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.outputs import check_output_dir

    out = save_compressed(_compressed(), tmp_path / "m")
    with pytest.raises(UserError) as info:
        check_output_dir(out, force=False)
    assert str(info.value) == (
        f"--output {str(out)!r} already holds a model (vit_tiny_patch16_224): give --force "
        f"to replace it, or another directory"
    )


@pytest.mark.usefixtures("offline")
def test_a_reports_layer_rows_count_the_dense_weights_of_each_layer():
    """A model without a compression report (a fine-tune's input written by save_compressed): each layer's row says
    in x out dense weights, read here from the layer's own shape."""
    from lowrank_vit.cli.outputs import report_layers

    model = _compressed()
    rows = report_layers(model, None)
    assert rows
    for row in rows:
        layer = model.get_submodule(row["name"])
        assert row["dense_params"] == layer.in_features * layer.out_features == row["in_features"] * row["out_features"]


@pytest.mark.usefixtures("offline")
def test_compress_writes_an_output_whose_parents_do_not_exist_yet(images_and_weights, tmp_path, capsys):  # noqa: F811
    """`--output runs/today/deit-50`, neither folder there yet: made, as `mkdir -p` would, not an OSError."""
    out = tmp_path / "runs" / "today" / "deit-50"
    code, _, err = cli(capsys, *_compress_argv(images_and_weights, out, "--quiet", "--no-eval"))
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["deit-50"]  # the staging folder is gone


def test_output_directory_is_never_overwritten_silently(compressed, workdir, tmp_path, capsys):
    plan_before = (compressed / "lowrank_vit.json").read_text()
    code, _, err = _compress(capsys, workdir, compressed, "--reduction", "0.5", "--no-eval")
    _assert_one_line_error(code, err, f"already holds a model ({ARCH} from ", "--force")
    assert (compressed / "lowrank_vit.json").read_text() == plan_before
    # a directory with the user's own files is refused even with --force
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    code, _, err = _compress(capsys, workdir, mine, "--reduction", "0.5", "--no-eval", "--force")
    _assert_one_line_error(code, err, "holds other files and no model")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    # --force replaces a model directory, and only once the new model is complete
    other = tmp_path / "other"
    assert _compress(capsys, workdir, other, "--reduction", "0.3", "--no-eval", "--recipe", "vanilla")[0] == 0
    code, _, err = _compress(capsys, workdir, other, "--reduction", "0.5", "--no-eval", "--force")
    assert code == 0, err
    assert read_plan(other)["metadata"]["recipe"] == "loss-aware"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "other"]


def test_outputs_inside_or_around_the_input_are_refused_before_any_work(compressed_plain, tmp_path, capsys):
    weights = compressed_plain / "model.safetensors"
    before = sorted(p.name for p in compressed_plain.iterdir()), _digest(weights)
    for argv, needle in (
        (["finetune", compressed_plain, "--output", compressed_plain / "sub"], "inside the input directory"),
        (["finetune", compressed_plain, "--output", compressed_plain.parent, "--force"], "holds the input"),
        (["export", compressed_plain, "--output", weights, "--force"], "inside the input directory"),
        (["export", compressed_plain, "--output", compressed_plain / "m.onnx"], "inside the input directory"),
    ):
        extra = ["--data", tmp_path / "nowhere", "--epochs", "1"] if argv[0] == "finetune" else []
        code, _, err = _run(capsys, *argv, *extra)
        _assert_one_line_error(code, err, needle)
    assert (sorted(p.name for p in compressed_plain.iterdir()), _digest(weights)) == before


@pytest.mark.parametrize("command", ["compress", "finetune", "export"])
def test_an_output_below_a_file_is_refused_before_any_work(command, compressed_plain, tmp_path, capsys):
    blocker = tmp_path / "model.onnx"
    blocker.write_text("a file")
    argv = {
        "compress": [ARCH, "--no-pretrained", "--reduction", "0.5", "--data", tmp_path],
        "finetune": [compressed_plain, "--data", tmp_path, "--epochs", "1"],
        "export": [compressed_plain],
    }[command]
    code, _, err = _run(capsys, command, *argv, "--output", blocker / "sub")
    _assert_one_line_error(code, err, "cannot be written", "is a file")
    assert blocker.read_text() == "a file"


def test_force_never_deletes_the_users_files_beside_a_model(compressed_plain):
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.outputs import check_output_dir

    (compressed_plain / "NOTES.txt").write_text("mine")
    (compressed_plain / "mydata").mkdir()
    with pytest.raises(UserError, match=r"other files \(NOTES.txt, mydata\), which --force would delete"):
        check_output_dir(compressed_plain, force=True)
    (compressed_plain / "NOTES.txt").unlink()
    (compressed_plain / "mydata").rmdir()
    check_output_dir(compressed_plain, force=True)  # a model directory and nothing else: replaceable


def test_an_existing_empty_directory_is_a_valid_output(tmp_path):
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.outputs import check_output_dir

    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", force=False)  # made beforehand (mkdir -p out/): nothing to overwrite
    (tmp_path / "notes.txt").write_text("mine")
    for force in (False, True):  # publishing would move the file aside under a hidden name
        with pytest.raises(UserError, match="is a file"):
            check_output_dir(tmp_path / "notes.txt", force=force)
    (tmp_path / "empty" / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files and no model"):
        check_output_dir(tmp_path / "empty", force=False)


@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_publish_puts_the_previous_model_back(tmp_path, monkeypatch, existing):
    """The last step of every command moves the finished directory into place; if that move fails, the model the
    user had there is back where it was, whole, and the error is not swallowed."""
    import os

    from lowrank_vit.cli import outputs

    out, stage = tmp_path / "model", tmp_path / ".model.partial"
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"new")
    if existing:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"old")
    real = os.replace

    def failing(src, dst):
        if Path(src) == stage:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        outputs.publish(stage, out)
    assert (out / "model.safetensors").read_bytes() == b"old" if existing else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model"] * existing + [".model.partial"])
    monkeypatch.setattr(outputs.os, "replace", real)
    outputs.publish(stage, out)
    assert (out / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the previous model removed once replaced


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


@pytest.mark.parametrize("command", ["compress", "finetune", "export"])
def test_an_existing_output_is_refused_before_any_model_is_built(command, tmp_path, capsys, no_model):
    from lowrank_vit.io.surgery import PLAN_FILE

    model = tmp_path / "model"
    model.mkdir()
    if command == "export":
        out = tmp_path / "m.onnx"
        out.write_bytes(b"an earlier export")
        argv = ["export", str(model), "--output", str(out)]
    else:
        out = tmp_path / "o"
        out.mkdir()
        (out / PLAN_FILE).write_text("a model directory's plan")
        argv = {
            "compress": ["compress", ARCH, "--data", str(tmp_path), "--reduction", "0.5"],
            "finetune": ["finetune", str(model), "--data", str(tmp_path), "--epochs", "1"],
        }[command]
        argv += ["--output", str(out)]
    code, _, err = cli(capsys, *argv)
    assert code == 2
    line = one_line_error(err)
    assert str(out) in line and "--force" in line
