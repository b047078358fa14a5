"""Tests of lowrank_vit/methods/comcat.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_vit import (
    FactorizedLinear,
    compress,
)
from lowrank_vit.methods.comcat import factorize_attention, head_decompositions, head_products, product_svd, unit_name
from lowrank_vit.nn.adapters import get_adapter, set_submodule
from lowrank_vit.nn.comcat import FactorizedAttention, attention_geometry
from tests.helpers import ARCHS, make, method_cfg


@pytest.mark.usefixtures("one_thread_module")
def test_product_svd_is_the_svd_of_the_product():
    torch.manual_seed(0)
    left, right = torch.randn(17, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    decomposition = product_svd(left, right)
    full = torch.linalg.svdvals(left @ right.T)
    assert torch.allclose(decomposition.singular_values, full[:4])
    U, V = decomposition.factors(4)
    assert torch.allclose(U @ V.T, left @ right.T)
    U, V = decomposition.factors(2)
    assert torch.isclose((left @ right.T - U @ V.T).pow(2).sum(), full[2:].pow(2).sum())


def full_rank(name: str, attn: nn.Module) -> FactorizedAttention:
    return factorize_attention(name, attn, head_decompositions({name: attn}), {})


@pytest.mark.usefixtures("one_thread_module")
def test_full_rank_ranks_default_to_head_dim():
    model = make("vit")
    module = full_rank("blocks.0.attn", model.blocks[0].attn)
    assert module.qk_ranks == module.vo_ranks == (16, 16, 16, 16)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_comcat_full_rank_reproduces_every_attention_output(arch):
    """Each attention module alone, with its block's shifted-window mask for Swin; q, k, v and proj biases
    non-zero, so the dropped k bias, the augmented q bias row and the folded v bias are all exercised."""
    model = make(arch)
    torch.manual_seed(1)
    for name, attn in get_adapter(model).attention_modules(model).items():
        block = model.get_submodule(name.rsplit(".", 1)[0])
        factorized = full_rank(name, attn)
        tokens = 16 if arch == "swin" else 17 + (arch == "deit")
        kwargs = {"mask": block.attn_mask} if arch == "swin" and block.attn_mask is not None else {}
        batch = 2 * kwargs["mask"].shape[0] if kwargs else 8  # Swin: whole images of windows, batch-major
        x = torch.randn(batch, tokens, attention_geometry(attn).dim)
        with torch.no_grad():
            assert torch.allclose(factorized(x, **kwargs), attn(x, **kwargs), atol=1e-5), name


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_comcat_full_rank_reproduces_the_logits(arch, method_images):
    model = make(arch)
    with torch.no_grad():
        reference = model(method_images[:4])
        for name, attn in get_adapter(model).attention_modules(model).items():
            set_submodule(model, name, full_rank(name, attn))
        assert torch.allclose(model(method_images[:4]), reference, atol=1e-5)
    assert not get_adapter(model).attention_modules(model)


@pytest.mark.usefixtures("one_thread_module")
def test_comcat_k_bias_cancels_and_q_bias_does_not():
    """Only b_Q W_K^T x_j depends on the key: changing b_K leaves the attention unchanged, changing b_Q does not."""
    model = make("vit")
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        reference = attn(x)
        attn.qkv.bias[64:128] += 3.0  # every k bias
        assert torch.allclose(attn(x), reference, atol=1e-5)
        assert torch.allclose(full_rank("a", attn)(x), reference, atol=1e-5)
        attn.qkv.bias[:64] += 3.0
        assert not torch.allclose(attn(x), reference, atol=1e-3)
        assert torch.allclose(full_rank("a", attn)(x), attn(x), atol=1e-5)


@pytest.mark.usefixtures("one_thread_module")
def test_head_products_are_the_heads_bilinear_forms():
    model = make("vit")
    attn = model.blocks[1].attn
    products = head_products(attn)
    x = torch.randn(5, 64, dtype=torch.float64)
    qkv = nn.functional.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double())
    q, k = qkv[:, :64].reshape(5, 4, 16), qkv[:, 64:128].reshape(5, 4, 16)
    left, right = products["qk.2"]
    scores = attn.scale * q[:, 2] @ k[:, 2].T
    augmented = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    from_product = augmented @ left @ right.T @ x.T
    # equal up to terms constant along the key axis (x_i W_Q b_K^T + b_Q b_K^T), which the softmax cancels
    assert torch.allclose(torch.softmax(from_product, -1), torch.softmax(scores, -1), atol=1e-10)


@pytest.mark.usefixtures("one_thread_module")
def test_comcat_allocates_ranks_per_head(labelled):
    model = make("vit")
    report = compress(model, labelled, method_cfg(decomposition="comcat", reduction=0.5))
    heads = [lr for lr in report.layers if ".qk." in lr.name or ".vo." in lr.name]
    assert len(heads) == 4 * 2 * 4
    assert {lr.name for lr in heads} >= {unit_name("blocks.0.attn", "qk", 3), unit_name("blocks.3.attn", "vo", 0)}
    assert all(1 <= lr.rank <= 16 for lr in heads)
    for name, attn in get_adapter(model).attention_modules(model, include_factorized=True).items():
        assert isinstance(attn, FactorizedAttention)
        assert list(attn.qk_ranks) == [report.ranks[unit_name(name, "qk", h)] for h in range(4)]
    # the MLP layers are plain-SVD FactorizedLinears
    assert {n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)} <= \
        {f"blocks.{i}.mlp.{fc}" for i in range(4) for fc in ("fc1", "fc2")}
