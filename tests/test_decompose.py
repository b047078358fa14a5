"""Activation-aware SVD (Section 3.1): exactness at full rank, and the eq. (5) ordering on held-out samples."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit.core.decompose import mean_input_svd, plain_svd, weighted_error, whitened_svd, whitening


def synthetic_layer(k: int = 48, m: int = 40, tokens: int = 12, n: int = 400, seed: int = 0):
    """Inputs with a strongly anisotropic, shared covariance and a per-image offset (as in ViT tokens), and W."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g, dtype=torch.float64) * torch.logspace(0, -2.5, k, dtype=torch.float64)
    images = torch.randn(n, tokens, k, generator=g, dtype=torch.float64) @ mixing.T
    images = images + torch.randn(n, 1, k, generator=g, dtype=torch.float64) @ mixing.T
    W = torch.randn(k, m, generator=g, dtype=torch.float64) / k**0.5
    return images, W


def gram_of(images: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    weights = 1.0 / (images @ W).pow(2).sum(dim=(1, 2))
    return torch.einsum("i,itk,itl->kl", weights, images, images)


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
