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
        """Energy loss for every rank 0..p (index = rank kept), computed with one cumulative sum."""
        energy = self.singular_values.pow(2)
        total = energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
        tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
        return (tail / total).clamp(0.0, 1.0)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U (k, rank) and V (m, rank) with the singular values split evenly (sqrt on each side, eq. 7).

        Ranks above the basis size (possible for "mean", whose basis has at most as many vectors as tokens) are
        padded with zero columns.
        """
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        keep = min(rank, self.max_rank)
        root = self.singular_values[:keep].clamp_min(0).sqrt()
        U = self.left[:, :keep] * root
        V = self.right[:, :keep] * root
        if keep < rank:
            U = torch.cat([U, U.new_zeros(U.shape[0], rank - keep)], dim=1)
            V = torch.cat([V, V.new_zeros(V.shape[0], rank - keep)], dim=1)
        return U, V


def damped_gram_roots(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H^{1/2} and H^{-1/2} of the damped Gram matrix ``H + damping * mean(diag H) * I``.

    H may be singular (a dead feature, fewer tokens than features); the damping, plus a floor on the eigenvalues
    relative to the largest one, keeps both roots finite. Never returns NaN.
    """
    H = gram.double()
    k = H.shape[0]
    scale = float(torch.diagonal(H).mean())
    if not torch.isfinite(H).all():
        raise ValueError("the Gram matrix contains NaN or inf")
    if scale <= 0.0:  # the layer never saw a non-zero input: fall back to the identity (plain SVD)
        eye = torch.eye(k, dtype=torch.float64, device=H.device)
        return eye, eye
    H = H + damping * scale * torch.eye(k, dtype=torch.float64, device=H.device)
    evals, evecs = torch.linalg.eigh(H)
    floor = evals.max() * 1e-12
    evals = evals.clamp_min(floor)
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


def truncated_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``matrix = P diag(s) R^T`` in float64."""
    P, s, Rh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return P, s, Rh.T


def plain_svd(weight: torch.Tensor) -> Decomposition:
    """SVD of W itself: the paper's Vanilla SVD baseline."""
    P, s, R = truncated_svd(weight)
    return Decomposition(P, R, s)


def whitened_svd(weight: torch.Tensor, gram_root: torch.Tensor, gram_inv_root: torch.Tensor) -> Decomposition:
    """Exact minimizer of eq. (5) with Z = 0: ``W_hat = H^{-1/2} SVD_r(H^{1/2} W)``.

    Its energy loss at rank r equals the calibration set's mean normalized output error of eq. (5), because
    ||H^{1/2} (W_hat - W)||_F^2 = sum_i ||X_i (W_hat - W)||_F^2 / ||X_i W||_F^2.
    """
    P, s, R = truncated_svd(gram_root @ weight.double())
    return Decomposition(gram_inv_root @ P, R, s)


def mean_input_svd(weight: torch.Tensor, mean_input: torch.Tensor) -> Decomposition:
    """The paper's literal recipe, eqs. (6)-(7): SVD of X_rep W with X_rep the mean calibration input, then
    ``U = pinv(X_rep) U* sqrt(S)``, ``V = V* sqrt(S)``.

    U lies in the row space of X_rep (at most as many directions as tokens), so directions of W outside it are
    lost whatever the rank: the weakness NOTES.md measured. Kept to reproduce the paper honestly.
    """
    X = mean_input.double()
    P, s, R = truncated_svd(X @ weight.double())
    return Decomposition(torch.linalg.pinv(X) @ P, R, s)


def weighted_error(delta: torch.Tensor, gram: torch.Tensor, num_images: int) -> float:
    """Mean normalized output error of eq. (5) for a weight perturbation ``delta`` (k, m):
    ``tr(delta^T H delta) / N`` with H the weighted Gram matrix of N calibration images."""
    d = delta.double()
    return float(torch.sum(d * (gram.double() @ d))) / max(num_images, 1)
