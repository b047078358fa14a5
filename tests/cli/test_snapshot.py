"""Tests of lowrank_vit/cli/snapshot.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    CARDS_REFERENCE,
    FIXTURES,
    _assert_reads_as_reviewed,
    cli,
    cli_reference,
    write_image_folder,
)

REFERENCE = FIXTURES / "cli_errors.json"


UPDATE = "LOWRANK_VIT_UPDATE_REFERENCES=1 python -m pytest tests/cli/test_snapshot.py"


ARCH = "vit_tiny_patch16_224"


KWARGS = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 3}


SIZE = 32


@pytest.fixture
def _offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache (read once, at import: the
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # resolved folder too)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder of 3 classes x 4 images, a tiny ViT's weights with and without their preprocessing, a model
    directory compressed from them, and the odd files the catalogue needs."""
    import timm
    from safetensors.torch import save_file

    from lowrank_vit.cli import main as cli_module

    root = tmp_path_factory.mktemp("errors")
    write_image_folder(root / "imgs", 3, 4, SIZE)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **KWARGS)
    save_file(model.state_dict(), str(root / "plain.safetensors"))
    save_file(model.state_dict(), str(root / "weights.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"})
    (root / "note.txt").write_text("a user's file\n")
    (root / "other").mkdir()
    (root / "other" / "keep.txt").write_text("a user's file\n")
    code = cli_module.main(["compress", *_model(root), "--data", str(root / "imgs"), "--workers", "0",
                            "--calib-samples", "8", "--reduction", "0.3", "--no-eval", "--quiet",
                            "--output", str(root / "model")])
    assert code == 0
    return root


def _model(root: Path, weights: str = "weights.safetensors") -> list[str]:
    return [ARCH, "--checkpoint", str(root / weights), "--model-kwargs", json.dumps(KWARGS), "--input-size",
            str(SIZE)]


def _compress(root: Path, *extra: str, weights: str = "weights.safetensors") -> list[str]:
    return ["compress", *_model(root, weights), "--data", str(root / "imgs"), "--workers", "0", "--quiet", *extra]


# (name, the command from the prepared folder); each must stop with exit status 2 and one line on stderr
CASES = {
    "compress without a target": lambda r: _compress(r, "--output", str(r / "o")),
    "a misspelled timm name": lambda r: ["compress", "vit_tiny_patch16_22", "--data", str(r / "imgs"),
                                         "--reduction", "0.5", "--output", str(r / "o")],
    "a model directory that is not there": lambda r: ["compress", str(r / "nowhere" / "model"), "--data",
                                                      str(r / "imgs"), "--reduction", "0.5", "--output", str(r / "o")],
    "a weights file given as the model": lambda r: ["compress", str(r / "plain.safetensors"), "--data",
                                                    str(r / "imgs"), "--reduction", "0.5", "--output", str(r / "o")],
    "a data folder that is not there": lambda r: [*_compress(r, "--reduction", "0.5", "--output", str(r / "o")),
                                                  "--data", str(r / "nowhere" / "imgs")],
    "pretrained weights offline, not in the cache": lambda r: ["evaluate", ARCH, "--data", str(r / "imgs")],
    "a checkpoint that is not there": lambda r: _compress(r, "--reduction", "0.5", "--output", str(r / "o"),
                                                          weights="missing.safetensors"),
    "a checkpoint that is a folder": lambda r: _compress(r, "--reduction", "0.5", "--output", str(r / "o"),
                                                         weights="other"),
    "a checkpoint without its mean and std": lambda r: _compress(r, "--reduction", "0.5", "--output", str(r / "o"),
                                                                 weights="plain.safetensors"),
    "mean and std on the 0-255 scale": lambda r: _compress(r, "--reduction", "0.5", "--output", str(r / "o"),
                                                           "--mean", "125", "123", "114", "--std", "58", "57", "57"),
    "an input size the model directory does not take": lambda r: ["evaluate", str(r / "model"), "--data",
                                                                  str(r / "imgs"), "--input-size", "48"],
    "a setting without its value": lambda r: _compress(r, "--reduction", "0.5", "--output", str(r / "o"),
                                                       "--setting", "rank_multiple"),
    "an output that is a file": lambda r: _compress(r, "--reduction", "0.5", "--output", str(r / "note.txt")),
    "an output below a file": lambda r: _compress(r, "--reduction", "0.5", "--output", str(r / "note.txt" / "o")),
    "an output holding a user's files": lambda r: _compress(r, "--reduction", "0.5", "--output", str(r / "other")),
    "an output holding a model, without --force": lambda r: _compress(r, "--reduction", "0.5", "--output",
                                                                      str(r / "model")),
    "weights of another head than --model-kwargs": lambda r: [*_compress(r, "--reduction", "0.5", "--output",
                                                                       str(r / "o")), "--model-kwargs",
                                                            json.dumps({**KWARGS, "num_classes": 5})],
    "data with other classes than the head": lambda r: ["compress", ARCH, "--no-pretrained", "--model-kwargs",
                                                        json.dumps({**KWARGS, "num_classes": 5}), "--input-size",
                                                        str(SIZE), "--data", str(r / "imgs"), "--workers", "0",
                                                        "--reduction", "0.5", "--output", str(r / "o")],
    "negative workers": lambda r: [*_compress(r, "--reduction", "0.5", "--output", str(r / "o")), "--workers", "-1"],
    "vmeanba on a transformer without a budget": lambda r: _compress(r, "--recipe", "vmeanba", "--output",
                                                                     str(r / "o")),
    "a directory with --checkpoint": lambda r: ["evaluate", str(r / "model"), "--data", str(r / "imgs"),
                                                "--checkpoint", str(r / "plain.safetensors")],
    "a directory with --model-kwargs": lambda r: ["evaluate", str(r / "model"), "--data", str(r / "imgs"),
                                                  "--model-kwargs", json.dumps({"num_classes": 3})],
    "finetune of a directory that is not there": lambda r: ["finetune", str(r / "nowhere"), "--data",
                                                            str(r / "imgs"), "--epochs", "1", "--output",
                                                            str(r / "ft")],
    "finetune into its own input": lambda r: ["finetune", str(r / "model"), "--data", str(r / "imgs"), "--output",
                                              str(r / "model"), "--force", "--epochs", "1"],
    "finetune into a folder inside its input": lambda r: ["finetune", str(r / "model"), "--data", str(r / "imgs"),
                                                          "--output", str(r / "model" / "ft"), "--epochs", "1"],
    "a teacher that is not a weights file": lambda r: ["finetune", str(r / "model"), "--data", str(r / "imgs"),
                                                       "--output", str(r / "ft"), "--distill", "0.5", "--epochs",
                                                       "1", "--teacher-checkpoint", str(r / "note.txt")],
    "export of a directory that is not there": lambda r: ["export", str(r / "nowhere"), "--output",
                                                          str(r / "m.onnx")],
    "export to a folder": lambda r: ["export", str(r / "model"), "--output", str(r / "other")],
    "export over a file": lambda r: ["export", str(r / "model"), "--output", str(r / "note.txt")],
    "export over a file that is not ONNX, with --force": lambda r: ["export", str(r / "model"), "--output",
                                                                    str(r / "note.txt"), "--force"],
    "profile of a model directory": lambda r: ["profile", str(r / "model"), "--output", str(r / "p.json")],
}


def _message(capsys, place: Path, argv: list[str]) -> str:
    try:
        code, _, err = cli(capsys, *argv)
    except SystemExit as exit_:  # argparse's own refusals
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("lowrank-vit") and ": error: " in line]
    assert len(errors) == 1, err  # info lines (the preprocessing in use) may come before it, never a second error
    return errors[0].replace(str(place), "TMP")


@pytest.mark.usefixtures("_offline")
def test_every_refusal_reads_as_reviewed(capsys, place):
    """Each command of the catalogue stops with status 2 and exactly the reviewed line, and the folder the user had
    is left as it was (their file, their other folder and the model directory untouched)."""
    before = {p: p.read_bytes() for p in place.rglob("*") if p.is_file()}
    actual = {name: _message(capsys, place, make(place)) for name, make in CASES.items()}
    after = {p: p.read_bytes() for p in place.rglob("*") if p.is_file()}
    assert after == before, "a refused command changed the user's files"
    if os.environ.get("LOWRANK_VIT_UPDATE_REFERENCES") == "1":
        REFERENCE.write_text(json.dumps(actual, indent=1) + "\n")
    expected = json.loads(REFERENCE.read_text())
    changed = {name: (expected.get(name), text) for name, text in actual.items() if expected.get(name) != text}
    assert not changed, f"refusals changed (if on purpose: {UPDATE}):\n" + "\n".join(
        f"{name}:\n  reference: {was}\n  now:       {now}" for name, (was, now) in changed.items())
    assert set(expected) == set(actual), "the reference lists other cases than the catalogue"


CLI_REFERENCE = FIXTURES / "cli_reference.json"


def _cli_text() -> str:
    return json.dumps(cli_reference(), indent=1, sort_keys=False) + "\n"


def test_every_command_and_option_reads_as_reviewed():
    """A help line, a metavar, a choice, a default or a group title that changes without the reference changing
    with it: a user reading `--help` would see something nobody reviewed."""
    _assert_reads_as_reviewed(_cli_text(), CLI_REFERENCE, "the command line")


def test_the_references_read_what_a_user_reads():
    """The references are not an empty or partial dump: they hold the commands the README describes with their
    help lines, and the figures of the reports (so comparing them is comparing what a user sees)."""
    reference = json.loads(CLI_REFERENCE.read_text())
    for command in ("compress", "evaluate", "finetune", "export", "profile", "plan", "reproduce", "demo"):
        options = reference[f"lowrank-vit {command}"]["options"]
        assert options and all(o.get("help") for o in options if "subcommands" not in o), command
    compress = {o["options"][0]: o for o in reference["lowrank-vit compress"]["options"]}
    assert "--checkpoint" in compress and "--mean" in compress
    cards = CARDS_REFERENCE.read_text()
    for figure in ("22,050,664", "8,820,266", "81.23", "79.06", "60.0%", "0.0123", "| dense / 384 |"):
        assert figure in cards, figure
