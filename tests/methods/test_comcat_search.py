"""COMCAT's rank search (lowrank_vit.methods.comcat_search): its pure pieces against hand-computed values, and the
search itself on tiny random-weight ViTs: the target met, the argmax ranks among the candidates, the layer that
matters kept at the larger rank, the same result under a seed."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from lowrank_vit.config import RECIPES, CompressionConfig
from lowrank_vit.methods import comcat
from lowrank_vit.methods.comcat_search import (
    PUBLIC_ATTENTION_CANDIDATES,
    PUBLIC_LINEAR_CANDIDATES,
    ComcatSearchSettings,
    _masked_attention,
    _units,
    _write_back_attention,
    candidate_ranks,
    comcat_search,
    mixture_mask,
    penalized_loss,
    temperature_at,
)
from lowrank_vit.nn.adapters import get_adapter
from lowrank_vit.pipeline import compress, plan_compression
from tests.helpers import make

FAST = {"search_rounds": 3, "search_steps": 6, "train_steps": 2, "search_batch_size": 16}


def _vit(depth: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                              embed_dim=48, num_heads=3, num_classes=7, qkv_bias=True)
    with torch.no_grad():  # non-zero biases everywhere: the write-back must carry them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def _config(**settings) -> CompressionConfig:
    return CompressionConfig(**RECIPES["comcat-search"], reduction=0.5, calib_samples=48, progress=False,
                             settings={**FAST, **settings})


def test_candidates_are_the_public_sets_at_their_widths_and_scaled_elsewhere():
    assert candidate_ranks(384, PUBLIC_LINEAR_CANDIDATES) == (12, 24, 32, 48, 64, 96, 128, 144, 192, 288)
    assert candidate_ranks(768, PUBLIC_ATTENTION_CANDIDATES) == (128, 192, 256, 320, 384, 448, 512)
    # 96 is nearest to 192 (a factor 2 on the log scale, against 4 to 384): the 192 set halved
    assert candidate_ranks(96, PUBLIC_LINEAR_CANDIDATES) == (3, 6, 12, 24, 32, 48, 64, 72)
    assert candidate_ranks(96, PUBLIC_ATTENTION_CANDIDATES) == (16, 32, 48, 64, 80)
    # 1024 is nearest to 768: the 768 set times 4/3, rounded
    assert candidate_ranks(1024, PUBLIC_ATTENTION_CANDIDATES) == (171, 256, 341, 427, 512, 597, 683)
    # never the full width, never zero
    assert candidate_ranks(4, PUBLIC_LINEAR_CANDIDATES) == (1, 2, 3)
    with pytest.raises(ValueError, match="width"):
        candidate_ranks(0, PUBLIC_LINEAR_CANDIDATES)


def test_mixture_mask_by_hand():
    mask = mixture_mask(torch.tensor([0.2, 0.3, 0.5]), torch.tensor([1, 2, 4]), 5)
    torch.testing.assert_close(mask, torch.tensor([1.0, 0.8, 0.5, 0.5, 0.0]))
    hard = mixture_mask(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1, 2, 4]), 5)
    torch.testing.assert_close(hard, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))


def test_masked_singular_values_are_the_mixture_of_the_truncations():
    torch.manual_seed(1)
    W = torch.randn(9, 6, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    weights, ranks = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), torch.tensor([1, 3, 5])
    mixed = sum(m * (U[:, :r] * s[:r]) @ Vh[:r] for m, r in zip(weights, ranks.tolist(), strict=True))
    masked = (U * (mixture_mask(weights, ranks, 6) * s)) @ Vh
    torch.testing.assert_close(masked, mixed)


def test_penalty_starts_strictly_above_the_target():
    task = torch.tensor(2.0)
    assert float(penalized_loss(task, torch.tensor(100.0), 100.0, 1.5)) == 2.0  # at the target: no penalty
    assert float(penalized_loss(task, torch.tensor(99.0), 100.0, 1.5)) == 2.0
    assert float(penalized_loss(task, torch.tensor(400.0), 100.0, 1.5)) == pytest.approx(2.0 * 8.0)


def test_temperature_anneals_from_start_towards_end():
    assert temperature_at(0, 29, 5.0, 0.1) == 5.0
    # after all 29 passes of a 30-epoch run the public rate has been applied 29 times out of 30
    assert temperature_at(29, 29, 5.0, 0.1) == pytest.approx(5.0 * (0.1 / 5.0) ** (29 / 30))


@pytest.mark.parametrize("bad", [{"search_rounds": 0}, {"beta": 0.0}, {"temperature": -1.0}, {"arch_lr": 0},
                                 {"weight_decay": -0.1}, {"search_steps": 0}, {"seed": 1.5}])
def test_settings_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        ComcatSearchSettings(**bad)


def test_masked_attention_writes_back_into_a_dense_attention_that_computes_the_same():
    model = _vit()
    name, attn = "blocks.0.attn", model.blocks[0].attn
    units = {u.name: u for u in _units({}, {name: attn})}
    units[f"{name}.qk"].settle(1)
    units[f"{name}.vo"].settle(0)
    masked = _masked_attention(name, attn, units)
    x = torch.randn(2, 17, 48)
    expected = masked(x).detach()
    _write_back_attention(name, attn, masked, units)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)
    # and its products now have the searched ranks exactly
    products = comcat.head_products(attn)
    qk_rank, vo_rank = units[f"{name}.qk"].rank, units[f"{name}.vo"].rank
    for h in range(3):
        left, right = products[f"qk.{h}"]
        assert int(torch.linalg.matrix_rank(left @ right.T)) == qk_rank
        left, right = products[f"vo.{h}"]
        assert int(torch.linalg.matrix_rank(left @ right.T)) == vo_rank


@pytest.mark.parametrize("arch", ["swin", "deit"])
def test_what_the_search_writes_back_factorizes_exactly_at_the_searched_ranks(arch):
    """Swin's relative position table and windows, DeiT's distillation token: after the search, every attention module
    is reproduced by COMCAT's factorization at the searched ranks, and every linear has at most its searched rank."""
    model = make(arch)
    x = torch.randn(32, 3, 32, 32)
    adapter = get_adapter(model)
    modules = adapter.attention_modules(model)
    layers = {n: m for n, m in adapter.compressible_layers(model).items()
              if not any(n.startswith(f"{a}.") for a in modules)}
    budget = sum(m.weight.numel() for m in layers.values()) // 2
    found = comcat_search(model, [x], layers, modules, budget,
                          ComcatSearchSettings(search_rounds=2, search_steps=2, train_steps=2, search_batch_size=16),
                          progress=False)
    for name, layer in layers.items():
        # float32 rounding leaves singular values ~1e-7 of the largest beyond the rank
        assert int(torch.linalg.matrix_rank(layer.weight.detach().double(), rtol=1e-5)) <= found.ranks[name]
    for name, attn in modules.items():
        factorized = comcat.factorize_attention(name, attn, comcat.head_decompositions({name: attn}), found.ranks)
        tokens = torch.randn(2, 16 if arch == "swin" else 18, attn.qkv.in_features)
        torch.testing.assert_close(factorized(tokens), attn(tokens), atol=1e-4, rtol=1e-4)


def test_search_meets_the_target_with_ranks_among_the_candidates():
    model = _vit()
    x = torch.randn(48, 3, 32, 32)
    report = compress(model, [x[:16], x[16:32], x[32:]], _config())
    assert report.params_after <= report.target_params
    assert report.config["allocation"] == "comcat_search"
    linear = set(candidate_ranks(48, PUBLIC_LINEAR_CANDIDATES))
    per_head = {max(1, r // 3) for r in candidate_ranks(48, PUBLIC_ATTENTION_CANDIDATES)}
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert {r for n, r in ranks.items() if ".mlp." in n} <= linear
    assert {r for n, r in ranks.items() if ".attn." in n} <= per_head
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("important", [0, 1])
def test_the_layer_that_feeds_the_logits_keeps_the_larger_rank(important):
    model = _vit(seed=3)
    with torch.no_grad():  # one block's MLP dominates the residual stream the (sharpened) head reads
        model.blocks[important].mlp.fc2.weight.mul_(30.0)
        model.blocks[1 - important].mlp.fc2.weight.mul_(0.01)
        model.head.weight.mul_(20.0)
    images = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    layers = {n: model.get_submodule(n) for n in ("blocks.0.mlp.fc2", "blocks.1.mlp.fc2")}
    budget = 2 * 16 * (48 + 192)  # rank 16 each on average: the search must choose
    found = comcat_search(model, images, layers, {}, budget,
                          ComcatSearchSettings(search_rounds=3, search_steps=25, train_steps=1, search_batch_size=16,
                                               seed=0), progress=False)
    assert found.ranks[f"blocks.{important}.mlp.fc2"] > found.ranks[f"blocks.{1 - important}.mlp.fc2"]


def test_the_search_gives_back_the_callers_frozen_parameters_and_mode():
    model = _vit()
    model.patch_embed.requires_grad_(False)
    compress(model, [torch.randn(48, 3, 32, 32)], _config())
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert model.head.weight.requires_grad and not model.training


def test_search_is_deterministic_under_a_seed():
    x = torch.randn(48, 3, 32, 32)
    outputs, ranks = [], []
    for _ in range(2):
        model = _vit()
        report = compress(model, [x], _config(seed=5))
        ranks.append({layer.name: layer.rank for layer in report.layers})
        outputs.append(model(x).detach())
    assert ranks[0] == ranks[1]
    torch.testing.assert_close(outputs[0], outputs[1])


def test_unlabelled_features_search_against_the_dense_output():
    model = _vit()
    model.reset_classifier(0)  # a backbone: pooled features, no classes
    before = copy.deepcopy(model)
    x = torch.randn(48, 3, 32, 32)
    report = compress(model, [x], _config(), likelihood="gaussian")
    assert report.params_after <= report.target_params
    cosine = torch.nn.functional.cosine_similarity(model(x), before(x)).mean()
    assert cosine > 0.5  # a different model would be near 0


def test_plan_refuses_the_training_search():
    with pytest.raises(ValueError, match="trains the model"):
        plan_compression(_vit(), [torch.randn(8, 3, 32, 32)], _config())
