"""The loss-aware decomposition: the best rank-r weight for the predicted loss increase tr(dW^T H dW G), from the
statistics :func:`lowrank_vit.core.loss_aware.collect_loss_statistics` gathers (the derivation is that module's
docstring): ``W_hat = H^-1/2 SVD_r(H^1/2 W G^1/2) G^-1/2``, computed from each layer's narrow side where the pass kept
only that side's Grams.
"""

from __future__ import annotations

import torch

from lowrank_vit.core.calibration import LayerStats
from lowrank_vit.core.decompose import Decomposition, Whitening, live_inverse, psd_eigh, whitening


def _narrow_side(W: torch.Tensor, stats: LayerStats) -> tuple[str, torch.Tensor, float]:
    """The smaller of the two Gram matrices the decomposition can work from, with the trace its damping needs:
    ("input", W G W^T, tr G) (in x in) or ("output", W^T H W, tr H) (out x out), in the rescaled units of ``gram``
    (see :func:`collect_loss_statistics`). Narrow-side statistics give one directly; full ones are reduced here."""
    if stats.grad_range_gram is not None:
        return "input", stats.grad_range_gram.double().to(W.device), float(stats.grad_trace)
    if stats.output_gram is not None:
        return "output", stats.output_gram.double().to(W.device), float(stats.input_trace)
    if stats.grad_gram is None or stats.gram is None:
        raise ValueError("the loss-aware decomposition needs loss-aware statistics (collect_loss_statistics)")
    if W.shape[0] <= W.shape[1]:
        G = stats.grad_gram.double().to(W.device)
        return "input", W @ G @ W.T, float(torch.diagonal(G).sum())
    H = stats.gram.double().to(W.device)
    return "output", W.T @ H @ W, float(torch.diagonal(H).sum())


def _two_sided_from_narrow_side(W: torch.Tensor, stats: LayerStats, damping: float, values_only: bool = False,
                                grad_damping: float | None = None,
                                ) -> tuple[Decomposition | torch.Tensor, Whitening | None]:
    """The SVD ``A W B^T = P diag(s) R^T`` (A^T A = H_d, B^T B = G_d) from one eigendecomposition on the layer's
    narrow side, without the other side's Gram or whitening:
    * input side (in <= out): ``A W G_d W^T A^T = P diag(s^2) P^T`` and W_hat(r) = A^-1 P_r P_r^T A W, i.e.
      left = A^-1 P, right = W^T A^T P / s;
    * output side (in > out): ``B W^T H_d W B^T = R diag(s^2) R^T`` and W_hat(r) = W B^T R_r R_r^T B^-T, i.e.
      left = W B^T R / s, right = B^-1 R.

    The damping of the missing side enters as ``d tr(G)/out W W^T`` (or ``d tr(H)/in W^T W``), exactly as
    :func:`~lowrank_vit.core.decompose.whitening` damps a full Gram. ``grad_damping`` damps G (default: ``damping``,
    which then damps H only). Returns the decomposition (or only s) and the input whitening when one was computed."""
    side, narrow, trace = _narrow_side(W, stats)
    k, m = W.shape
    grad_damping = damping if grad_damping is None else grad_damping
    if side == "input":
        A = whitening(stats.gram, damping)
        AW = A.apply(W)
        N = A.apply(A.apply((narrow + (grad_damping * trace / m) * (W @ W.T)).T).T)  # A (W G_d W^T) A^T
        P, s = psd_eigh(N, vectors=not values_only)
        if values_only:
            return s, A
        return Decomposition(A.solve(P), (AW.T @ P) * live_inverse(s), s), A
    B = whitening(stats.grad_gram, grad_damping)
    N = B.apply(B.apply((narrow + (damping * trace / k) * (W.T @ W)).T).T)  # B (W^T H_d W) B^T
    R, s = psd_eigh(N, vectors=not values_only)
    if values_only:
        return s, None
    return Decomposition((W @ (B.root.T @ R)) * live_inverse(s), B.solve(R), s), None


def loss_aware_svd(weight: torch.Tensor, stats: LayerStats, damping: float,
                   grad_damping: float | None = None) -> tuple[Decomposition, Whitening | None]:
    """:func:`~lowrank_vit.core.decompose.two_sided_svd` of one layer from its loss-aware statistics, computed on the
    layer's narrow side (:func:`_two_sided_from_narrow_side`: one eigendecomposition of the smaller dimension instead
    of two whitenings and an SVD), in the loss's units (singular values squared = tr(dW^T H dW G) of dropping each
    direction), and the input whitening when it was computed (of the rescaled ``gram``: the one the closed-form Z
    kinds need). Both Grams are damped as :func:`~lowrank_vit.core.decompose.whitening` does, G by ``grad_damping``
    where it is given."""
    d, white = _two_sided_from_narrow_side(weight.double(), stats, damping, grad_damping=grad_damping)
    root = stats.loss_scale ** 0.5  # the whitening of gram = H / loss_scale: undo the scale on s (and on left)
    return Decomposition(d.left / root, d.right, d.singular_values * root), white


def loss_aware_singular_values(weight: torch.Tensor, stats: LayerStats, damping: float,
                               grad_damping: float | None = None) -> torch.Tensor:
    """The spectrum of :func:`loss_aware_svd` alone (for planning)."""
    s, _ = _two_sided_from_narrow_side(weight.double(), stats, damping, values_only=True, grad_damping=grad_damping)
    return s * stats.loss_scale ** 0.5
