"""Tests of lowrank_vit/cli/fidelity.py."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_vit.cli import fidelity as fid


@pytest.mark.usefixtures('one_thread')
def test_mean_cosine_flattens_each_image():
    dense = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 2.0]]])  # (3, 1, 2)
    other = torch.tensor([[[0.0, 3.0]], [[2.0, 2.0]], [[1.0, 1.0]]])
    # by hand: orthogonal 0; parallel 1; (0,2).(1,1) = 2 over 2 * sqrt(2): 1/sqrt(2)
    per_image = fid.cosine_similarities(dense, other)
    assert per_image.tolist() == pytest.approx([0.0, 1.0, 1 / math.sqrt(2)])
    assert fid.mean_cosine(dense, other) == pytest.approx((1 + 1 / math.sqrt(2)) / 3)
    assert fid.cosine_similarities(torch.zeros(1, 2), torch.ones(1, 2)).tolist() == [0.0]


@pytest.mark.usefixtures('one_thread')
def test_relative_l2_error_pools_every_image():
    dense = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    other = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    # by hand: differences (0, -4) and (0, 3): sqrt(16 + 9) = 5, over ||dense|| = 5
    assert fid.relative_l2_error(dense, other) == pytest.approx(1.0)
    assert fid.relative_l2_error(dense, dense) == 0.0
    assert fid.relative_l2_error(torch.zeros(1, 2), torch.ones(1, 2)) == math.inf


@pytest.mark.usefixtures('one_thread')
def test_mask_iou_per_image_and_probabilities():
    dense = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4]])
    other = torch.tensor([[0.9, 0.1, 0.7, 0.2], [0.2, 0.1, 0.5, 0.0]])
    # by hand: image 0: masks {0, 1} and {0, 2}: 1 shared of 3; image 1: both empty (0.5 is not above 0.5): 1
    assert fid.mask_ious(dense, other).tolist() == pytest.approx([1 / 3, 1.0])
    assert fid.mask_iou(dense, other) == pytest.approx(2 / 3)
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    assert fid.probabilities(logits, "bernoulli").tolist()[0] == pytest.approx(
        [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))])
    assert fid.probabilities(torch.tensor([[1.2, -0.1, 0.25]]), "bernoulli-probabilities").tolist() == [[1, 0, 0.25]]
    with pytest.raises(ValueError, match="sigmoid"):
        fid.probabilities(logits, "gaussian")


@pytest.mark.usefixtures('one_thread')
def test_pearson_r_pools_every_entry():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[2.0, 4.0], [5.0, 9.0]])
    # by hand: deviations (-1.5, -0.5, 0.5, 1.5) and (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert fid.pearson_r(x, y) == pytest.approx(11 / math.sqrt(130))
    assert fid.pearson_r(x, -x) == pytest.approx(-1.0)
    assert math.isnan(fid.pearson_r(torch.ones(2, 2), y))


def _at(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


@pytest.mark.usefixtures('one_thread')
def test_retrieval_agreement_counts_the_neighbours_kept():
    dense = _at(0, 10, 30, 90)  # images a, b, c, d
    other = _at(0, 10, 85, 90)  # c moved next to d
    # by hand, the 2 nearest of each (cosine, the smallest angle): dense a {b, c}, b {a, c}, c {b, a}, d {c, b};
    # other a {b, c}, b {a, c}, c {d, b}, d {c, b}: kept 1, 1, 1/2, 1: 3.5 / 4. The nearest one alone: dense
    # a b, b a, c b, d c; other a b, b a, c d, d c: 3 / 4
    assert fid.retrieval_agreement(dense, other, k=2) == pytest.approx(3.5 / 4)
    assert fid.retrieval_agreement(dense, other, k=1) == pytest.approx(3 / 4)
    assert fid.retrieval_agreement(dense, other, k=5) == 1.0  # k capped at the 3 other images: all of them
    assert fid.retrieval_agreement(dense, other) == pytest.approx(3 / 4)  # default k: half the 3 others, 1
    assert fid.retrieval_agreement(dense, dense * 3.0) == 1.0  # the norms do not matter
    assert [fid.retrieval_k(n) for n in (1, 2, 3, 4, 8, 20, 21, 50)] == [0, 0, 1, 1, 3, 9, 10, 10]
    assert math.isnan(fid.retrieval_agreement(dense[:2], other[:2]))


@pytest.mark.usefixtures('one_thread')
def test_top1_agreement():
    dense = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    other = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.0, 0.0, 2.0]])
    assert fid.top1_agreement(dense, other) == pytest.approx(3 / 4)


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize("likelihood, shape", [("gaussian", (8,)), ("bernoulli", (1, 3, 3)), ("categorical", (5,))])
def test_the_meter_over_batches_equals_the_functions_on_all_images(likelihood, shape):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(7, *shape, generator=g)
    other = dense + 0.5 * torch.randn(7, *shape, generator=g)
    meter = fid.FidelityMeter(likelihood)
    for start in (0, 3, 5):
        stop = {0: 3, 3: 5, 5: 7}[start]
        meter.update(dense[start:stop], other[start:stop])
    result = meter.result()
    assert result["images"] == 7 and result["output_shape"] == list(shape)
    assert result["cosine"] == pytest.approx(fid.mean_cosine(dense, other), rel=1e-12)
    assert result["relative_l2"] == pytest.approx(fid.relative_l2_error(dense, other), rel=1e-12)
    if likelihood == "bernoulli":
        p, q = fid.probabilities(dense, "bernoulli"), fid.probabilities(other, "bernoulli")
        assert result["mask_iou"] == pytest.approx(fid.mask_iou(p, q), rel=1e-12)
        assert result["pearson_r"] == pytest.approx(fid.pearson_r(p, q), rel=1e-9)
    else:
        assert "mask_iou" not in result
    if likelihood == "gaussian":
        assert result["retrieval_agreement"] == pytest.approx(fid.retrieval_agreement(dense, other))
        assert result["retrieval_k"] == 3
    else:
        assert "retrieval_agreement" not in result
    assert ("top1_agreement" in result) == (likelihood == "categorical")
    if likelihood == "categorical":
        assert result["top1_agreement"] == pytest.approx(fid.top1_agreement(dense, other))


@pytest.mark.usefixtures('one_thread')
def test_fidelity_text_names_each_figure():
    text = fid.fidelity_text({"cosine": 0.99876, "relative_l2": 0.05, "mask_iou": 0.9, "pearson_r": None,
                              "retrieval_k": 10, "retrieval_agreement": 0.925, "top1_agreement": 0.5})
    assert text == ("cosine 0.9988, relative L2 error 0.0500, top-1 agreement 50.00%, mask IoU 0.9000, Pearson r n/a "
                    "(a constant map), 10-NN retrieval agreement 0.925")
    assert fid.fidelity_text({"cosine": 1.0, "relative_l2": 0.0, "retrieval_k": 0, "retrieval_agreement": None}) == (
        "cosine 1.0000, relative L2 error 0.0000, 0-NN retrieval agreement n/a (fewer than 3 images)")
