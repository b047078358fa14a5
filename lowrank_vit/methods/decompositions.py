"""The decomposition methods, one class each, registered by name (``CompressionConfig.decomposition``).

A method says what statistics its calibration pass collects, and from them gives each layer's spectrum (for planning)
and its :class:`~lowrank_vit.core.decompose.Decomposition` (a basis in which every rank is a truncation). The pipeline
loops over layers without knowing any method's name; what it needs to know is stated as capabilities:

* ``narrow_side_exact``: the method uses a wide Gram only through W, so each layer may keep its statistics on its
  narrow side (``gram_space="auto"``, see :mod:`lowrank_vit.core.calibration` and :mod:`lowrank_vit.core.loss_aware`);
* ``tail_is_lowrank_z``: its SVD is the exact optimum of the metric the closed-form low-rank Z minimizes, so that Z is
  the next singular triplets of the same SVD (no second solve; exactly more rank);
* ``loss_units``: its energies are predicted loss increases (reported per layer as ``predicted_loss``);
* ``supports_refit``: :meth:`Method.refit` gives a layer's basis for the compressed model's own inputs
  (``CompressionConfig.refit``, :mod:`lowrank_vit.core.refit`);

and what it replaces as a whole, if anything: ``whole_modules`` (:mod:`lowrank_vit.methods.units`; COMCAT's attention
modules, whose heads are allocation units beside the remaining linears).

``register_method`` adds a method; ``get_method(name)`` returns it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank_vit.core.calibration import LayerStats, collect_statistics
from lowrank_vit.core.common import Registry
from lowrank_vit.core.decompose import (
    Decomposition,
    Whitening,
    mean_input_svd,
    output_whitened_singular_values,
    output_whitened_svd,
    plain_svd,
    singular_values,
    whitened_singular_values,
    whitened_svd,
    whitening,
)
from lowrank_vit.core.fisher import row_fisher
from lowrank_vit.core.loss_aware import collect_loss_statistics, loss_aware_singular_values, loss_aware_svd
from lowrank_vit.core.refit import PairGrams, feedback_stats, feedback_transform
from lowrank_vit.core.scaling import MeanAbsRecorder, asvd_scales, fisher_scales, row_scaled_svd, scaled_spectrum_matrix
from lowrank_vit.methods.units import NO_MODULES, AttentionHeads, WholeModules

Extras = dict[str, torch.Tensor]
"""Per-layer extra statistics a method collects beside :class:`LayerStats` (ASVD's and FWSVD's row scales)."""


class Method:
    """A decomposition method. Subclasses set ``name`` and override what differs from plain SVD."""

    name: ClassVar[str]
    narrow_side_exact: ClassVar[bool] = False
    tail_is_lowrank_z: ClassVar[bool] = False
    loss_units: ClassVar[bool] = False
    supports_refit: ClassVar[bool] = False
    whole_modules: ClassVar[WholeModules] = NO_MODULES
    want_mean: ClassVar[bool] = False
    gradient_pass: ClassVar[bool] = False
    home_recipe: ClassVar[str] = "paper"
    """The named recipe (``config.RECIPES``) whose allocation and Z go with this decomposition when it is chosen by
    name alone (``lowrank-vit compress --recipe NAME``)."""
    """Its calibration is one forward and backward pass with running sums only (the loss-aware statistics): it
    supports bias correction and ``grad_samples``, and keeps no tokens for the SGD solver."""

    def needs_labels(self, cfg: Any) -> bool:
        """Whether the calibration batches must carry class labels (a gradient pass against them)."""
        return False

    def calibrate(self, model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable, cfg: Any,
                  device: torch.device, sample_tokens: int, gram_space: str) -> tuple[dict[str, LayerStats], Extras]:
        """One pass over the calibration images: every layer's statistics (and the method's extras)."""
        stats = collect_statistics(model, layers, batches, cfg.calib_samples, want_mean=self.want_mean,
                                   sample_tokens=sample_tokens, device=device, progress=cfg.progress, seed=cfg.seed,
                                   gram_precision=cfg.gram_precision, gram_space=gram_space)
        return stats, {}

    def spectrum(self, weight: torch.Tensor, stats: LayerStats, extra: torch.Tensor | None, cfg: Any) -> torch.Tensor:
        """The singular values :meth:`decompose` would keep (descending, float64), without its vectors."""
        return singular_values(weight)

    def decompose(self, weight: torch.Tensor, stats: LayerStats, extra: torch.Tensor | None,
                  cfg: Any) -> tuple[Decomposition, Whitening | None]:
        """The layer's basis, and the whitening of H it computed on the way (None if it needed none)."""
        return plain_svd(weight), None

    def refit(self, weight: torch.Tensor, stats: LayerStats, pair: PairGrams, cfg: Any) -> Decomposition:
        """The layer's basis refitted for the compressed model's inputs (``pair``), aiming at the dense layer's
        outputs; only where ``supports_refit``."""
        raise NotImplementedError(f"decomposition {self.name!r} has no refit")


METHODS: Registry[Method] = Registry("decomposition")
register_method = METHODS.register  # class decorator: CompressionConfig(decomposition=cls.name)
get_method = METHODS.lookup


@register_method
class Plain(Method):
    """SVD of W itself: the paper's vanilla SVD."""

    name = "plain"


@register_method
class MeanInput(Method):
    """The paper's eqs. (6)-(7) literally: the SVD of X_rep W with X_rep the mean calibration input."""

    name = "mean"
    want_mean = True

    def spectrum(self, weight, stats, extra, cfg):
        return singular_values(stats.mean_input.double() @ weight)

    def decompose(self, weight, stats, extra, cfg):
        return mean_input_svd(weight, stats.mean_input), None


@register_method
class Whitened(Method):
    """The exact minimizer of eq. (5) with Z = 0, ``H^-1/2 SVD_r(H^1/2 W)`` (the paper's recipe as implemented)."""

    name = "whitened"
    narrow_side_exact = True
    tail_is_lowrank_z = True

    def spectrum(self, weight, stats, extra, cfg):
        if stats.output_gram is not None:
            return output_whitened_singular_values(weight, stats.output_gram, stats.input_trace, cfg.damping)
        return whitened_singular_values(weight, stats.gram, cfg.damping)

    def decompose(self, weight, stats, extra, cfg):
        if stats.output_gram is not None:  # output-side statistics: the same decomposition from W^T H W alone
            return output_whitened_svd(weight, stats.output_gram, stats.input_trace, cfg.damping), None
        white = whitening(stats.gram, cfg.damping)
        return whitened_svd(weight, white), white


@register_method
class LossAware(Method):
    """The minimizer of the predicted loss increase tr(dW^T H dW G) (:mod:`lowrank_vit.core.loss_aware`)."""

    name = "loss_aware"
    narrow_side_exact = True
    tail_is_lowrank_z = True
    loss_units = True
    supports_refit = True
    gradient_pass = True
    home_recipe = "loss-aware"  # its marginal allocation on predicted loss, and no Z (more rank in the same basis)

    def needs_labels(self, cfg):
        return cfg.fisher_labels == "given"  # else labels sampled from the model's own predictions

    def calibrate(self, model, layers, batches, cfg, device, sample_tokens, gram_space):
        stats = collect_loss_statistics(model, layers, batches, cfg.calib_samples, labels=cfg.fisher_labels,
                                        device=device, progress=cfg.progress, seed=cfg.seed,
                                        gram_precision=cfg.gram_precision, gram_space=gram_space,
                                        center=cfg.bias_correction,
                                        grad_images=math.ceil(cfg.grad_fraction * cfg.calib_samples),
                                        compute_dtype=cfg.loss_pass_dtype)
        return stats, {}

    def spectrum(self, weight, stats, extra, cfg):
        return loss_aware_singular_values(weight, stats, cfg.damping)

    def decompose(self, weight, stats, extra, cfg):
        return loss_aware_svd(weight, stats, cfg.damping)

    def refit(self, weight, stats, pair, cfg):
        # the same decomposition of W* = S W, the least-squares weight for the new inputs, on their Gram
        transform = feedback_transform(pair, cfg.refit_damping)
        return loss_aware_svd(transform @ weight, feedback_stats(stats, pair, transform), cfg.damping)[0]


class _RowScaled(Method):
    """A truncated SVD of ``diag(s) W`` with the scaling undone on the left factor (:mod:`lowrank_vit.core.scaling`)."""

    def spectrum(self, weight, stats, extra, cfg):
        return singular_values(scaled_spectrum_matrix(weight, extra))

    def decompose(self, weight, stats, extra, cfg):
        return row_scaled_svd(weight, extra), None


@register_method
class ASVD(_RowScaled):
    """Yuan et al. 2023: input channels scaled by their mean |x|^alpha, recorded during the calibration pass."""

    name = "asvd"

    def calibrate(self, model, layers, batches, cfg, device, sample_tokens, gram_space):
        with MeanAbsRecorder(layers) as recorder:  # rides along the one pass
            stats, _ = super().calibrate(model, layers, batches, cfg, device, sample_tokens, gram_space)
        return stats, {name: asvd_scales(value, cfg.asvd_alpha) for name, value in recorder.mean_abs().items()}


@register_method
class FWSVD(_RowScaled):
    """Hsu et al. 2022: input rows weighted by their Fisher information (a labelled gradient pass first)."""

    name = "fwsvd"

    def needs_labels(self, cfg):
        return True

    def calibrate(self, model, layers, batches, cfg, device, sample_tokens, gram_space):
        # the gradient pass first: a missing label fails before the long statistics pass
        fisher = row_fisher(model, layers, batches, cfg.calib_samples, device=device, progress=cfg.progress)
        stats, _ = super().calibrate(model, layers, batches, cfg, device, sample_tokens, gram_space)
        return stats, {name: fisher_scales(value) for name, value in fisher.items()}


@register_method
class COMCAT(Method):
    """Xiao et al. 2023: attention heads factorized per head product (:mod:`lowrank_vit.nn.comcat`); the remaining
    (MLP) layers by plain SVD."""

    name = "comcat"
    whole_modules = AttentionHeads()
