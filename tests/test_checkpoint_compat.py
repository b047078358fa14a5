"""A checkpoint written by an earlier version keeps loading: tests/fixtures/checkpoint_v1 was saved by the flat
package before the sub-package restructure (tests/fixtures/make_checkpoint_v1.py, run from that commit): factors, a
low-rank Z and 8-bit quantization records. Today's loader must rebuild the same function."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lowrank_vit import load_compressed
from lowrank_vit.nn.factorized import FactorizedLinear

from conftest import make_images

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def test_a_checkpoint_of_the_flat_package_loads_and_computes_the_same_logits():
    model = load_compressed(FIXTURE)
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert len(layers) == 8 and any(layer.z is not None for layer in layers)
    with torch.no_grad():
        logits = model(make_images(4, seed=13))
    expected = load_file(str(FIXTURE / "expected_logits.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
