"""Row-scaled SVDs of two published comparison methods: ASVD and FWSVD.

Both approximate a layer's weight by a truncated SVD of a *row-scaled* matrix and undo the scaling on the left
factor. In this package's convention a dense layer computes ``x W`` with W of shape (k, m) = (in, out), so a row of
W belongs to one input channel and the scaling is ``diag(s) W`` with one positive s_j per input channel j:

* ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language
  Models", Sec. 3.2): ``S = diag(mean_i |x_ij|)^alpha`` (the mean absolute calibration activation of input channel j,
  over every token of every image, to the power alpha = 0.5); ``S W = P Sigma R^T``; ``W_hat = S^-1 P_r Sigma_r R_r^T``.
* FWSVD (Hsu et al. ICLR 2022, "Language model compression with weighted low-rank factorization", Sec. 3): the
  importance of input row j is the summed Fisher information of its weights, ``I_j = sum_o sum_d (dL_d/dW_jo)^2``
  (squared gradients of the task loss over labelled calibration batches); the weighted objective
  ``||diag(sqrt(I)) (W - W_hat)||_F^2`` is minimized exactly by the same scaled SVD with ``s = sqrt(I)``.

The singular values of ``diag(s) W`` are the spectrum the allocation works on: their tail energy is exactly each
method's own weighted error. Scales are normalized to mean 1 (W_hat does not depend on a common factor), so a
uniform scale (alpha = 0, or equal Fisher rows) gives exactly the factors of plain SVD.

The mean absolute activations are recorded by :class:`MeanAbsRecorder`, forward hooks that ride along the one
calibration pass; the Fisher information comes from a gradient pass in :mod:`lowrank_vit.core.fisher`.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn

from lowrank_vit.core.decompose import Decomposition, truncated_svd

_SCALE_FLOOR = 1e-6
"""Smallest scale kept, relative to the largest: a dead input channel (mean |x| = 0, or no gradient) would make
S^-1 infinite; at the floor its row of W is still reproduced, only with (almost) no weight in the objective."""


def normalized_scales(values: torch.Tensor) -> torch.Tensor:
    """Positive per-row scales from non-negative importances, floored (see ``_SCALE_FLOOR``) and divided by their
    mean, in float64. All-zero or non-finite importances raise: they carry no information to weight by."""
    v = values.detach().double()
    if v.ndim != 1 or v.numel() == 0:
        raise ValueError(f"row scales must be a non-empty vector, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all() or bool((v < 0).any()):
        raise ValueError("row importances must be finite and non-negative")
    top = float(v.max())
    if top <= 0.0 or bool((v == v[0]).all()):
        return torch.ones_like(v)  # nothing distinguishes the rows: exactly plain SVD
    v = v.clamp_min(top * _SCALE_FLOOR)
    return v / v.mean()


def asvd_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's ``S_jj = (mean_i |x_ij|)^alpha`` (Yuan et al. 2023, Sec. 3.2), normalized to mean 1. ``alpha = 0``
    gives all ones (plain SVD)."""
    if alpha == 0:
        return torch.ones(mean_abs.numel(), dtype=torch.float64, device=mean_abs.device)
    floored = normalized_scales(mean_abs)  # floor before the power, so a dead channel stays finite
    return normalized_scales(floored.pow(alpha))


def fisher_scales(row_fisher: torch.Tensor) -> torch.Tensor:
    """FWSVD's row weights ``sqrt(I_j)`` (Hsu et al. 2022, Sec. 3: the objective weighs each row's squared error by
    its summed Fisher information I_j), normalized to mean 1."""
    return normalized_scales(normalized_scales(row_fisher).sqrt())


def row_scaled_svd(weight: torch.Tensor, scales: torch.Tensor) -> Decomposition:
    """``diag(s) W = P Sigma R^T`` and ``W_hat(r) = diag(s)^-1 P_r Sigma_r R_r^T``: the exact minimizer of
    ``||diag(s) (W - W_hat)||_F`` over rank r (Eckart-Young on the scaled matrix). W is (k, m) = (in, out), s (k,)."""
    s = scales.to(device=weight.device, dtype=torch.float64)
    if s.shape != (weight.shape[0],):
        raise ValueError(f"need one scale per input row: weight {tuple(weight.shape)}, scales {tuple(s.shape)}")
    P, sigma, R = truncated_svd(s[:, None] * weight.double())
    return Decomposition(P / s[:, None], R, sigma)


def scaled_spectrum_matrix(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``diag(s) W``: the matrix whose singular values :func:`row_scaled_svd` keeps (for spectra-only planning)."""
    return scales.to(device=weight.device, dtype=torch.float64)[:, None] * weight.double()


class MeanAbsRecorder:
    """Context manager: forward hooks on ``layers`` that accumulate each layer's mean absolute input per channel
    over every token seen while active (ASVD's activation statistic). Meant to wrap the calibration pass, so no
    second pass over the data is needed; the hooks are removed on exit whatever happens.

    ``enabled=False`` registers nothing and :meth:`mean_abs` returns an empty dict.
    """

    def __init__(self, layers: dict[str, nn.Linear], enabled: bool = True) -> None:
        self.layers = layers
        self.enabled = enabled
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, module.in_features)
            total = x.abs().sum(dim=0, dtype=torch.float64)
            self._sums[name] = self._sums[name] + total if name in self._sums else total
            self._counts[name] = self._counts.get(name, 0) + x.shape[0]
        return hook

    def __enter__(self) -> MeanAbsRecorder:
        if self.enabled:
            self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def mean_abs(self) -> dict[str, torch.Tensor]:
        """Layer name -> (k,) float64 mean |x| per input channel (empty when disabled)."""
        if not self.enabled:
            return {}
        missing = [name for name in self.layers if not self._counts.get(name)]
        if missing:
            raise ValueError(f"layer {missing[0]} saw no input during calibration: cannot compute ASVD's scaling")
        return {name: self._sums[name] / self._counts[name] for name in self.layers}
