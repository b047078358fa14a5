"""Tests of lowrank_vit/core/scaling.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit.core.decompose import plain_svd
from lowrank_vit.core.scaling import MeanAbsRecorder, asvd_scales, fisher_scales, row_scaled_svd
from lowrank_vit.nn.adapters import get_adapter
from tests.helpers import make, make_images


@pytest.mark.usefixtures("one_thread_module")
def test_asvd_alpha_zero_is_plain_svd_factors():
    torch.manual_seed(0)
    weight = torch.randn(12, 7, dtype=torch.float64)
    mean_abs = torch.rand(12, dtype=torch.float64) + 0.1
    scaled, plain = row_scaled_svd(weight, asvd_scales(mean_abs, 0.0)), plain_svd(weight)
    for a, b in zip(scaled.factors(4), plain.factors(4), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(scaled.singular_values, plain.singular_values)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0])
def test_asvd_scales_are_the_activation_magnitudes_to_the_power_alpha(alpha):
    """S_jj proportional to (mean_i |x_ij|)^alpha, normalized to mean 1 (alpha = 1 included: it is not plain SVD)."""
    mean_abs = torch.tensor([0.2, 1.0, 3.0, 0.7, 5.0], dtype=torch.float64)
    s = asvd_scales(mean_abs, alpha)
    expected = mean_abs.pow(alpha)
    torch.testing.assert_close(s, expected / expected.mean(), rtol=1e-12, atol=0)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("scales", [lambda v: asvd_scales(v, 0.5), fisher_scales])
def test_a_dead_row_gets_a_small_positive_scale_and_finite_factors(scales):
    """An input channel that is never active (ASVD: mean |x| = 0) or whose weights get no gradient (FWSVD: I_j = 0)
    is floored to a small positive scale, not zero: the factors divide by the scales and must stay finite."""
    importance = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    s = scales(importance)
    assert bool((s > 0).all()) and float(s[0]) < 0.01 * float(s[1:].min())
    U, V = row_scaled_svd(torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                          s).factors(2)
    assert bool(torch.isfinite(U).all() and torch.isfinite(V).all())


@pytest.mark.usefixtures("one_thread_module")
def test_asvd_minimizes_the_scaled_error():
    """W_hat = S^-1 SVD_r(S W) is the best rank-r approximation in ||S (W - W_hat)||_F (Eckart-Young), and its tail
    energy is that error."""
    torch.manual_seed(1)
    weight = torch.randn(10, 8, dtype=torch.float64)
    scales = asvd_scales(torch.rand(10, dtype=torch.float64) * 5, 0.5)
    decomposition = row_scaled_svd(weight, scales)
    U, V = decomposition.factors(3)
    error = (scales[:, None] * (weight - U @ V.T)).pow(2).sum()
    total = (scales[:, None] * weight).pow(2).sum()
    assert torch.isclose(error / total, torch.tensor(decomposition.energy_loss(3), dtype=torch.float64))
    Up, Vp = plain_svd(weight).factors(3)
    assert error <= (scales[:, None] * (weight - Up @ Vp.T)).pow(2).sum()


@pytest.mark.usefixtures("one_thread_module")
def test_mean_abs_recorder_measures_inputs_and_removes_hooks():
    model = make("vit")
    layers = get_adapter(model).compressible_layers(model)
    seen = {}
    layer = layers["blocks.1.mlp.fc2"]

    def keep_input(module, inputs, output):
        seen["x"] = inputs[0].detach().clone()

    handle = layer.register_forward_hook(keep_input)
    method_images = make_images(3, channels=3, size=32)
    with MeanAbsRecorder(layers) as recorder, torch.no_grad():
        model(method_images)
    handle.remove()
    expected = seen["x"].reshape(-1, layer.in_features).abs().double().mean(dim=0)
    assert torch.allclose(recorder.mean_abs()["blocks.1.mlp.fc2"], expected)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.usefixtures("one_thread_module")
def test_fwsvd_uniform_fisher_is_plain_svd_factors():
    torch.manual_seed(0)
    weight = torch.randn(9, 14, dtype=torch.float64)
    scaled, plain = row_scaled_svd(weight, fisher_scales(torch.full((9,), 0.37))), plain_svd(weight)
    for a, b in zip(scaled.factors(5), plain.factors(5), strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("one_thread_module")
def test_fwsvd_weighs_each_row_by_the_square_root_of_its_fisher_information():
    """FWSVD minimizes sum_j I_j ||row_j(W - W_hat)||^2, i.e. ||diag(sqrt(I)) (W - W_hat)||_F^2: the row scales are
    sqrt(I_j) up to one factor, and the factorization at rank r minimizes that weighted error (no nearby rank-r
    weight does better)."""
    g = torch.Generator().manual_seed(3)
    info = torch.tensor([4.0, 1.0, 0.25, 9.0, 1.0, 16.0], dtype=torch.float64)
    scales = fisher_scales(info)
    torch.testing.assert_close(scales / scales[1], info.sqrt())
    weight = torch.randn(6, 8, generator=g, dtype=torch.float64)
    U, V = row_scaled_svd(weight, scales).factors(2)

    def weighted(w_hat: torch.Tensor) -> float:
        return float((info[:, None] * (weight - w_hat).pow(2)).sum())

    best = weighted(U @ V.T)
    for _ in range(20):
        a, b = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
        assert weighted((U + 0.05 * a) @ (V + 0.05 * b).T) > best  # another rank-2 weight
