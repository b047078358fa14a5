"""Tests of lowrank_vit/repro/tensortrain.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit.repro import standins as S


def test_random_shift_translates_with_background():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    assert torch.equal(S.random_shift(x, 0, -1.0, torch.Generator().manual_seed(0)), x)
    out = S.random_shift(x, 2, -1.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2), value=-1.0)
        crops = [padded[:, dy: dy + 5, dx: dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) for c in crops)


def test_train_classifier_learns_and_stops_on_nan():
    """The tensor training loop behind the stand-ins (and experiments/cifar10.py): it fits a separable problem, and a
    diverging loss is an error, not a model silently full of NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    assert S.evaluate_top1(model, x, y) < 80
    history = S.train_classifier(model, x, y, epochs=20, lr=1e-2, batch_size=32, seed=0, progress=False)
    assert S.evaluate_top1(model, x, y) > 95 and history["train_top1"] > 90
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        S.train_classifier(model, x, y, epochs=1, lr=1e-2, batch_size=32, seed=0, progress=False,
                           augment=lambda batch, _: batch * float("nan"))


def test_stack_dataset_decodes_every_item():
    items = [(torch.full((1, 2, 2), float(i)), i % 3) for i in range(5)]
    x, y = S.stack_dataset(items)
    assert x.shape == (5, 1, 2, 2) and y.tolist() == [0, 1, 2, 0, 1] and y.dtype == torch.long
    with pytest.raises(ValueError, match="empty"):
        S.stack_dataset([])
