"""Tests of lowrank_vit/methods/units.py on a tiny ViT: 2 blocks of 2 heads, dim 32, head_dim 16, with biases."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lowrank_vit.methods.units import NO_MODULES, AttentionHeads, UnitSummary, WholeModules
from lowrank_vit.nn.adapters import TimmViTAdapter
from lowrank_vit.nn.comcat import FactorizedAttention
from tests.helpers import make_tiny_vit, randomize_affine_

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
HEADS = AttentionHeads()


@pytest.fixture
def model() -> nn.Module:
    return randomize_affine_(make_tiny_vit())  # non-zero biases: the q bias row and the folded v bias matter


def head_product(attn: nn.Module, product: str, h: int) -> torch.Tensor:
    """The head's product from the attention weights, written out: ``[x, 1] M x'^T`` is head h's score before the
    softmax (the k bias cancels in it), and ``x M`` its contribution to the output before the output bias."""
    w, b, proj = attn.qkv.weight.double(), attn.qkv.bias.double(), attn.proj.weight.double()
    rows = slice(16 * h, 16 * (h + 1))
    if product == "qk":
        q = torch.cat([w[0:32][rows].T, b[0:32][rows][None]])  # (33, 16)
        return attn.scale * q @ w[32:64][rows]  # (33, 32)
    return w[64:96][rows].T @ proj[:, rows].T  # (32, 32)


def test_no_modules_is_the_default_that_finds_nothing():
    model = make_tiny_vit()
    assert isinstance(NO_MODULES, WholeModules) and not isinstance(NO_MODULES, AttentionHeads)
    assert NO_MODULES.find(model, TimmViTAdapter()) == {}
    assert NO_MODULES.budgets({}) == [] and NO_MODULES.decompositions({}, CPU) == {}
    assert NO_MODULES.summaries({}, {}, {}) == []
    attn = model.blocks[0].attn
    for call in (lambda: NO_MODULES.replaced_params(attn), lambda: NO_MODULES.fixed_params(attn),
                 lambda: NO_MODULES.spec("a", attn, {}), lambda: NO_MODULES.from_spec("a", attn, {}),
                 lambda: NO_MODULES.build("a", attn, {}, {})):
        with pytest.raises(NotImplementedError):
            call()


def test_attention_heads_find_every_attention_module_or_refuse_a_model_without_one(model):
    found = HEADS.find(model, TimmViTAdapter())
    assert list(found) == ["blocks.0.attn", "blocks.1.attn"]
    assert found["blocks.1.attn"] is model.blocks[1].attn
    with pytest.raises(ValueError) as error:
        HEADS.find(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), TimmViTAdapter())
    assert "decomposition='comcat' factorizes attention modules" in str(error.value)
    assert str(error.value).endswith("Sequential has none")


def test_replaced_and_fixed_parameters_are_counted_from_the_shapes(model):
    attn = model.blocks[0].attn
    assert HEADS.replaced_params(attn) == (32 * 96 + 96) + (32 * 32 + 32)  # qkv and proj, biases included
    assert HEADS.fixed_params(attn) == 32  # the output bias (the v bias folded into it)
    attn.proj.bias = None
    attn.qkv.bias = None
    assert HEADS.replaced_params(attn) == 32 * 96 + 32 * 32
    assert HEADS.fixed_params(attn) == 0  # no bias anywhere: no output bias


def test_budgets_give_every_head_a_qk_and_a_vo_unit(model):
    modules = HEADS.find(model, TimmViTAdapter())
    budgets = HEADS.budgets(modules)
    assert [b.name for b in budgets] == [f"blocks.{i}.attn.{p}.{h}" for i in (0, 1) for p in ("qk", "vo")
                                         for h in (0, 1)]
    for b in budgets:
        qk = ".qk." in b.name
        assert (b.in_features, b.out_features) == ((33, 32) if qk else (32, 32))
        assert b.dense_params == 16 * (65 if qk else 64)  # full rank (head_dim) costs rank * (rows + columns)
        assert b.params(4) == 4 * (65 if qk else 64) and b.params(None) == b.dense_params
    curves = {b.name: torch.full((17,), float(i)) for i, b in enumerate(budgets)}
    assert all(torch.equal(b.energy_losses, curves[b.name]) for b in HEADS.budgets(modules, curves))


def test_decompositions_are_the_spectra_of_the_heads_products(model):
    modules = HEADS.find(model, TimmViTAdapter())
    decompositions = HEADS.decompositions(modules, CPU)
    assert sorted(decompositions) == sorted(b.name for b in HEADS.budgets(modules))
    for i in (0, 1):
        attn = model.blocks[i].attn
        for product in ("qk", "vo"):
            for h in (0, 1):
                expected = torch.linalg.svdvals(head_product(attn, product, h))[:16]
                got = decompositions[f"blocks.{i}.attn.{product}.{h}"].singular_values
                torch.testing.assert_close(got[:16].double(), expected)


def test_summaries_report_each_unit_at_its_allocated_rank(model):
    modules = {"blocks.0.attn": model.blocks[0].attn}
    decompositions = HEADS.decompositions(modules, CPU)
    ranks = {"blocks.0.attn.qk.0": 4, "blocks.0.attn.qk.1": None, "blocks.0.attn.vo.0": None,
             "blocks.0.attn.vo.1": 2}
    summaries = {s.name: s for s in HEADS.summaries(modules, decompositions, ranks)}
    assert set(summaries) == set(ranks)
    s = torch.linalg.svdvals(head_product(model.blocks[0].attn, "qk", 0))
    assert summaries["blocks.0.attn.qk.0"] == UnitSummary("blocks.0.attn.qk.0", 33, 32, 4, 1040, 4 * 65,
                                                          pytest.approx(float(s[4:].pow(2).sum() / s.pow(2).sum())))
    full = summaries["blocks.0.attn.qk.1"]
    assert (full.rank, full.params, full.dense_params) == (16, 1040, 1040)  # "dense" is the exact rank head_dim
    assert full.energy_loss == pytest.approx(0.0, abs=1e-12)
    vo = summaries["blocks.0.attn.vo.1"]
    assert (vo.in_features, vo.out_features, vo.rank, vo.params, vo.dense_params) == (32, 32, 2, 128, 1024)
    assert 0.0 < vo.energy_loss < 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        vo.rank = 3


def test_summaries_report_a_unit_missing_from_the_ranks_at_full_rank_as_spec_and_build_do(model):
    name, attn = "blocks.0.attn", model.blocks[0].attn
    modules = {name: attn}
    decompositions = HEADS.decompositions(modules, CPU)
    ranks = {f"{name}.qk.0": 4}  # the other three units are absent: dense, as spec and build read them
    summaries = {s.name: s for s in HEADS.summaries(modules, decompositions, ranks)}
    assert summaries == {s.name: s for s in HEADS.summaries(modules, decompositions, {**ranks, f"{name}.qk.1": None,
                                                                                      f"{name}.vo.0": None,
                                                                                      f"{name}.vo.1": None})}
    spec = HEADS.spec(name, attn, ranks)
    assert [summaries[f"{name}.qk.{h}"].rank for h in (0, 1)] == spec["qk_ranks"] == [4, 16]
    assert [summaries[f"{name}.vo.{h}"].rank for h in (0, 1)] == spec["vo_ranks"] == [16, 16]


def test_build_and_from_spec_give_the_allocated_shape_and_parameter_count(model):
    name, attn = "blocks.0.attn", model.blocks[0].attn
    decompositions = HEADS.decompositions({name: attn}, CPU)
    ranks = {f"{name}.qk.0": 4, f"{name}.vo.1": 2}  # absent units are at full rank, 16
    spec = HEADS.spec(name, attn, ranks)
    assert spec == {"dim": 32, "out_dim": 32, "num_heads": 2, "qk_ranks": [4, 16], "vo_ranks": [16, 2],
                    "q_bias": True, "o_bias": True, "relative_position": False}
    built = HEADS.build(name, attn, decompositions, ranks)
    empty = HEADS.from_spec(name, attn, spec)
    assert isinstance(built, FactorizedAttention) and built.spec() == spec
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in empty.state_dict().items()}
    # (4 + 16) QK ranks at 2 * 32 + 1, (16 + 2) VO ranks at 32 + 32, and the output bias
    assert sum(p.numel() for p in built.parameters()) == 20 * 65 + 18 * 64 + 32 == 2484
    assert sum(p.numel() for p in built.parameters()) < HEADS.replaced_params(attn)
    with pytest.raises(ValueError, match="saved attention blocks.0.attn has num_heads=3, the model's has 2"):
        HEADS.from_spec(name, attn, {**spec, "num_heads": 3})


def test_build_at_full_rank_computes_the_dense_attention(model):
    name, attn = "blocks.1.attn", model.blocks[1].attn
    built = HEADS.build(name, attn, HEADS.decompositions({name: attn}, CPU), {})
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(built(x), attn(x), atol=1e-5, rtol=1e-4)
        low = HEADS.build(name, attn, HEADS.decompositions({name: attn}, CPU), {f"{name}.vo.0": 1})(x)
    assert (low - attn(x)).abs().max() > 1e-3  # a truncated unit does change the output
