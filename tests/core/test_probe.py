"""Tests of lowrank_vit/core/probe.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit import compress
from lowrank_vit.config import RECIPES, CompressionConfig
from lowrank_vit.core.likelihood import Gaussian
from lowrank_vit.core.probe import Probe
from tests.helpers import DenseHeadViT, make_images


def test_the_probing_peers_measure_a_models_output_where_it_has_no_classifier_head():
    """FLAR-SVD's feature error and LEMS's divergence read the model's output itself when there is no head: on a
    dense map model both compress (no IndexError, no refusal), and LEMS's divergence under the Gaussian likelihood is
    half the squared distance of the outputs per image, computed here by hand."""
    images = make_images(8)
    for name in ("flar-svd", "kfac-lems"):
        model = DenseHeadViT(as_dict=False)
        report = compress(model, [images], CompressionConfig(reduction=0.5, progress=False, **RECIPES[name]))
        assert report.config["likelihood"] == "gaussian" and report.params_after <= report.target_params
    model = DenseHeadViT(as_dict=False)
    layer = "backbone.blocks.0.mlp.fc1"
    layers = {layer: model.get_submodule(layer)}
    probe = Probe(model, layers, lambda name, rank: torch.zeros_like(layers[name].weight.T), [images], None,
                  torch.device("cpu"), Gaussian())
    with torch.no_grad():
        dense = model(images)
        weight = layers[layer].weight.data.clone()
        layers[layer].weight.data.zero_()
        cut = model(images)
        layers[layer].weight.data.copy_(weight)
    expected = 0.5 * float((cut.double() - dense.double()).square().sum()) / images.shape[0]
    assert probe.kl({layer: 1}) == pytest.approx(expected, rel=1e-5)
    assert probe.feature_error({layer: 1}) == pytest.approx(
        float((cut - dense).square().sum() / cut.square().sum()), rel=1e-5)
