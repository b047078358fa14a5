"""Covariance estimates and square roots the peer methods use (docs/peers.md): Ledoit-Wolf shrinkage (FLAR-SVD),
shrinkage toward a scaled identity (KFAC-SVD), the Cholesky factor with an eigenvalue shift on failure (SVD-LLM and
KFAC-SVD) and per-token gradient-norm clipping (KFAC-SVD).

Every function is pure and works from running sums, so calibration never stores activations. Conventions: a Gram
``S`` is (p, p), symmetric positive semi-definite, float64.
"""

from __future__ import annotations

import torch

from lowrank_vit.core.decompose import Whitening


def ledoit_wolf_intensity(gram_sum: torch.Tensor, fourth_sum: float, count: int) -> float:
    """The Ledoit-Wolf (2004) shrinkage intensity of the second-moment matrix ``S = gram_sum / n`` of n samples
    x_1..x_n (not centred: FLAR-SVD whitens raw Grams) toward ``mu I``, mu = tr(S) / p, from two running sums:
    ``gram_sum = sum_k x_k x_k^T`` and ``fourth_sum = sum_k ||x_k||^4``.

    With d^2 = ||S - mu I||_F^2 / p (how far S is from the target) and b^2 = (1 / (n p)) (fourth_sum / n - ||S||_F^2)
    (the estimated variance of S's entries: sum_k ||x_k x_k^T - S||_F^2 = fourth_sum - n ||S||_F^2, over n^2), the
    intensity is min(b^2, d^2) / d^2 in [0, 1]; 0 when S is already a multiple of the identity."""
    if count < 1:
        raise ValueError(f"Ledoit-Wolf shrinkage needs at least one sample, got {count}")
    S = gram_sum.double() / count
    p = S.shape[0]
    mu = float(torch.diagonal(S).sum()) / p
    frob = float(S.pow(2).sum())
    distance = (frob - 2.0 * mu * float(torch.diagonal(S).sum()) + p * mu * mu) / p
    spread = (fourth_sum / count - frob) / (p * count)
    if distance <= 0.0:
        return 0.0
    return max(0.0, min(spread, distance)) / distance


def shrink_to_identity(gram: torch.Tensor, intensity: float) -> torch.Tensor:
    """``(1 - a) S + a mu I`` with mu = tr(S) / p, the scaled identity that keeps the trace (a = ``intensity``)."""
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"a shrinkage intensity lies in [0, 1], got {intensity!r}")
    S = gram.double()
    mu = float(torch.diagonal(S).mean())
    return (1.0 - intensity) * S + intensity * mu * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)


def cholesky_whitening(gram: torch.Tensor, *, shift: float = 1e-6, attempts: int = 4, what: str = "the Gram matrix",
                       alternative: str = "") -> Whitening:
    """The Cholesky :class:`Whitening` ``A = L^T`` of ``S = L L^T`` as SVD-LLM and KFAC-SVD compute it: no damping;
    where the factorization fails, the diagonal is raised by ``-lambda_min + shift * mean(diag S)`` and it is tried
    again, ``attempts`` times in all (the shifts add up). The published code adds an absolute 1e-6; relative to
    the mean diagonal it means the same for every scale of activations. A matrix that still fails is an error
    naming ``alternative``, never a silent change of method."""
    S = gram.double()
    if not torch.isfinite(S).all():
        raise ValueError(f"{what} contains NaN or inf")
    scale = float(torch.diagonal(S).mean())
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    if scale <= 0.0:
        raise ValueError(f"{what} is zero (the layer never saw a non-zero input): it has no Cholesky factor"
                         + (f"; {alternative}" if alternative else ""))
    for _ in range(attempts):
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) == 0 and torch.isfinite(L).all() and float(torch.diagonal(L).min()) > 0:
            return Whitening(S, L.T.contiguous(), triangular=True)
        lowest = float(torch.linalg.eigvalsh(S)[0])
        S = S + (max(-lowest, 0.0) + shift * scale) * eye
    raise ValueError(f"{what} is not positive definite ({attempts} Cholesky attempts, each after an eigenvalue "
                     f"shift but the first)"
                     + (f"; {alternative}" if alternative else ""))


def clipped_token_scale(grad: torch.Tensor, low: float, high: float, floor: float = 1e-10) -> torch.Tensor:
    """Per-token factors that clip gradient norms as KFAC-SVD does: in every row of the leading dimension (an image;
    a window for Swin's attention), m is the mean norm of its tokens' gradients (those above ``floor``), and each
    token's gradient is rescaled to norm ``clamp(||g_t||, low m, high m)``: outliers pulled in, faint tokens raised.
    Tokens at or below ``floor`` keep their gradient. Returns the factors, shaped (rows, tokens, 1) in ``grad``'s
    layout flattened to three dimensions."""
    g = grad.detach().reshape(grad.shape[0], -1, grad.shape[-1]).float()
    norms = torch.linalg.vector_norm(g, dim=-1)
    live = norms > floor
    mean = (norms * live).sum(1, keepdim=True) / live.sum(1, keepdim=True).clamp_min(1)
    target = torch.minimum(torch.maximum(norms, low * mean), high * mean)
    scale = torch.where(live, target / norms.clamp_min(floor), torch.ones_like(norms))
    return scale.unsqueeze(-1)
