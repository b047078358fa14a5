"""Post-training quantization (eq. 16) and Table 4's size accounting."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit import compress, count_params, model_size_mib, quantize_
from lowrank_vit.config import recipe
from lowrank_vit.factorized import FactorizedLinear
from lowrank_vit.quantize import quantize_tensor

from conftest import make_images, make_tiny_vit


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_round_to_nearest_error_bound(bits, axis):
    t = torch.randn(17, 23) * torch.linspace(0.1, 3, 23)
    q = quantize_tensor(t, bits, axis)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    err = (q.dequantize() - t).abs()
    scale = q.scale if axis is None else q.scale.view([-1 if d == axis else 1 for d in range(2)])
    assert torch.all(err <= scale / 2 + 1e-6)  # round-to-nearest: at most half a step
    assert len(torch.unique(q.codes)) <= 2**bits


def test_quantization_is_idempotent_and_keeps_zeros():
    t = torch.randn(8, 5)
    t[2] = 0.0
    once = quantize_tensor(t, 8, 0).dequantize()
    twice = quantize_tensor(once, 8, 0).dequantize()
    assert torch.allclose(once, twice, atol=1e-6)
    assert torch.all(once[2] == 0)


def test_quantize_model_factors_and_size():
    model = make_tiny_vit()
    compress(model, [make_images(32)], recipe("paper", reduction=0.5, progress=False))  # with a low-rank Z
    before = {n: p.clone() for n, p in model.named_parameters()}
    fp16 = model_size_mib(model)
    assert fp16 == pytest.approx(count_params(model) * 2 / 2**20)
    record = quantize_(model, bits=8)
    factored = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert {f"{n}.U" for n in factored} <= set(record) and {f"{n}.z.G" for n in factored} <= set(record)
    changed = 0
    for name, param in model.named_parameters():
        if name in record:
            changed += not torch.equal(param, before[name])  # a one-value channel is exact, others move
            assert (param - before[name]).abs().max() < 0.05 * before[name].abs().max()
        else:
            assert torch.equal(param, before[name])  # norms, biases, head, patch embedding untouched
    assert changed >= len(factored) * 2
    expected_bits = 0
    for name, param in model.named_parameters():
        if name in record:
            axis = record[name]["axis"]
            expected_bits += param.numel() * 8 + (1 if axis is None else param.shape[axis]) * 32
        else:
            expected_bits += param.numel() * 16
    assert model_size_mib(model) == pytest.approx(expected_bits / 8 / 2**20)
    assert model_size_mib(model) < fp16


def test_baseline_size_accounting_matches_table4():
    """Table 4 counts every parameter at the stated width: 2 bytes a parameter at FP16."""
    model = make_tiny_vit()
    n = count_params(model)
    assert model_size_mib(model) == pytest.approx(n * 2 / 2**20)
    assert model_size_mib(model, bits=32) == pytest.approx(n * 4 / 2**20)
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_(model, bits=4)
    quantize_(model, bits=4, include_dense=True)
    # Dense weights at 4 bits (+ 2 x 16 bits a channel), biases/norms/embeddings at 16 bits.
    assert model_size_mib(model) < 0.45 * n * 2 / 2**20


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="bits"):
        quantize_tensor(torch.randn(3, 3), 1, 0)
