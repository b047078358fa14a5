"""``torch.compile`` of a compressed model matches eager execution (skipped where no compiler works here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_vit import compress

from conftest import make_images, make_tiny_vit


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
