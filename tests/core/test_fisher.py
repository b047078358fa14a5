"""Tests of lowrank_vit/core/fisher.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_vit import (
    FactorizedLinear,
    compress,
    count_params,
)
from lowrank_vit.core.fisher import row_fisher
from lowrank_vit.nn.adapters import get_adapter
from tests.helpers import make, method_cfg


@pytest.mark.usefixtures("one_thread_module")
def test_row_fisher_is_the_summed_squared_gradient_of_each_input_row(labelled):
    model = make("vit")
    model.train()
    layers = get_adapter(model).compressible_layers(model)
    layers["blocks.0.attn.qkv"].weight.requires_grad_(False)
    fisher = row_fisher(model, layers, labelled, 32, progress=False)
    # the model is left as found: mode, flags, no .grad
    assert model.training and not layers["blocks.0.attn.qkv"].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    layer = layers["blocks.2.mlp.fc1"]
    expected = torch.zeros(layer.in_features, dtype=torch.float64)
    for method_images, labels in labelled:
        loss = nn.functional.cross_entropy(model(method_images), labels)
        (grad,) = torch.autograd.grad(loss, [layer.weight])
        expected += grad.double().pow(2).sum(dim=0)  # weight is (out, in): a row of W = weight^T is an input
    assert torch.allclose(fisher["blocks.2.mlp.fc1"], expected, rtol=1e-5)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("batches,match", [
    ("tensors", "labelled calibration batches.*bare image tensor"),
    ("dicts", "labelled calibration batches.*dict without labels"),
    ("generator", "one-shot iterator"),
])
def test_fwsvd_without_labels_is_a_clear_error(batches, match, method_images):
    model = make("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = {"tensors": [method_images[:16]], "dicts": [{"image": method_images[:16]}],
            "generator": ((method_images[:16], torch.zeros(16, dtype=torch.long)) for _ in range(1))}[batches]
    with pytest.raises(ValueError, match=match):
        compress(model, data, method_cfg(decomposition="fwsvd"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())


@pytest.mark.usefixtures("one_thread_module")
def test_fwsvd_accepts_dict_batches_with_labels(method_images):
    model = make("vit")
    data = [{"image": method_images[:16], "label": torch.arange(16) % 10}]
    report = compress(model, data, method_cfg(decomposition="fwsvd", calib_samples=16))
    assert report.params_after == count_params(model)
