"""What a user reads, pinned: every command's and option's help, metavar, choices and default as ``--help`` shows
them, and the model card a compressed directory carries, each compared with a reviewed reference file.

The references are the independent truth here: they were read by a person when written, and a change to them shows
up in review as a diff of the text a user sees. A deliberate change regenerates them:

    LOWRANK_VIT_UPDATE_REFERENCES=1 python -m pytest tests/test_cli_snapshot.py tests/test_cli_errors.py

(tests/fixtures/cli_reference.json and tests/fixtures/model_cards.md), and the diff goes into the same commit.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CLI_REFERENCE = FIXTURES / "cli_reference.json"
CARDS_REFERENCE = FIXTURES / "model_cards.md"
UPDATE = "LOWRANK_VIT_UPDATE_REFERENCES=1 python -m pytest tests/test_cli_snapshot.py"


def _text(value: Any) -> Any:
    """A default or a constant as JSON can hold it, the same on every machine (paths under the home folder are
    written as ``~`` so a reference holds on another account)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, str) and str(Path.home()) in value:
            return value.replace(str(Path.home()), "~")
        return value
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _text(v) for k, v in value.items()}
    return getattr(value, "__name__", type(value).__name__)


def _action(action: argparse.Action, groups: dict[int, str]) -> dict[str, Any]:
    return {
        "options": list(action.option_strings) or [action.dest],
        "dest": action.dest,
        "help": action.help,
        "metavar": _text(action.metavar),
        "choices": _text(list(action.choices)) if action.choices is not None else None,
        "default": _text(action.default),
        "const": _text(action.const),
        "nargs": _text(action.nargs),
        "required": action.required,
        "type": _text(action.type),
        "kind": type(action).__name__,
        "group": groups.get(id(action)),
    }


def describe_parser(parser: argparse.ArgumentParser, name: str = "lowrank-vit") -> dict[str, Any]:
    """Every parser of the command line, nested subcommands included, as plain data: name -> its description,
    epilog and options (in the order ``--help`` lists them)."""
    groups = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
    mutually_exclusive = [sorted(a.dest for a in g._group_actions) for g in parser._mutually_exclusive_groups]
    found: dict[str, Any] = {name: {
        "description": parser.description, "epilog": parser.epilog, "usage": parser.usage,
        "exclusive": mutually_exclusive, "options": [],
    }}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            found[name]["options"].append({"subcommands": {n: helps.get(n) for n in action.choices},
                                           "dest": action.dest, "required": action.required,
                                           "metavar": _text(action.metavar)})
            for sub_name, sub in action.choices.items():
                found.update(describe_parser(sub, f"{name} {sub_name}"))
            continue
        found[name]["options"].append(_action(action, groups))
    return found


def cli_reference() -> dict[str, Any]:
    from lowrank_vit.cli.main import build_parser

    return describe_parser(build_parser())


CARD_REPORTS: dict[str, dict[str, Any]] = {
    # compressed, fine-tuned with every factor trained and a teacher, a dense layer among the chosen ones
    "compressed-and-finetuned": {
        "name": "vit-60", "command": "finetune", "recipe": "loss-aware", "data": "/data/flowers", "calib_images": 256,
        "source": {"architecture": "vit_small_patch16_224", "description": "your checkpoint"},
        "preprocessing": {"input_size": [3, 224, 224], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
                          "std": [0.5, 0.5, 0.5], "crop_pct": 0.95, "crop_mode": "center"},
        "params": {"before": 22_050_664, "after": 8_820_266}, "size_mib": {"before": 84.1, "after": 33.65},
        "reduction": 0.6,
        "accuracy": {"before": {"top1": 81.234, "top5": 95.5, "images": 12_500, "classes": 102},
                     "after": {"top1": 74.9, "top5": 92.125, "images": 12_500, "classes": 102},
                     "final": {"top1": 79.06, "top5": 94.0, "images": 12_500, "classes": 102}},
        "finetune": {"epochs": 3, "lr": 0.0003, "steps": 1_200, "train_factors": True, "distill": 0.5,
                     "distill_temperature": 2.0},
        "layers": [{"name": "blocks.0.attn.qkv", "in_features": 384, "out_features": 1152, "rank": 96,
                    "dense_params": 442_368, "factored_params": 147_456},
                   {"name": "blocks.0.mlp.fc2", "in_features": 1536, "out_features": 384, "rank": None,
                    "dense_params": 589_824, "factored_params": 589_824}],
    },
    # five classes (no top-5 figure), only the compressed model evaluated, partial fine-tune without a teacher
    "five-classes": {
        "name": "tiny-40", "command": "compress", "recipe": "paper", "data": "digits", "calib_images": 16,
        "source": {"architecture": "vit_tiny_patch16_224", "description": "timm model"},
        "preprocessing": {"input_size": [1, 28, 28], "interpolation": "bicubic", "mean": [0.5], "std": [0.25],
                          "crop_pct": 1.0, "crop_mode": "center"},
        "params": {"before": 27_000, "after": 18_000}, "size_mib": {"before": 0.1, "after": 0.07}, "reduction": 0.4,
        "accuracy": {"after": {"top1": 90.0, "top5": 100.0, "images": 50, "classes": 5}},
        "finetune": {"epochs": 1, "lr": 0.001},
        "layers": [{"name": "blocks.1.mlp.fc1", "in_features": 32, "out_features": 128, "rank": 8,
                    "dense_params": 4096, "factored_params": 1280}],
    },
    # a state-space model's scans only: no weight changed, no accuracy
    "scans-only": {
        "recipe": "vmeanba", "layers": [], "reduction": 0.0,
        "vmeanba": {"chosen": ["layers.0.blocks.0.op", "layers.1.blocks.1.op"], "kl": 0.012345},
    },
    # a report written by hand with almost nothing in it
    "empty": {},
}


def model_cards() -> str:
    from lowrank_vit.io.modelcard import render_card

    return "".join(f"<!-- {name} -->\n{render_card(report, report.get('name', 'model'))}\n"
                   for name, report in CARD_REPORTS.items())


def _diff(expected: str, actual: str, what: str) -> str:
    lines = difflib.unified_diff(expected.splitlines(), actual.splitlines(), "reference", "now", lineterm="", n=1)
    return f"{what} changed (if on purpose: {UPDATE}, and review the diff):\n" + "\n".join(list(lines)[:60])


def _assert_reads_as_reviewed(actual: str, reference: Path, what: str) -> None:
    """``actual`` equals the reviewed ``reference`` (rewritten first with LOWRANK_VIT_UPDATE_REFERENCES=1)."""
    if os.environ.get("LOWRANK_VIT_UPDATE_REFERENCES") == "1":
        reference.write_text(actual)
    assert reference.is_file(), f"no reference: {UPDATE}"
    expected = reference.read_text()
    assert actual == expected, _diff(expected, actual, what)


def _cli_text() -> str:
    return json.dumps(cli_reference(), indent=1, sort_keys=False) + "\n"


def test_every_command_and_option_reads_as_reviewed():
    """A help line, a metavar, a choice, a default or a group title that changes without the reference changing
    with it: a user reading `--help` would see something nobody reviewed."""
    _assert_reads_as_reviewed(_cli_text(), CLI_REFERENCE, "the command line")


def test_the_model_card_reads_as_reviewed():
    """Every sentence, figure and block of the card, for reports of every shape (fine-tuned with a teacher, five
    classes, scans only, nearly empty), as a person read it when the reference was written."""
    _assert_reads_as_reviewed(model_cards(), CARDS_REFERENCE, "the model card")


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

