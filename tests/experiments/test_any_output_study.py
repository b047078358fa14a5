"""Tests of experiments/any_output_study.py."""

from __future__ import annotations

import pytest
import torch

from experiments.any_output_study import iou_per_image, knn_top1, paired_test, render
from experiments.loss_aware_study import pack_correct


def test_iou_of_the_thresholded_map_per_image():
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]], [[[-5.0, -5.0], [-5.0, -5.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    masks = torch.tensor([[[[1, 1], [0, 0]]], [[[0, 0], [0, 0]]], [[[1, 0], [0, 0]]]], dtype=torch.bool)
    # image 0: predicted {(0,0), (1,0)}, truth {(0,0), (0,1)}: 1 / 3; image 1: both empty: 1; image 2: 1 / 4
    torch.testing.assert_close(iou_per_image(logits, masks), torch.tensor([1 / 3, 1.0, 0.25]))


def test_knn_votes_by_the_nearest_cosines():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[2.0, 0.1], [0.2, 3.0], [1.0, 0.05]])
    right = knn_top1(bank, labels, queries, torch.tensor([0, 1, 1]), k=2, classes=2)
    assert right.tolist() == [True, True, False]  # the third is nearest to class 0's two images


def test_the_paired_tests_give_their_exact_p_values():
    # Wilcoxon signed-rank, six positive differences without ties: the exact two-sided p is 2 / 2^6
    a, b = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.8, 0.75, 0.5, 0.55, 0.2, 0.39]
    assert paired_test("wilcoxon", a, b)["p"] == pytest.approx(2 / 64)
    assert paired_test("wilcoxon", a, a) == {"median_diff": 0.0, "p": 1.0}
    # McNemar: 5 images only the default gets right, 0 the other: 2 * (1/2)^5
    right = torch.tensor([True] * 5 + [False, True])
    other = torch.tensor([False] * 5 + [False, True])
    result = paired_test("mcnemar", pack_correct(right), pack_correct(other))
    assert (result["only_default"], result["only_other"]) == (5, 0)
    assert result["p"] == pytest.approx(2 / 32)


def test_the_table_marks_each_recipe_against_the_default():
    cells = {"loss-aware@0.5": {"score": 70.0, "score_ft": 71.0},
             "vanilla@0.5": {"score": 60.0, "vs_default": {"p": 0.001}, "score_ft": 70.5,
                             "vs_default_ft": {"p": 0.5}}}
    table = render({"tasks": {"seg": {"cells": cells, "metric": "mean IoU", "dense": 80.0}}})
    assert "| loss-aware | **70.00** | **71.00** |" in table
    assert "| vanilla | 60.00 (p=0.001) | 70.50 (p=0.5) |" in table
