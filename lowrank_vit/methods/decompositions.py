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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank_vit.core.calibration import LayerStats, collect_statistics
from lowrank_vit.core.common import Registry, check_number, settings_of
from lowrank_vit.core.covariance import cholesky_whitening, ledoit_wolf_intensity, shrink_to_identity
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
from lowrank_vit.core.likelihood import AUTO
from lowrank_vit.core.loss_aware import COMPUTE_DTYPES, FISHER_LABELS, collect_loss_statistics
from lowrank_vit.core.loss_aware_svd import loss_aware_singular_values, loss_aware_svd
from lowrank_vit.core.refit import PairGrams, anchored_weight, feedback_stats, feedback_transform
from lowrank_vit.core.scaling import MeanAbsRecorder, asvd_scales, fisher_scales, row_scaled_svd, scaled_spectrum_matrix
from lowrank_vit.core.search import SvdLlmV2Settings
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
    """Its calibration is one forward and backward pass with running sums only (the loss-aware statistics): it
    supports bias correction and ``grad_fraction``, and keeps no tokens for the SGD solver."""
    default_bias_correction: ClassVar[bool] = False
    """``CompressionConfig.bias_correction`` when left None (only a method with ``gradient_pass`` supports it)."""
    home_recipe: ClassVar[str] = "paper"
    """The named recipe (``config.RECIPES``) whose allocation and Z go with this decomposition when it is chosen by
    name alone (``lowrank-vit compress --recipe NAME``)."""
    settings: ClassVar[type | None] = None
    """Its own typed settings (a dataclass validated on construction), read from ``CompressionConfig.settings``."""

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

    def refit(self, weight: torch.Tensor, stats: LayerStats, pair: PairGrams, cfg: Any, rank: int) -> Decomposition:
        """The layer's basis refitted for the compressed model's inputs (``pair``), whose first ``rank`` triplets the
        layer then keeps; only where ``supports_refit``."""
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


@dataclass(frozen=True)
class GradientPassSettings:
    """The settings of a method whose calibration runs a backward pass (``Method.gradient_pass``)."""

    grad_fraction: float = 1.0
    """The fraction of the calibration images (the first ceil(fraction * N)) that also run the backward pass giving
    G; the others feed H only. The backward is most of the pass's cost; docs/loss_aware_study.md measures what a
    smaller fraction saves and costs (recipe "loss-aware-fast": 0.5)."""
    loss_pass_dtype: str = "float32"
    """The precision the forward and backward pass compute in. "bfloat16" runs them under ``torch.autocast`` (the
    Gram products and sums keep ``gram_precision``): measured in docs/loss_aware_study.md, the same top-1 within 0.1
    point and KL within 2% (4% where it is below 1e-5) on six of seven CIFAR-10 models (0.4 points on the seventh),
    and statistics 2.0x as fast on a CPU with bfloat16 matrix units (Intel AMX), 1.7x with bfloat16 dot products
    (AMD, AVX512-BF16). Not the default: on CPUs with neither the bfloat16 products have no fast kernels and the pass
    may be slower (not measured here), and no GPU was available to time it."""

    def __post_init__(self) -> None:
        check_number("grad_fraction", self.grad_fraction, "(0, 1]")
        if self.loss_pass_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"loss_pass_dtype={self.loss_pass_dtype!r} is not one of "
                             f"{', '.join(map(repr, COMPUTE_DTYPES))}")


REFIT_TARGETS = ("layer", "block")
"""What a refitted layer aims at (``LossAwareSettings.refit_target``)."""


@dataclass(frozen=True)
class LossAwareSettings(GradientPassSettings):
    """The loss-aware decomposition's settings (beside the shared ``bias_correction`` and ``refit``)."""

    fisher_labels: str = "sampled"
    """The labels its loss gradients use. "sampled": drawn from the model's own prediction (the true Fisher, the
    curvature of the KL divergence to the dense model; no labels needed). "given": the calibration batches' labels
    (the empirical Fisher)."""
    refit_damping: float = 1e-2
    """With ``refit``: the pull toward the dense weight, relative to the mean diagonal of the compressed inputs'
    Gram. The refit's least squares for the new inputs is a ridge regression, min ||X_c W* - X W||^2 +
    d ||W* - W||^2, which with few calibration tokens per input feature would otherwise fit their noise (measured in
    docs/loss_aware_study.md: with 64 images 1e-4 raised the KL at -50% by up to 44%; 1e-2 kept the gains at -80% with
    256 images)."""

    refit_target: str = "layer"
    """With ``refit``: what each refitted layer aims at. "layer": its own dense outputs (the dense layer on the dense
    inputs). "block": the layer that writes its block's output, into the residual stream, through at most a
    per-channel scale (fc2, through LayerScale where there is one; found by probing the block,
    ``core.refit.residual_gain``) aims at the dense *block's* output: its outputs also take up, as far as a linear map
    of its inputs at its rank can, the drift the stream carries in from the blocks before and the errors of the
    block's other layers. The other layers aim at their own outputs. Measured: docs/loss_aware.md, "Anchored to the
    dense block's output"."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refit_target not in REFIT_TARGETS:
            raise ValueError(f"refit_target={self.refit_target!r} is not one of "
                             f"{', '.join(map(repr, REFIT_TARGETS))}")
        if self.fisher_labels not in FISHER_LABELS:
            raise ValueError(f"fisher_labels={self.fisher_labels!r} is not one of "
                             f"{', '.join(map(repr, FISHER_LABELS))}")
        check_number("refit_damping", self.refit_damping, ">= 0")


@register_method
class LossAware(Method):
    """The minimizer of the predicted loss increase tr(dW^T H dW G) (:mod:`lowrank_vit.core.loss_aware`)."""

    name = "loss_aware"
    narrow_side_exact = True
    tail_is_lowrank_z = True
    loss_units = True
    supports_refit = True
    gradient_pass = True
    default_bias_correction = True
    home_recipe = "loss-aware"  # its marginal allocation on predicted loss, and no Z (more rank in the same basis)
    settings = LossAwareSettings

    def needs_labels(self, cfg):
        return settings_of(cfg, LossAwareSettings).fisher_labels == "given"  # else sampled from the model's own

    def calibrate(self, model, layers, batches, cfg, device, sample_tokens, gram_space):
        own = settings_of(cfg, self.settings)  # a GradientPassSettings (KFAC-SVD's own subclass included)
        stats = collect_loss_statistics(model, layers, batches, cfg.calib_samples, device=device,
                                        progress=cfg.progress, seed=cfg.seed, gram_precision=cfg.gram_precision,
                                        gram_space=gram_space, center=cfg.bias_correction,
                                        grad_images=math.ceil(own.grad_fraction * cfg.calib_samples),
                                        compute_dtype=own.loss_pass_dtype, likelihood=cfg.likelihood,
                                        output_key=cfg.output_key, **self.gradient_options(cfg))
        return stats, {}

    def gradient_options(self, cfg: Any) -> dict[str, Any]:
        """What its gradient pass does with the loss gradients (``collect_loss_statistics``'s labels, clipping)."""
        return {"labels": settings_of(cfg, LossAwareSettings).fisher_labels}

    def spectrum(self, weight, stats, extra, cfg):
        return loss_aware_singular_values(weight, stats, cfg.damping)

    def decompose(self, weight, stats, extra, cfg):
        return loss_aware_svd(weight, stats, cfg.damping)

    def refit(self, weight, stats, pair, cfg, rank):
        # the same decomposition of W* = S W, the least-squares weight for the new inputs, on their Gram; a layer
        # anchored to its block's output (refit_target="block") aims at the dense outputs plus the anchor's E
        damping = settings_of(cfg, LossAwareSettings).refit_damping
        if pair.anchor_cross is not None:
            return loss_aware_svd(anchored_weight(pair, weight, damping), feedback_stats(stats, pair, None),
                                  cfg.damping)[0]
        transform = feedback_transform(pair, damping)
        return loss_aware_svd(transform @ weight, feedback_stats(stats, pair, transform), cfg.damping)[0]


def anchors_blocks(cfg: Any) -> bool:
    """Whether ``cfg``'s refit aims each block's output-writing layer at the dense block's output
    (``LossAwareSettings.refit_target="block"``); False for a decomposition without that setting."""
    own = get_method(cfg.decomposition).settings
    return own is not None and getattr(settings_of(cfg, own), "refit_target", "layer") == "block"


class _RowScaled(Method):
    """A truncated SVD of ``diag(s) W`` with the scaling undone on the left factor (:mod:`lowrank_vit.core.scaling`)."""

    def spectrum(self, weight, stats, extra, cfg):
        return singular_values(scaled_spectrum_matrix(weight, extra))

    def decompose(self, weight, stats, extra, cfg):
        return row_scaled_svd(weight, extra), None


@dataclass(frozen=True)
class AsvdSettings:
    """ASVD's setting."""

    asvd_alpha: float = 0.5
    """The exponent alpha of the channel scaling S = diag(mean |x|)^alpha (alpha = 0 is plain SVD)."""

    def __post_init__(self) -> None:
        check_number("asvd_alpha", self.asvd_alpha, ">= 0")


@register_method
class ASVD(_RowScaled):
    """Yuan et al. 2023: input channels scaled by their mean |x|^alpha, recorded during the calibration pass."""

    name = "asvd"
    settings = AsvdSettings

    def calibrate(self, model, layers, batches, cfg, device, sample_tokens, gram_space):
        alpha = settings_of(cfg, AsvdSettings).asvd_alpha
        with MeanAbsRecorder(layers) as recorder:  # rides along the one pass
            stats, _ = super().calibrate(model, layers, batches, cfg, device, sample_tokens, gram_space)
        return stats, {name: asvd_scales(value, alpha) for name, value in recorder.mean_abs().items()}


@register_method
class FWSVD(_RowScaled):
    """Hsu et al. 2022: input rows weighted by their Fisher information (a labelled gradient pass first)."""

    name = "fwsvd"

    def needs_labels(self, cfg):
        return cfg.likelihood in (AUTO, "categorical")

    def calibrate(self, model, layers, batches, cfg, device, sample_tokens, gram_space):
        # the gradient pass first: a missing label fails before the long statistics pass
        fisher = row_fisher(model, layers, batches, cfg.calib_samples, device=device, progress=cfg.progress)
        stats, _ = super().calibrate(model, layers, batches, cfg, device, sample_tokens, gram_space)
        return stats, {name: fisher_scales(value) for name, value in fisher.items()}


@register_method
class COMCAT(Method):
    """Xiao et al. 2023: attention heads factorized per head product (:mod:`lowrank_vit.methods.comcat`); the remaining
    (MLP) layers by plain SVD."""

    name = "comcat"
    whole_modules = AttentionHeads()


# ------------------------------------------------------------------------------------ the peers (docs/peers.md)


def pooled_token_stats(stats: dict[str, LayerStats], layers: dict[str, nn.Linear]) -> dict[str, LayerStats]:
    """Token-weighted statistics (``weighting="token"``: H_raw = sum of x x^T over every calibration token) in the
    pipeline's units: ``gram = N H_raw / tr(W^T H_raw W)``, so that the report's eq. (5) error is the pooled relative
    output error, and ``loss_scale = tr(W^T H_raw W) / N``, so that ``loss_scale * gram`` is H_raw again."""
    for name, layer_stats in stats.items():
        W = layers[name].weight.detach().double().T.to(layer_stats.gram.device)
        energy = float(torch.sum(W * (layer_stats.gram @ W)))
        scale = energy / layer_stats.num_images if energy > 0 else 1.0
        layer_stats.gram = layer_stats.gram / scale
        layer_stats.loss_scale = scale
    return stats


def _raw_units(decomposition: Decomposition, stats: LayerStats, tokens: int | None) -> Decomposition:
    """A decomposition of the pooled ``gram`` with its singular values in the units of the plain input Gram summed
    over the calibration's own tokens, as SVD-LLM's code sums it, or, given ``tokens``, over that many tokens
    (rescaled): SVD-LLM v2's truncation losses are read in these units, and its 1 / log(L) scores depend on them
    (``SvdLlmV2Settings.loss_tokens``)."""
    rows = max(stats.rows or 1, 1)
    root = (stats.loss_scale * (tokens / rows if tokens else 1.0)) ** 0.5
    return Decomposition(decomposition.left / root, decomposition.right, decomposition.singular_values * root)


class _TokenWhitened(Method):
    """Whitened SVD on the plain token Gram, factored by Cholesky with the peers' eigenvalue shift on failure."""

    def calibrate(self, model, layers, batches, cfg, device, sample_tokens, gram_space):
        stats = collect_statistics(model, layers, batches, cfg.calib_samples, sample_tokens=sample_tokens,
                                   device=device, progress=cfg.progress, seed=cfg.seed,
                                   gram_precision=cfg.gram_precision, gram_space=gram_space, weighting="token",
                                   fourth_moment=self.fourth_moment)
        return pooled_token_stats(stats, layers), {}

    fourth_moment: ClassVar[bool] = False

    def gram(self, stats: LayerStats, cfg: Any) -> torch.Tensor:
        return stats.gram

    def whiten(self, stats: LayerStats, cfg: Any) -> Whitening:
        return cholesky_whitening(self.gram(stats, cfg), what=f"decomposition {self.name!r}'s input Gram",
                                  alternative="use decomposition 'whitened' (damped) instead")

    def spectrum(self, weight, stats, extra, cfg):
        return self.decompose(weight, stats, extra, cfg)[0].singular_values

    def decompose(self, weight, stats, extra, cfg):
        white = self.whiten(stats, cfg)
        return _raw_units(whitened_svd(weight, white), stats, settings_of(cfg, SvdLlmV2Settings).loss_tokens), None


@register_method
class SVDLLM(_TokenWhitened):
    """SVD-LLM (Wang et al. 2024): truncation-aware whitening by the Cholesky factor of the plain input Gram; with
    ``refit`` (its recipe "svd-llm") the sequential update: layer by layer in forward order, the input-side factor
    kept, the output-side factor solved by least squares for the compressed model's own inputs."""

    name = "svd_llm"
    supports_refit = True
    home_recipe = "svd-llm"

    def refit(self, weight, stats, pair, cfg, rank):
        return svd_llm_update(weight, self.decompose(weight, stats, None, cfg)[0], pair.gram, rank)


def svd_llm_update(weight: torch.Tensor, decomposition: Decomposition, compressed_gram: torch.Tensor,
                   rank: int) -> Decomposition:
    """SVD-LLM's closed-form update of the output-side factor at ``rank``: with the input-side factor U_r of
    ``decomposition`` kept, the V_r that minimizes ||X_c U_r V_r^T - X_c W||_F^2 on the compressed model's inputs X_c
    (Gram H_c) solves (U_r^T H_c U_r) V_r^T = U_r^T H_c W. The target is the dense weight on the same compressed
    inputs, as the published code takes it. Returned as a basis of exactly ``rank`` directions (unit singular
    values: U_r and V_r as they are)."""
    U = decomposition.factors(rank)[0]
    H = compressed_gram.double().to(U.device)
    HU = H @ U
    M = U.T @ HU
    M = (M + M.T) / 2
    # the pseudo-inverse where U_r has directions the compressed inputs never reach (a singular M): those get no
    # output, exactly as least squares leaves them undetermined
    V = (torch.linalg.pinv(M, hermitian=True) @ (HU.T @ weight.double())).T
    return Decomposition(U, V, torch.ones(rank, dtype=torch.float64, device=U.device))


@dataclass(frozen=True)
class FlarDecompositionSettings:
    """FLAR-SVD's decomposition setting."""

    shrinkage: str = "ledoit-wolf"
    """"ledoit-wolf": the input second-moment matrix shrunk toward a scaled identity by the Ledoit-Wolf intensity;
    "none": the plain token Gram (SVD-LLM's whitening)."""

    def __post_init__(self) -> None:
        if self.shrinkage not in ("ledoit-wolf", "none"):
            raise ValueError(f"shrinkage must be 'ledoit-wolf' or 'none', got {self.shrinkage!r}")


@register_method
class FLAR(_TokenWhitened):
    """FLAR-SVD (Thoma et al. 2025): SVD-LLM's whitening on a Ledoit-Wolf-shrunk input Gram; its recipe "flar-svd"
    allocates by its feature-error search (:mod:`lowrank_vit.core.search`)."""

    name = "flar"
    home_recipe = "flar-svd"
    fourth_moment = True
    settings = FlarDecompositionSettings

    def gram(self, stats, cfg):
        if settings_of(cfg, FlarDecompositionSettings).shrinkage == "none":
            return stats.gram
        intensity = ledoit_wolf_intensity(stats.gram * stats.loss_scale, stats.fourth_moment, stats.rows)
        return shrink_to_identity(stats.gram, intensity)


@dataclass(frozen=True)
class KfacSettings(GradientPassSettings):
    """KFAC-SVD's settings (its published defaults for vision), beside the gradient pass's."""

    input_shrinkage: float = 0.1
    """a of the input Gram's shrinkage (1 - a) H + a mean(diag H) I."""
    grad_shrinkage: float = 0.7
    """a of the gradient Gram's shrinkage (0.7 for vision, 0.3 for language models)."""
    clip_low: float = 0.1
    """Token gradients are raised to at least this multiple of their image's mean token-gradient norm."""
    clip_high: float = 10.0
    """... and lowered to at most this multiple."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("input_shrinkage", self.input_shrinkage, "[0, 1)")
        check_number("grad_shrinkage", self.grad_shrinkage, "[0, 1)")
        check_number("clip_low", self.clip_low, "(0, 1]")
        check_number("clip_high", self.clip_high, "> 0")
        if self.clip_high < 1.0:
            raise ValueError(f"clip_high must be at least 1 (a token's norm may rise above its image's mean), got "
                             f"{self.clip_high!r}")


@register_method
class KFAC(LossAware):
    """KFAC-SVD (with LEMS, 2026): the two-sided Kronecker-factored whitening of the loss-aware method, from the
    true labels' cross-entropy gradients clipped per token, both Grams shrunk toward a scaled identity (not damped),
    no bias correction; its recipe "kfac-lems" allocates by LEMS's integer program."""

    name = "kfac"
    supports_refit = False
    default_bias_correction = False
    home_recipe = "kfac-lems"
    settings = KfacSettings

    def needs_labels(self, cfg):
        return cfg.likelihood in (AUTO, "categorical")

    def gradient_options(self, cfg):
        # the true labels of a classifier, as its authors; an output without classes (a backbone, an embedding, a
        # map) has no labels to give, so its targets are drawn from the output's likelihood (the true Fisher)
        own = settings_of(cfg, KfacSettings)
        labels = "given" if cfg.likelihood in (AUTO, "categorical") else "sampled"
        return {"labels": labels, "clip": (own.clip_low, own.clip_high),
                "who": "decomposition 'kfac' (KFAC-SVD's gradients of the true labels)"}

    @staticmethod
    def _dampings(cfg: Any) -> tuple[float, float, float]:
        """(1 - a) H + a mu I = (1 - a)(H + a / (1 - a) mu I): the shrinkage is a damping of a / (1 - a) and a
        factor (1 - a) on the energies, for each side."""
        own = settings_of(cfg, KfacSettings)
        a, b = own.input_shrinkage, own.grad_shrinkage
        return a / (1 - a), b / (1 - b), math.sqrt((1 - a) * (1 - b))

    def spectrum(self, weight, stats, extra, cfg):
        d_in, d_grad, factor = self._dampings(cfg)
        return loss_aware_singular_values(weight, stats, d_in, d_grad) * factor

    def decompose(self, weight, stats, extra, cfg):
        d_in, d_grad, factor = self._dampings(cfg)
        d, white = loss_aware_svd(weight, stats, d_in, d_grad)
        return Decomposition(d.left / factor, d.right, d.singular_values * factor), white
