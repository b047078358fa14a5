"""Tests of lowrank_vit/core/loss_aware_svd.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit.core.calibration import output_error
from lowrank_vit.core.decompose import two_sided_svd, whitening
from lowrank_vit.core.loss_aware import collect_loss_statistics
from lowrank_vit.core.loss_aware_svd import loss_aware_singular_values, loss_aware_svd
from tests.helpers import make_images, make_tiny_vit, random_spd


def test_loss_units_do_not_depend_on_the_report_scaling():
    """loss_aware_svd undoes the rescaling of the stored gram: its energies are those of the raw H."""
    from lowrank_vit.core.calibration import LayerStats

    W = torch.randn(10, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    H, G = random_spd(10, 6), random_spd(6, 7)
    stats = LayerStats(gram=H / 37.0, num_images=3, grad_gram=G, loss_scale=37.0)
    d, _ = loss_aware_svd(W, stats, 0.0)
    raw = two_sided_svd(W, whitening(H, 0.0), whitening(G, 0.0))
    torch.testing.assert_close(d.singular_values, raw.singular_values, rtol=1e-9, atol=1e-12)
    U, V = d.factors(3)
    Ur, Vr = raw.factors(3)
    torch.testing.assert_close(U @ V.T, Ur @ Vr.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(loss_aware_singular_values(W, stats, 0.0), raw.singular_values, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"])
def test_narrow_side_statistics_give_the_same_decomposition(name):
    """gram_space="auto" keeps W G W^T (qkv, fc1) or W^T H W (fc2) instead of the wide Gram: the same singular
    values, the same W_hat at every rank, and the same pooled output error (a float64 model: exact to rounding)."""
    model = make_tiny_vit(seed=5).double()
    layer = model.get_submodule(name)
    images = make_images(16, seed=6).double()
    full = collect_loss_statistics(model, {name: layer}, [images], 16, progress=False)[name]
    narrow = collect_loss_statistics(model, {name: layer}, [images], 16, progress=False, gram_space="auto")[name]
    if layer.in_features != layer.out_features:
        assert (narrow.grad_range_gram is None) == (layer.in_features > layer.out_features)
        assert (narrow.output_gram is None) == (layer.in_features < layer.out_features)
    W = layer.weight.detach().double().T
    a, _ = loss_aware_svd(W, full, 1e-3)
    b, _ = loss_aware_svd(W, narrow, 1e-3)
    top = min(W.shape) // 2
    torch.testing.assert_close(b.singular_values[:top], a.singular_values[:top], rtol=1e-9, atol=0.0)
    torch.testing.assert_close(loss_aware_singular_values(W, narrow, 1e-3)[:top], a.singular_values[:top],
                               rtol=1e-9, atol=0.0)
    for rank in (1, 3, top):
        Ua, Va = a.factors(rank)
        Ub, Vb = b.factors(rank)
        torch.testing.assert_close(Ub @ Vb.T, Ua @ Va.T, rtol=1e-8, atol=1e-10)
        delta = W - Ua @ Va.T
        assert output_error(narrow, delta) == pytest.approx(output_error(full, delta), rel=1e-8)


@pytest.mark.parametrize("gram_space", ["input", "auto"])
@pytest.mark.parametrize("name", ["blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"])
def test_damped_decomposition_is_the_two_sided_svd_of_both_damped_grams(name, gram_space):
    """Whatever side it is computed from, the decomposition is the SVD of A W B^T with *both* Grams damped by the
    same fraction of their own mean diagonal (H + d tr(H)/in I, G + d tr(G)/out I). A damping large enough to matter
    (0.1) on layers that are not square: the narrow-side shortcut damps the side it never forms through W W^T or
    W^T W, and must use that side's own dimension."""
    model = make_tiny_vit(seed=5).double()
    layer = model.get_submodule(name)
    images = make_images(16, seed=6).double()
    full = collect_loss_statistics(model, {name: layer}, [images], 16, progress=False)[name]
    stats = full if gram_space == "input" else collect_loss_statistics(model, {name: layer}, [images], 16,
                                                                       progress=False, gram_space="auto")[name]
    W = layer.weight.detach().double().T
    damping = 0.1
    reference = two_sided_svd(W, whitening(full.loss_scale * full.gram, damping), whitening(full.grad_gram, damping))
    got, _ = loss_aware_svd(W, stats, damping)
    top = min(W.shape)
    torch.testing.assert_close(got.singular_values[:top], reference.singular_values[:top], rtol=1e-8, atol=0.0)
    for rank in (1, top // 2):
        U, V = got.factors(rank)
        Ur, Vr = reference.factors(rank)
        torch.testing.assert_close(U @ V.T, Ur @ Vr.T, rtol=1e-7, atol=1e-9)
