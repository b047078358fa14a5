"""Tests of lowrank_vit/core/decompose.py."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_vit import (
    FactorizedLinear,
    compress,
)
from lowrank_vit.core.calibration import (
    LayerStats,
)
from lowrank_vit.core.decompose import (
    energy_tail_curve,
    mean_input_svd,
    output_whitened_singular_values,
    plain_svd,
    two_sided_svd,
    weighted_error,
    whitened_singular_values,
    whitened_svd,
    whitening,
)
from tests.helpers import (
    assert_all_finite,
    cfg,
    gram_of,
    make_images,
    make_tiny_vit,
    pipeline_cfg,
    random_gram,
    random_spd,
    small_vit,
    synthetic_layer,
)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("decomposition", ["whitened", "mean", "plain"])
@pytest.mark.parametrize("compensation", ["none", "lowrank", "diagonal", "sparse", "structured"])
def test_single_constant_image(decomposition, compensation):
    model = make_tiny_vit()
    tokens = model.patch_embed.num_patches + 1
    assert model.embed_dim > tokens, "precondition: fewer tokens than features, so every Gram matrix is singular"
    image = torch.full((1, 1, 28, 28), 0.7)  # every patch identical
    report = compress(model, [image], cfg(decomposition=decomposition, compensation=compensation, reduction=0.4))
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert_all_finite(model, make_images(4))
    for layer in report.layers:
        for value in (layer.energy_loss, layer.output_error_lowrank, layer.output_error):
            assert math.isfinite(value), f"{layer.name}: non-finite report value"


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("damping", [1e-4, 0.0])
def test_constant_zero_image_without_damping(damping):
    model = make_tiny_vit()
    compress(model, [torch.zeros(1, 1, 28, 28)], cfg(damping=damping, reduction=0.4))
    assert_all_finite(model, make_images(4))


@pytest.mark.usefixtures("one_thread_module")
def test_entirely_dead_layer_input(calib_batches):
    # Every input feature of blocks.0.attn.qkv is zero: its Gram matrix is exactly 0 (and so is its output energy).
    model = make_tiny_vit()
    with torch.no_grad():
        model.blocks[0].norm1.weight.zero_()
        model.blocks[0].norm1.bias.zero_()
    compress(model, calib_batches, cfg(reduction=0.4))
    assert_all_finite(model, make_images(8))


def test_output_whitened_singular_values():
    k, m = 40, 12
    H = random_gram(k, 30, seed=8)
    W = torch.randn(k, m, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = whitened_singular_values(W, H, 1e-3)
    got = output_whitened_singular_values(W, W.T @ H @ W, float(H.trace()), 1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # lazily built input-side matrix: the same spectrum again
    stats = LayerStats(gram=None, num_images=1, output_gram=W.T @ H @ W, input_trace=float(H.trace()), range_weight=W)
    torch.testing.assert_close(whitened_singular_values(W, stats.gram, 1e-3), expected, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="needs output_gram"):
        _ = LayerStats(gram=None, num_images=1).gram


def test_factors_from_a_start_index():
    d = plain_svd(synthetic_layer()[1])
    U, V = d.factors(9)
    U_head, V_head = d.factors(4)
    U_tail, V_tail = d.factors(5, start=4)
    assert torch.allclose(U_head @ V_head.T + U_tail @ V_tail.T, U @ V.T, atol=1e-10)
    with pytest.raises(ValueError, match="start"):
        d.factors(2, start=-1)


def eq5(images: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Eq. (5) evaluated directly, sample by sample (no Gram shortcut)."""
    num = (images @ (W_hat - W)).pow(2).sum(dim=(1, 2))
    den = (images @ W).pow(2).sum(dim=(1, 2))
    return float((num / den).mean())


def reconstruct(decomposition, rank):
    U, V = decomposition.factors(rank)
    return U @ V.T


def test_full_rank_whitened_reproduces_outputs():
    images, W = synthetic_layer()
    d = whitened_svd(W, whitening(gram_of(images, W), damping=1e-4))
    W_hat = reconstruct(d, min(W.shape))
    assert torch.allclose(images @ W_hat, images @ W, atol=1e-8)
    assert d.energy_loss(min(W.shape)) == pytest.approx(0.0, abs=1e-12)


def test_whitened_energy_loss_equals_eq5_on_calibration_set():
    """The spectrum of H^{1/2} W measures exactly the calibration objective: what Algorithm 1 needs."""
    images, W = synthetic_layer()
    H = gram_of(images, W)
    d = whitened_svd(W, whitening(H, damping=0.0))
    for rank in (2, 8, 20):
        W_hat = reconstruct(d, rank)
        assert eq5(images, W, W_hat) == pytest.approx(d.energy_loss(rank), rel=1e-6)
        assert weighted_error(W_hat - W, H, images.shape[0]) == pytest.approx(d.energy_loss(rank), rel=1e-6)


@pytest.mark.parametrize("rank", [4, 10, 20])
def test_whitened_beats_plain_and_mean_on_held_out_samples(rank):
    images, W = synthetic_layer(n=600)
    train, held_out = images[:300], images[300:]
    white = whitening(gram_of(train, W), damping=1e-4)
    errors = {
        "whitened": eq5(held_out, W, reconstruct(whitened_svd(W, white), rank)),
        "plain": eq5(held_out, W, reconstruct(plain_svd(W), rank)),
        "mean": eq5(held_out, W, reconstruct(mean_input_svd(W, train.mean(dim=0)), rank)),
    }
    assert errors["whitened"] < errors["plain"], errors
    assert errors["whitened"] < errors["mean"], errors


def test_mean_recipe_is_confined_to_the_token_subspace():
    """The literal recipe's trap: U = pinv(X_rep) U* sqrt(S) lies in X_rep's row space; rank above #tokens gains
    nothing."""
    images, W = synthetic_layer(k=48, m=40, tokens=6)
    d = mean_input_svd(W, images.mean(dim=0))
    assert d.max_rank <= 6
    assert torch.allclose(reconstruct(d, 6), reconstruct(d, 30))


def test_energy_losses_curve_matches_pointwise():
    images, W = synthetic_layer()
    d = plain_svd(W)
    curve = d.energy_losses()
    assert curve[0] == pytest.approx(1.0)
    assert curve[-1] == pytest.approx(0.0, abs=1e-12)
    for r in (0, 5, 17, 40):
        assert float(curve[r]) == pytest.approx(d.energy_loss(r), abs=1e-12)
    assert torch.all(curve[:-1] >= curve[1:])


@pytest.mark.parametrize("damping", [1e-4, 0.0])
def test_rank_deficient_gram_gives_finite_whitening(damping):
    x = torch.randn(5, 32, dtype=torch.float64)  # 5 tokens, 32 features: rank 5
    x[:, 3] = 0.0  # a dead feature
    white = whitening(x.T @ x, damping=damping)
    assert white.triangular == (damping > 0)  # without damping Cholesky fails and the eigen root takes over
    W = torch.randn(32, 16, dtype=torch.float64)
    d = whitened_svd(W, white)
    for rank in (1, 5, 16):
        U, V = d.factors(rank)
        assert torch.isfinite(U).all() and torch.isfinite(V).all()
    # 5 directions seen, 5 kept: exact on them without damping; damping trades a little of it for unseen directions.
    rel = float((x @ (reconstruct(d, 5) - W)).norm() / (x @ W).norm())
    assert rel < (1e-6 if damping == 0 else 1e-2)
    zero = whitening(torch.zeros(8, 8, dtype=torch.float64), damping=1e-4)
    assert torch.equal(zero.apply(torch.eye(8, dtype=torch.float64)), torch.eye(8, dtype=torch.float64))


def test_whitening_root_squares_to_damped_gram():
    x = torch.randn(50, 16, dtype=torch.float64)
    white = whitening(x.T @ x, damping=1e-3)
    assert torch.allclose(white.root.T @ white.root, white.gram, atol=1e-9)
    assert torch.allclose(white.solve(white.apply(torch.eye(16, dtype=torch.float64))),
                          torch.eye(16, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("damping", [1e-4, 0.0])
def test_output_whitened_svd_is_the_whitened_svd(damping):
    """From M = W^T H W and tr(H) alone (a layer with more inputs than outputs, as fc2): the same spectrum and the
    same W_hat at every rank as the whitened SVD of the full H, and W_hat = W R_r R_r^T lies in the range of W."""
    from lowrank_vit.core.decompose import output_whitened_svd

    images, W = synthetic_layer(k=64, m=24)
    H = gram_of(images, W)
    exact = whitened_svd(W, whitening(H, damping))
    fast = output_whitened_svd(W, W.T @ H @ W, float(H.trace()), damping)
    assert torch.allclose(fast.singular_values, exact.singular_values, rtol=1e-8, atol=1e-12)
    for rank in (1, 5, 12, 24):
        W_hat = reconstruct(fast, rank)
        assert torch.allclose(W_hat, reconstruct(exact, rank), atol=1e-8), rank
        assert eq5(images, W, W_hat) == pytest.approx(eq5(images, W, reconstruct(exact, rank)), rel=1e-7, abs=1e-12)
    coefficients = torch.linalg.lstsq(W, reconstruct(fast, 7)).solution
    assert torch.allclose(W @ coefficients, reconstruct(fast, 7), atol=1e-10)


def test_output_whitened_svd_of_a_layer_that_saw_nothing_is_plain_svd():
    from lowrank_vit.core.decompose import output_whitened_svd

    _, W = synthetic_layer(k=32, m=16)
    fast = output_whitened_svd(W, torch.zeros(16, 16, dtype=torch.float64), 0.0, 1e-4)
    assert torch.allclose(reconstruct(fast, 6), reconstruct(plain_svd(W), 6), atol=1e-10)
    with pytest.raises(ValueError, match="NaN or inf"):
        output_whitened_svd(W, torch.full((16, 16), float("nan"), dtype=torch.float64), 1.0, 1e-4)


def test_two_sided_energy_is_the_kronecker_quadratic_and_optimal():
    """The tail energy at rank r equals tr(dW^T H dW G) of the truncation, and beats plain SVD at the same rank."""
    W = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H, G = random_spd(12, 1), random_spd(9, 2)
    d = two_sided_svd(W, whitening(H, 0.0), whitening(G, 0.0))
    tails = energy_tail_curve(d.singular_values)
    for rank in (1, 4, 8):
        U, V = d.factors(rank)
        delta = W - U @ V.T
        cost = float(torch.trace(delta.T @ H @ delta @ G))
        assert cost == pytest.approx(float(tails[rank]), rel=1e-9)
        Up, Vp = plain_svd(W).factors(rank)
        dp = W - Up @ Vp.T
        assert cost < float(torch.trace(dp.T @ H @ dp @ G))


def test_whitened_has_lower_output_error_than_plain(small_images):
    errors = {}
    for decomposition in ("plain", "whitened"):
        model = small_vit()
        report = compress(
            model,
            [small_images],
            pipeline_cfg(reduction=0.5, decomposition=decomposition, allocation="uniform", compensation="none"),
        )
        errors[decomposition] = sum(lr.output_error for lr in report.layers)
    assert errors["whitened"] < errors["plain"]
