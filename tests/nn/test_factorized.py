"""Tests of lowrank_vit/nn/factorized.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_vit import (
    FactorizedLinear,
    compress,
)
from tests.helpers import make_images, make_tiny_vit


def _compiler_works() -> str | None:
    """None if torch.compile can build a plain linear layer here, else why not (no C compiler, no Triton...)."""
    try:
        layer = torch.compile(nn.Linear(4, 4))
        layer(torch.randn(2, 4))
    except Exception as exc:  # the backend's own error types vary by version and platform
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("config", [{}, dict(decomposition="whitened", allocation="greedy", compensation="lowrank"),
                                    dict(decomposition="whitened", allocation="greedy", compensation="structured")],
                         ids=["loss-aware", "lowrank-z", "structured-z"])
def test_compiled_compressed_model_matches_eager(config):
    reason = _compiler_works()
    if reason is not None:
        pytest.skip(f"torch.compile does not work on this machine ({reason})")
    torch._dynamo.reset()
    model = make_tiny_vit()
    images = make_images(32)
    compress(model, [images[:16], images[16:]], reduction=0.4, calib_samples=32, progress=False, **config)
    x = make_images(3, seed=5)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5), float((compiled - eager).abs().max())


def test_factorized_forward_and_repr():
    layer = FactorizedLinear(8, 6, 3)
    torch.nn.init.normal_(layer.U)
    torch.nn.init.normal_(layer.V)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, 8)
    assert torch.allclose(layer(x), (x @ layer.U) @ layer.V.T + layer.bias, atol=1e-6)
    assert "rank=3" in repr(layer)


@pytest.mark.usefixtures("one_thread_module")
def test_every_z_kind_has_its_sizes_checked():
    """read_plan checks the sizes each Z module's spec() writes, as its ``spec_fields`` name them: they must be all
    of them."""
    from lowrank_vit.nn.factorized import Z_MODULES, build_z

    for kind, module in Z_MODULES.items():
        fields = module.spec_fields
        assert fields, kind
        spec = build_z(4, 3, {"kind": kind, **dict.fromkeys(fields, 2)}).spec()
        assert set(spec) - {"kind"} == set(fields), kind
