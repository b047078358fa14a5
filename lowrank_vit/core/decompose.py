"""Low-rank bases of one layer: plain SVD, the paper's literal mean-input recipe (eqs. 6-7), and the exact
whitened minimizer of eq. (5).

Each function returns a :class:`Decomposition`, computed once per layer; any rank is then a truncation of it, and
its normalized energy loss is read off the spectrum (what Algorithm 1's ComputeEnergyLoss needs). All linear algebra
runs in float64. W is (k, m) = (in, out) as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decomposition:
    """``W_hat(r) = left[:, :r] diag(s[:r]) right[:, :r]^T``, for every rank r at once."""

    left: torch.Tensor
    """(k, p) float64."""
    right: torch.Tensor
    """(m, p) float64."""
    singular_values: torch.Tensor
    """(p,) float64, non-increasing; their squares are the energies of the objective the basis minimizes."""

    @property
    def max_rank(self) -> int:
        return self.singular_values.numel()

    def energy_loss(self, rank: int) -> float:
        """Normalized energy lost when keeping ``rank`` singular values: sum_{i>r} s_i^2 / sum_i s_i^2."""
        energy = self.singular_values.pow(2)
        total = float(energy.sum())
        if total <= 0.0:
            return 0.0
        return float(energy[rank:].sum()) / total

    def energy_losses(self) -> torch.Tensor:
        """Energy loss for every rank 0..p (index = rank kept)."""
        return energy_loss_curve(self.singular_values)

    def energy_tails(self) -> torch.Tensor:
        """Absolute energy lost for every rank 0..p: sum_{i>r} s_i^2 (what the marginal allocation compares)."""
        return energy_tail_curve(self.singular_values)

    def factors(self, rank: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """U (k, rank) and V (m, rank) from singular triplets ``start .. start + rank - 1`` (the leading ones by
        default), with the singular values split evenly (sqrt on each side, eq. 7).

        Triplets beyond the basis size (possible for "mean", whose basis has at most as many vectors as tokens)
        are zero columns.
        """
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        stop = min(start + rank, self.max_rank)
        keep = max(stop - start, 0)
        root = self.singular_values[start:stop].clamp_min(0).sqrt()
        U = self.left[:, start:stop] * root
        V = self.right[:, start:stop] * root
        if keep < rank:
            U = torch.cat([U, U.new_zeros(U.shape[0], rank - keep)], dim=1)
            V = torch.cat([V, V.new_zeros(V.shape[0], rank - keep)], dim=1)
        return U, V


@dataclass
class Whitening:
    """A square root of the damped Gram matrix, ``H_d = H + damping * mean(diag H) * I = A^T A``.

    Any A with A^T A = H_d turns eq. (5) into a plain Frobenius problem, ||A (W_hat - W)||_F^2 = tr(dW^T H_d dW), so
    the Cholesky factor (A = L^T, fast and stable) is used; when H_d is not numerically positive definite (no
    damping and a dead feature), the symmetric root from an eigendecomposition with floored eigenvalues is used.
    """

    gram: torch.Tensor
    """The damped H_d, float64 (k, k)."""
    root: torch.Tensor
    """A (k, k)."""
    triangular: bool
    """A is upper triangular (Cholesky) rather than symmetric (eigen root)."""
    inv_root: torch.Tensor | None = None
    """A^-1 for the symmetric root; the triangular root is inverted by triangular solves instead."""

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """A @ matrix."""
        return self.root @ matrix

    def solve(self, matrix: torch.Tensor) -> torch.Tensor:
        """A^-1 @ matrix."""
        if self.triangular:
            return torch.linalg.solve_triangular(self.root, matrix, upper=True)
        return self.inv_root @ matrix

    def solve_gram(self, matrix: torch.Tensor) -> torch.Tensor:
        """H_d^-1 @ matrix = A^-1 A^-T @ matrix."""
        if self.triangular:
            return torch.cholesky_solve(matrix, self.root.T)
        return self.inv_root @ (self.inv_root @ matrix)


def energy_tail_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """Absolute energy lost for keeping r = 0..p singular values (index = r): sum_{i>r} s_i^2."""
    energy = singular_values.double().pow(2)
    return torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])


def energy_loss_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """Normalized energy loss for keeping r = 0..p singular values (index = r), with one cumulative sum."""
    tail = energy_tail_curve(singular_values)
    return (tail / tail[0].clamp_min(torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of ``matrix`` (descending, float64) from the eigenvalues of its smaller Gram matrix: several
    times faster than an SVD of the tall matrix, and exact where the energy curve looks (values whose squares are
    below the product's rounding, ~1e-16 of the largest, carry no energy)."""
    m = matrix.double()
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0).sqrt()


def whitened_singular_values(weight: torch.Tensor, gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Singular values of ``A W`` (A^T A = H_d, as :func:`whitening` damps it) without forming A when the layer
    is not wider out than in: their squares are the eigenvalues of ``W^T H_d W`` (out x out), which saves the
    Cholesky factorization of the (in x in) H_d, the largest cost of planning ViT-L's fc2 layers."""
    W = weight.double()
    if W.shape[1] > W.shape[0]:
        return singular_values(whitening(gram, damping).apply(W))
    H = gram.double()
    if not torch.isfinite(H).all():
        raise ValueError("the Gram matrix contains NaN or inf")
    # W^T H_d W = W^T H W + d tr(H)/k W^T W: the output-side formula, with M = W^T H W formed here
    return output_whitened_singular_values(W, W.T @ (H @ W), float(torch.diagonal(H).sum()), damping)


def _output_whitened_gram(W: torch.Tensor, output_gram: torch.Tensor, trace: float,
                          damping: float) -> torch.Tensor | None:
    """W^T H_d W = M + d tr(H) / k W^T W (out x out; the damping relative to H's mean diagonal tr(H) / k, as in
    :func:`whitening`), or None for a layer that never saw input (whitening then falls back to plain SVD)."""
    M = output_gram.double().to(W.device)
    if not torch.isfinite(M).all():
        raise ValueError("the output Gram matrix contains NaN or inf")
    scale = trace / W.shape[0]
    if not scale > 0.0:
        return None
    G = M + (damping * scale) * (W.T @ W)
    return (G + G.T) / 2


def output_whitened_singular_values(weight: torch.Tensor, output_gram: torch.Tensor, trace: float,
                                    damping: float) -> torch.Tensor:
    """:func:`whitened_singular_values` from the output Gram M = W^T H W and tr(H) alone (a layer whose statistics
    were collected on the output side): the square roots of the eigenvalues of W^T H_d W; no (in x in) product."""
    W = weight.double()
    G = _output_whitened_gram(W, output_gram, trace, damping)
    if G is None:
        return singular_values(W)
    return psd_eigh(G, vectors=False)[1]


def psd_eigh(N: torch.Tensor, vectors: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Eigenvectors (columns; None when ``vectors`` is False) and the square roots of the eigenvalues of a symmetric
    positive semi-definite matrix, largest first: the singular triplets of M from M^T M (or M M^T)."""
    N = (N + N.T) / 2
    if not vectors:
        return None, torch.linalg.eigvalsh(N).flip(0).clamp_min(0.0).sqrt()
    evals, evecs = torch.linalg.eigh(N)
    return evecs.flip(1), evals.flip(0).clamp_min(0.0).sqrt()


def live_inverse(s: torch.Tensor) -> torch.Tensor:
    """1/s where s carries energy (above 1e-12 of the largest of the descending ``s``), 0 elsewhere: such
    directions carry nothing, and their vectors get zero weight instead of an infinite one."""
    live = s > s[0].clamp_min(torch.finfo(torch.float64).tiny) * 1e-12
    inv = torch.zeros_like(s)
    inv[live] = 1.0 / s[live]
    return inv


def output_whitened_svd(weight: torch.Tensor, output_gram: torch.Tensor, trace: float,
                        damping: float) -> Decomposition:
    """:func:`whitened_svd` from the output Gram M = W^T H W and tr(H) alone, without any (in x in) matrix.

    With A W = P diag(s) R^T, the right singular vectors R and s^2 are the eigenpairs of W^T H_d W (out x out), and
    A^-1 P diag(s) = W R, so the whitened minimizer is ``W_hat(r) = W R_r R_r^T`` with left = W R diag(1/s): the
    same decomposition as the whitened SVD of the (in x in) H, at the cost of one (out x out) eigendecomposition
    (fc2 of a ViT: 1/16 of the Cholesky, product and SVD of the input side). Directions with no energy (s below
    1e-12 of the largest) get a zero left vector; they carry nothing."""
    W = weight.double()
    G = _output_whitened_gram(W, output_gram, trace, damping)
    if G is None:
        return plain_svd(W)
    R, s = psd_eigh(G)
    return Decomposition((W @ R) * live_inverse(s), R, s)


def whitening(gram: torch.Tensor, damping: float) -> Whitening:
    """The :class:`Whitening` of a weighted Gram matrix. H may be singular (a dead feature, fewer tokens than
    features): the damping, or the eigenvalue floor of the fallback, keeps every factor finite. Never NaN."""
    H = gram.double()
    k = H.shape[0]
    if not torch.isfinite(H).all():
        raise ValueError("the Gram matrix contains NaN or inf")
    eye = torch.eye(k, dtype=torch.float64, device=H.device)
    scale = float(torch.diagonal(H).mean())
    if scale <= 0.0:  # the layer never saw a non-zero input: fall back to the identity (plain SVD)
        return Whitening(eye.clone(), eye, triangular=True)
    H = H + damping * scale * eye
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0 and torch.isfinite(L).all() and float(torch.diagonal(L).min()) > 0:
        return Whitening(H, L.T.contiguous(), triangular=True)
    evals, evecs = torch.linalg.eigh(H)
    evals = evals.clamp_min(evals.max() * 1e-12)
    root = evals.sqrt()
    return Whitening(H, (evecs * root) @ evecs.T, triangular=False, inv_root=(evecs / root) @ evecs.T)


def truncated_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``matrix = P diag(s) R^T`` in float64 (LAPACK is much faster on tall matrices: wide ones are
    transposed first)."""
    matrix = matrix.double()
    if matrix.shape[0] < matrix.shape[1]:
        R, s, Ph = torch.linalg.svd(matrix.T, full_matrices=False)
        return Ph.T, s, R
    P, s, Rh = torch.linalg.svd(matrix, full_matrices=False)
    return P, s, Rh.T


def plain_svd(weight: torch.Tensor) -> Decomposition:
    """SVD of W itself: the paper's Vanilla SVD baseline."""
    P, s, R = truncated_svd(weight)
    return Decomposition(P, R, s)


def whitened_svd(weight: torch.Tensor, white: Whitening) -> Decomposition:
    """Exact minimizer of eq. (5) with Z = 0: ``W_hat = A^-1 SVD_r(A W)`` with A^T A = H (e.g. A = H^{1/2}).

    Its energy loss at rank r equals the calibration set's mean normalized output error of eq. (5) (up to the
    damping), because ||A (W_hat - W)||_F^2 = sum_i ||X_i (W_hat - W)||_F^2 / ||X_i W||_F^2.
    """
    P, s, R = truncated_svd(white.apply(weight.double()))
    return Decomposition(white.solve(P), R, s)


def two_sided_svd(weight: torch.Tensor, input_white: Whitening, output_white: Whitening) -> Decomposition:
    """Minimizer of the Kronecker-factored loss increase ``tr(dW^T H dW G)`` over rank-r W_hat (the loss-aware
    method, see :mod:`lowrank_vit.core.loss_aware`): with A^T A = H and B^T B = G, ``A W B^T = P diag(s) R^T`` and
    ``W_hat(r) = A^-1 P_r diag(s_r) R_r^T B^-T``, so left = A^-1 P and right = B^-1 R. Eckart-Young on the
    two-sided whitened matrix: ``||A (W - W_hat) B^T||_F^2`` is the tail energy sum_{i>r} s_i^2, in the loss's units
    (twice the predicted KL increase of the layer's change alone)."""
    M = input_white.apply(output_white.apply(weight.double().T).T)  # A W B^T
    P, s, R = truncated_svd(M)
    return Decomposition(input_white.solve(P), output_white.solve(R), s)


def mean_input_svd(weight: torch.Tensor, mean_input: torch.Tensor) -> Decomposition:
    """The paper's literal recipe, eqs. (6)-(7): SVD of X_rep W with X_rep the mean calibration input, then
    ``U = pinv(X_rep) U* sqrt(S)``, ``V = V* sqrt(S)``.

    U lies in the row space of X_rep (at most as many directions as tokens), so directions of W outside it are
    lost whatever the rank (measured on a small real ViT: far below plain SVD at the same rank). Kept to reproduce the
    paper honestly.
    """
    X = mean_input.double()
    P, s, R = truncated_svd(X @ weight.double())
    return Decomposition(torch.linalg.pinv(X) @ P, R, s)


def weighted_error(delta: torch.Tensor, gram: torch.Tensor, num_images: int) -> float:
    """Mean normalized output error of eq. (5) for a weight perturbation ``delta`` (k, m):
    ``tr(delta^T H delta) / N`` with H the weighted Gram matrix of N calibration images."""
    d = delta.double()
    return float(torch.sum(d * (gram.double() @ d))) / max(num_images, 1)
