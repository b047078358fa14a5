"""Tests of lowrank_vit/core/covariance.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_vit.core.covariance import (
    cholesky_whitening,
    clipped_token_scale,
    ledoit_wolf_intensity,
    shrink_to_identity,
)
from tests.helpers import random_spd_from


@pytest.mark.parametrize("n, p, seed", [(50, 5, 0), (200, 12, 1), (8, 20, 2), (3, 7, 3), (30, 30, 4), (1000, 3, 5)])
def test_ledoit_wolf_intensity_matches_sklearn(n, p, seed):
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + rng.standard_normal(p)  # correlated, not centred
    gram_sum = torch.from_numpy(X.T @ X)
    fourth_sum = float((np.linalg.norm(X, axis=1) ** 4).sum())
    expected = ledoit_wolf_shrinkage(X, assume_centered=True)
    assert ledoit_wolf_intensity(gram_sum, fourth_sum, n) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_ledoit_wolf_intensity_of_a_scaled_identity_is_zero_and_needs_a_sample():
    # S = c I is already the target (sklearn returns 0 there too); no samples at all is an error
    assert ledoit_wolf_intensity(4.0 * torch.eye(3, dtype=torch.float64), 3 * 4.0 ** 2, 4) == 0.0
    with pytest.raises(ValueError, match="at least one sample"):
        ledoit_wolf_intensity(torch.eye(3), 1.0, 0)


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_shrink_to_identity_is_the_written_out_formula(a):
    S = random_spd_from(6, torch.Generator().manual_seed(1))
    p = S.shape[0]
    expected = (1 - a) * S + a * float(torch.trace(S)) / p * torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(shrink_to_identity(S, a), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a", [-0.1, 1.5, float("nan")])
def test_shrink_to_identity_rejects_intensities_outside_0_1(a):
    with pytest.raises(ValueError, match="intensity"):
        shrink_to_identity(torch.eye(3), a)


@pytest.mark.parametrize("seed", range(3))
def test_cholesky_whitening_of_an_spd_gram_is_its_exact_cholesky_factor(seed):
    S = random_spd_from(7, torch.Generator().manual_seed(seed))
    white = cholesky_whitening(S)
    assert white.triangular
    torch.testing.assert_close(white.gram, S)  # nothing shifted
    torch.testing.assert_close(white.root, torch.from_numpy(np.linalg.cholesky(S.numpy()).T))
    torch.testing.assert_close(white.root.T @ white.root, S, rtol=1e-10, atol=1e-12)


def test_cholesky_whitening_shifts_a_slightly_indefinite_gram():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 3, generator=g, dtype=torch.float64)
    S = B @ B.T - 1e-9 * torch.eye(6, dtype=torch.float64)  # rank 3, then just below PSD
    assert float(torch.linalg.eigvalsh(S)[0]) < 0
    white = cholesky_whitening(S)
    shift = white.gram - S  # a positive multiple of the identity, about |lambda_min| + a few 1e-6 of the mean diagonal
    c = float(shift[0, 0])
    torch.testing.assert_close(shift, c * torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    lowest = -float(torch.linalg.eigvalsh(S)[0])
    assert lowest < c <= lowest + 4 * 1e-6 * float(torch.diagonal(S).mean()) + 1e-12
    assert float(torch.linalg.eigvalsh(white.gram)[0]) > 0
    torch.testing.assert_close(white.root.T @ white.root, white.gram, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(white.root, torch.triu(white.root))


def test_cholesky_whitening_rejects_zero_nan_and_indefinite_grams():
    with pytest.raises(ValueError, match="is zero"):
        cholesky_whitening(torch.zeros(4, 4))
    bad = torch.eye(4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cholesky_whitening(bad)
    indefinite = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive definite.*; use X"):
        cholesky_whitening(indefinite, attempts=1, alternative="use X")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("low, high", [(0.1, 10.0), (0.5, 2.0), (1.0, 1.0)])
def test_clipped_token_scale_matches_a_loop_over_rows_and_tokens(seed, low, high):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(3, 2, 4, 5, generator=g) * 10.0 ** (4 * torch.rand(3, 2, 4, 1, generator=g) - 2)
    grad[0, 0, 1] = 0.0  # dead tokens keep their gradient and do not count in the mean
    grad[1, 1, 3] = 0.0
    grad[2] = 0.0  # a row with no live token at all
    scale = clipped_token_scale(grad, low, high)
    assert scale.shape == (3, 8, 1)
    flat = grad.reshape(3, 8, 5).double()
    for i in range(3):
        norms = [float(flat[i, t].norm()) for t in range(8)]
        live = [v for v in norms if v > 1e-10]
        m = sum(live) / len(live) if live else 0.0
        for t, v in enumerate(norms):
            expected = min(max(v, low * m), high * m) / v if v > 1e-10 else 1.0
            assert float(scale[i, t, 0]) == pytest.approx(expected, rel=1e-5)
