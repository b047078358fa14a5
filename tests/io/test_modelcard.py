"""Tests of lowrank_vit/io/modelcard.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from lowrank_vit import save_compressed
from tests.helpers import (
    CARDS_REFERENCE,
    _assert_reads_as_reviewed,
    make_images,
)

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


def test_the_model_card_reads_as_reviewed():
    """Every sentence, figure and block of the card, for reports of every shape (fine-tuned with a teacher, five
    classes, scans only, nearly empty), as a person read it when the reference was written."""
    _assert_reads_as_reviewed(model_cards(), CARDS_REFERENCE, "the model card")


def _report(**extra) -> dict:
    return {"source": {"architecture": "vim_tiny", "description": "timm vim_tiny"}, "recipe": "paper",
            "params": {"before": 1000, "after": 600}, "size_mib": {"before": 1.0, "after": 0.6}, "reduction": 0.4,
            "layers": [{"name": "blocks.0.mixer.in_proj", "in_features": 32, "out_features": 64, "rank": 8,
                        "factored_params": 768, "dense_params": 2048}], **extra}


@pytest.mark.usefixtures("offline")
def test_the_card_of_vmeanba_beside_a_low_rank_recipe_says_the_weights_changed():
    """`compress --recipe paper --vmeanba-blocks K`: the scans switched and the layers factorized. The card's first
    sentence is the low-rank one (the "no weight changed" one is for VMeanba alone)."""
    from lowrank_vit.io.modelcard import render_card

    vmeanba = {"chosen": ["layers.0"], "kl": 0.01}
    both = render_card(_report(vmeanba=vmeanba), "m")
    assert "is a low-rank product `U Vᵀ`" in both and "no weight changed" not in both
    alone = render_card(_report(vmeanba=vmeanba, layers=[]), "m")
    assert "no weight changed" in alone and "low-rank product" not in alone


@pytest.mark.usefixtures("offline")
def test_the_ranks_figure_is_titled_with_the_architecture(tmp_path):
    """ranks.png's title names the model: two reports that differ only in the architecture give different images
    (and one report the same image twice, so the difference is the title's)."""
    from lowrank_vit.io.modelcard import plot_ranks

    first = plot_ranks(_report(), tmp_path / "a.png").read_bytes()
    assert plot_ranks(_report(), tmp_path / "b.png").read_bytes() == first
    other = _report(source={"architecture": "vim_small"})
    assert plot_ranks(other, tmp_path / "c.png").read_bytes() != first


@pytest.mark.usefixtures("offline")
def test_the_ranks_figure_is_titled_with_the_recipe(tmp_path):
    """ranks.png's title names the recipe that chose the ranks: two reports that differ only in the recipe give
    different images (and one report the same image twice, so the difference is the title's)."""
    from lowrank_vit.io.modelcard import plot_ranks

    first = plot_ranks(_report(), tmp_path / "a.png").read_bytes()
    assert plot_ranks(_report(), tmp_path / "b.png").read_bytes() == first
    other = _report(recipe="loss-aware")
    assert plot_ranks(other, tmp_path / "c.png").read_bytes() != first


def _fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block (CommonMark backtick fences at the start of a line)."""
    blocks, info, body = [], None, []
    for line in markdown.splitlines():
        if info is None:
            if line.startswith("```"):
                info, body = line[3:].strip(), []
        elif line.strip() == "```":
            blocks.append((info, "\n".join(body)))
            info = None
        else:
            body.append(line)
    assert info is None, "a code block is never closed"
    return blocks


REPORT = {
    "name": "tiny-40", "command": "compress", "recipe": "paper", "data": "mnist-5k", "calib_images": 16,
    "source": {"architecture": "vit_tiny_patch16_224", "description": "timm model"},
    "preprocessing": {"input_size": [1, 28, 28], "interpolation": "bicubic", "mean": [0.5], "std": [0.25],
                      "crop_pct": 1.0, "crop_mode": "center"},
    "params": {"before": 27_000, "after": 18_000}, "size_mib": {"before": 0.1, "after": 0.07}, "reduction": 0.4,
    "layers": [{"name": "blocks.0.mlp.fc1", "in_features": 32, "out_features": 128, "rank": 8, "dense_params": 4096,
                "factored_params": 1280}],
}


def test_the_model_cards_code_blocks_are_valid_json_and_python_that_loads_the_model(compressed_by_40, tmp_path):
    """The card's preprocessing block is what a user copies into their own pipeline, and its "How to load" block is
    what they paste into Python: the json block must parse to the preprocessing, and the python block must run and
    load the model."""
    from lowrank_vit.io.modelcard import render_card

    directory = save_compressed(compressed_by_40, tmp_path / "tiny-40")
    card = render_card(REPORT, str(directory))
    blocks = _fenced_blocks(card)
    json_blocks = [body for info, body in blocks if info == "json"]
    python_blocks = [body for info, body in blocks if info == "python"]
    assert len(json_blocks) == 1 and len(python_blocks) == 1
    assert json.loads(json_blocks[0]) == REPORT["preprocessing"]
    namespace: dict = {}
    exec(compile(python_blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - the card's own snippet
    x = make_images(2, seed=4)
    with torch.no_grad():
        assert torch.equal(namespace["model"](x), compressed_by_40(x))


def test_the_ranks_figure_is_drawn_for_a_report_without_a_source(tmp_path):
    """plot_ranks reads a report as render_card does, every field optional but the layers: a report without its
    source (written by hand, or by an older version) still gives the figure rather than a crash."""
    from PIL import Image

    from lowrank_vit.io.modelcard import plot_ranks

    report = {key: value for key, value in REPORT.items() if key not in ("source", "recipe")}
    path = plot_ranks(report, tmp_path / "ranks.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400


def test_top5_is_left_out_where_every_image_is_in_the_top_5():
    """With 5 classes or fewer top-5 is 100% whatever the model: the CLI's lines and the model card leave it out
    rather than print a constant; a report from before the class count was recorded keeps its figure."""
    from lowrank_vit.cli.data import top5_text
    from lowrank_vit.io.modelcard import render_card

    assert top5_text({"top5": 100.0, "classes": 3}, ", ") == ""
    assert top5_text({"top5": 100.0, "classes": 5}, ", ") == ""
    assert top5_text({"top5": 97.1, "classes": 6}, ", ") == ", top-5 97.10%"
    assert top5_text({"top5": 97.1}, "(", ")") == "(top-5 97.10%)"
    for classes, cell in ((3, "—"), (10, "97.10"), (None, "97.10")):
        metrics = {"top1": 90.0, "top5": 97.1, "images": 50} | ({"classes": classes} if classes else {})
        card = render_card({"accuracy": {"after": metrics}}, "model")
        assert f"| after compression | 90.00 | {cell} | 50 |" in card, card


def test_the_model_card_says_what_the_report_holds():
    """Every figure of the card against a report written here: the reduction in percent, the parameter counts,
    a dense layer as "dense", the fine-tune (partial or of every weight), VMeanba's blocks."""
    from lowrank_vit.io.modelcard import render_card

    layers = [{"name": "blocks.0.attn.qkv", "in_features": 48, "out_features": 144, "rank": None,
               "dense_params": 6912, "factored_params": 6912},
              {"name": "blocks.0.mlp.fc1", "in_features": 48, "out_features": 96, "rank": 7,
               "dense_params": 4608, "factored_params": 1008}]
    report = {"source": {"architecture": "vit_x", "description": "my model"}, "recipe": "paper",
              "params": {"before": 123456, "after": 70123}, "size_mib": {"before": 0.47, "after": 0.27},
              "reduction": 0.4321, "calib_images": 96, "data": "imgs/", "layers": layers,
              "finetune": {"epochs": 3, "lr": 0.001, "steps": 30, "train_factors": False}}
    card = render_card(report, "m")
    assert "`vit_x` (my model) compressed by `lowrank_vit` with the **paper** recipe" in card
    assert "| before | 123,456 | 0.5 |" in card and "| after | 70,123 | 0.3 |" in card
    assert "Reduction: 43.2% of the parameters. Calibration: 96 images of `imgs/`." in card
    assert "| `blocks.0.attn.qkv` | 48→144 | dense / 48 | 6,912 / 6,912 |" in card
    assert "| `blocks.0.mlp.fc1` | 48→96 | 7 / 48 | 1,008 / 4,608 |" in card
    assert "Fine-tuned (partial: norms, biases, head, patch embedding) for 3 epoch(s), lr 0.001, 30 steps." in card
    assert "VMeanba" not in card
    report["finetune"] |= {"train_factors": True, "distill": 0.5}
    report["vmeanba"] = {"chosen": ["layers.1.blocks.0.op", "layers.0.blocks.1.op"], "kl": 0.01234}
    card = render_card(report, "m")
    assert ("Fine-tuned (all weights: the low-rank factors, norms, biases, head, patch embedding) for 3 epoch(s), lr "
            "0.001, 30 steps, distilled from the model before compression (weight 0.5, temperature 1.0).") in card
    assert ("Selective scans: 2 block(s) run VMeanba's channel-mean scan (`layers.1.blocks.0.op`, "
            "`layers.0.blocks.1.op`), KL to the model before 0.0123 on the calibration images.") in card


def test_the_card_of_a_model_only_vmeanba_touched_says_no_weight_changed():
    from lowrank_vit.io.modelcard import render_card

    card = render_card({"recipe": "vmeanba", "layers": [], "vmeanba": {"chosen": ["layers.0.blocks.0.op"],
                                                                       "kl": 0.002}}, "m")
    assert "the selective scans of the blocks listed below run VMeanba's channel-mean scan; no weight changed" in card
    assert "low-rank product" not in card


def test_the_ranks_figure_of_a_report_without_layers_is_an_empty_chart(tmp_path):
    """A report without its "layers" (written by hand, or by an older version; the model card reads a missing list
    as empty) still gives the ranks figure: the same empty chart as a report whose layer list is empty, not a
    crash."""
    from PIL import Image

    from lowrank_vit.io.modelcard import plot_ranks

    without = {key: value for key, value in REPORT.items() if key != "layers"}
    path = plot_ranks(without, tmp_path / "without.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400
    assert path.read_bytes() == plot_ranks(dict(without, layers=[]), tmp_path / "empty.png").read_bytes()
