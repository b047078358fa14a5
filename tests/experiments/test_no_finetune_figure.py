"""Tests of experiments/no_finetune_figure.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.loss_aware_study import pack_correct
from experiments.no_finetune_figure import RATIOS, RECIPES, main, plot, points
from tests.helpers import REPO


def _write_results(folder: Path, dense_top1: float = 80.0, odd_settings: str | None = None) -> None:
    """One model, every recipe's cells: recipe i gets the first 50 + 8 i of 100 images right; the refit (i = 1)
    58. So the default (50) is 8 images behind the refit, the others 8 (i - 1) ahead of it."""
    settings = {"calib": 16, "eval": 100, "seed": 3}
    studies: dict[str, dict] = {}
    for i, (recipe, _, name) in enumerate(RECIPES):
        right = torch.arange(100) < 50 + 8 * i
        entry = studies.setdefault(name, {"m": {"settings": dict(settings, calib=5) if name == odd_settings
                                                else settings, "dense_top1": dense_top1, "cells": {}}})["m"]
        for ratio in RATIOS:
            entry["cells"][f"{recipe}@{ratio}"] = {"top1": float(right.float().mean() * 100), "compress_s": 1.0 + i,
                                                   "correct": pack_correct(right)}
    for name, study in studies.items():
        (folder / name).write_text(json.dumps({"study": study}))


def test_points_are_the_distance_to_the_dense_model_and_the_test_against_the_refit(tmp_path):
    _write_results(tmp_path)
    got = points(tmp_path)
    assert set(got) == set(RATIOS)
    row = got[0.7]["m"]
    assert [p["label"] for p in row] == [label for _, label, _ in RECIPES]
    assert [p["behind"] for p in row] == pytest.approx([80.0 - (50 + 8 * i) for i in range(len(RECIPES))])
    assert [p["seconds"] for p in row] == [1.0 + i for i in range(len(RECIPES))]
    # 8 images only the third recipe gets right, none only the refit: exact McNemar p = 2 / 2**8 < 0.05; the
    # default is behind (not "ahead", however small its p), the refit is not tested against itself
    assert [p["ahead_of_refit"] for p in row] == [False, False] + [True] * (len(RECIPES) - 2)


def test_cells_from_other_images_are_refused(tmp_path):
    _write_results(tmp_path, odd_settings=RECIPES[-1][2])
    with pytest.raises(ValueError, match="other images"):
        points(tmp_path)


def test_the_figure_is_written(tmp_path):
    _write_results(tmp_path)
    path = plot(points(tmp_path), tmp_path / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_committed_cells_give_the_docs_distances():
    """On the committed results: cifar_vit4_wide_long at -70% after 4,096 steps is 70.44 - 70.07 behind the dense
    model and not ahead of the refit (docs/loss_aware.md, "A longer distillation"); cifar_vit6_long at -80% is."""
    got = points()
    four_k = {p["label"]: p for p in got[0.7]["cifar_vit4_wide_long"]}["4,096 steps"]
    assert four_k["behind"] == pytest.approx(70.44 - 70.07, abs=0.01) and not four_k["ahead_of_refit"]
    assert {p["label"]: p for p in got[0.8]["cifar_vit6_long"]}["4,096 steps"]["ahead_of_refit"]


def test_main_writes_where_it_is_told(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "sub" / "f.png")]) == 0
    assert (tmp_path / "sub" / "f.png").is_file() and "f.png" in capsys.readouterr().out
    assert (REPO / "docs/figures/no_finetune.png").is_file()  # the committed figure the docs show
