"""Typed, self-validating configuration for :func:`lowrank_vit.compress`.

Every field is documented right below its definition. ``CompressionConfig`` holds what every method shares; what
one decomposition, allocation or Z solver alone reads is that choice's own typed settings class, declared where the
method is registered, and lives in ``settings``. The method's defaults are the best recipe measured
(docs/loss_aware.md: loss-aware SVD, marginal allocation, no Z); ``recipe("paper")`` gives the paper's. The other
defaults follow the paper's Section 4.1 where it gives a value (1024 calibration images, 5% compensation budget;
in the settings: gamma = 80, 500 greedy iterations, lr 1e-3, 2000 iterations, batch 64).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

import torch

from lowrank_vit.core import search as _peer_policies  # noqa: F401  (registers the peers' allocations)
from lowrank_vit.core.allocate import POLICIES, get_policy
from lowrank_vit.core.blockwise import METRICS as BLOCK_METRICS
from lowrank_vit.core.blockwise import TRAINABLE
from lowrank_vit.core.common import check_count, check_number, from_fields, settings_of
from lowrank_vit.core.distill import AUGMENTATIONS
from lowrank_vit.core.likelihood import check_likelihood_choice, check_output_key, likelihood_label
from lowrank_vit.methods import comcat_search as _comcat_search  # noqa: F401  (registers COMCAT's search)
from lowrank_vit.methods.compensate import SOLVERS, Z_KINDS
from lowrank_vit.methods.decompositions import METHODS, get_method
from lowrank_vit.methods.units import NO_MODULES

# The choices are the registries' names: registering a method, Z kind or policy is all it takes to configure it.
DECOMPOSITIONS = tuple(METHODS)
ALLOCATIONS = tuple(POLICIES)
COMPENSATIONS = tuple(Z_KINDS)
GRAM_PRECISIONS = ("float64", "float32")
BLOCK_RECONSTRUCTIONS = ("none", *TRAINABLE)

FLOAT32_GRAM_DEVICE_TYPES = frozenset({"cuda"})
"""Device types on which ``gram_precision=None`` means float32 Gram products for every method: GPUs whose float64
throughput is 1/32 to 1/64 of float32 (the paper's A6000, RTX cards), where float64 statistics could dominate a run.
Measured (docs/loss_aware_study.md, "Gram precision"): float32 products with float64 running sums give the same top-1 in
all 50 cells of the paper's recipe and whitened-uniform, KL within 0.15%."""


RECIPES: dict[str, dict[str, Any]] = {
    "loss-aware": dict(decomposition="loss_aware", allocation="marginal", compensation="none", bias_correction=True),
    "loss-aware-fast": dict(decomposition="loss_aware", allocation="marginal", compensation="none",
                            bias_correction=True, grad_fraction=0.5),
    "loss-aware-refit": dict(decomposition="loss_aware", allocation="marginal", compensation="none",
                             bias_correction=True, refit=True),
    "loss-aware-anchored": dict(decomposition="loss_aware", allocation="marginal", compensation="none",
                                bias_correction=True, refit=True, refit_target="block"),
    "loss-aware-block": dict(decomposition="loss_aware", allocation="marginal", compensation="none",
                             bias_correction=True, block_reconstruction="factors", block_metric="fisher"),
    "loss-aware-distill": dict(decomposition="loss_aware", allocation="marginal", compensation="none",
                               bias_correction=True, refit=True, distill_steps=128),
    "paper": dict(decomposition="whitened", allocation="greedy", compensation="lowrank"),
    "vanilla": dict(decomposition="plain", allocation="uniform", compensation="none"),
    # the strongest published peers (docs/peers.md), each with its own decomposition and allocation
    "flar-svd": dict(decomposition="flar", allocation="flar", compensation="none"),
    "svd-llm": dict(decomposition="svd_llm", allocation="uniform", compensation="none"),
    "svd-llm-update": dict(decomposition="svd_llm", allocation="uniform", compensation="none", refit=True),
    "svd-llm-v2": dict(decomposition="svd_llm", allocation="svd_llm_v2", compensation="none"),
    "kfac-lems": dict(decomposition="kfac", allocation="lems", compensation="none"),
    "comcat-search": dict(decomposition="comcat", allocation="comcat_search", compensation="none"),
}
"""Named recipes: settings on top of the other fields' defaults. "loss-aware" is the default (the best recipe
measured, docs/loss_aware_study.md); "paper" is Azizi et al.'s recipe as this library implements it exactly (whitened
SVD, Algorithm 1 on normalized energies, closed-form low-rank Z of 5%); "vanilla" is Table 2's vanilla SVD (plain
SVD of W, the same retained fraction in every layer, no Z). "flar-svd", "svd-llm", "svd-llm-v2" and "kfac-lems" are
the peers of docs/peers.md with their published settings ("comcat-search": COMCAT's head-level factorization with
its own differentiable rank search and distillation, lowrank_vit/methods/comcat_search.py; FLAR-SVD; SVD-LLM's
published pipeline, its truncation-aware whitening with uniform ranks; SVD-LLM v2's heterogeneous ratios; KFAC-SVD
with LEMS's integer program); "svd-llm-update" is SVD-LLM with the sequential update of one factor that its code
carries but its published pipeline does not run. "loss-aware-block" is the default followed by the block-wise
reconstruction in the dense model's Fisher metric (``block_reconstruction="factors"``, ``block_metric="fisher"``,
docs/loss_aware.md#block-wise-reconstruction). "loss-aware-anchored" is the refit with each block's fc2 aimed at the
dense block's output (``refit_target="block"``, docs/loss_aware.md, "Anchored to the dense block's output"): closer
to the dense model than the refit at about its cost. "loss-aware-distill" is the refit followed by the end-to-end
distillation on augmented calibration images (``distill_steps=128``; docs/loss_aware.md, "Distillation on augmented
calibration images"): the most accuracy without a fine-tune, at many times the others' compress time."""


def setting_owners() -> dict[str, list[str]]:
    """Every setting name any registered decomposition, allocation or solver declares, with who declares it
    ("decomposition 'kfac'"), read from the live registries (a method registered later counts)."""
    owners: dict[str, list[str]] = {}
    for kind, name, cls in _setting_declarations():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(f"{kind} {name!r}")
    return owners


def _setting_declarations() -> list[tuple[str, str, type]]:
    """(kind, name, settings class) of every registered choice that declares settings."""
    choices = [("decomposition", name, method.settings) for name, method in METHODS.items()]
    choices += [("allocation", name, policy.settings) for name, policy in POLICIES.items()]
    choices += [("solver", name, cls) for name, cls in SOLVERS.items()]
    return [(kind, name, cls) for kind, name, cls in choices if cls is not None]


def setting_type(name: str) -> Any:
    """The annotated type of the setting ``name`` (the first registered class declaring it), else None."""
    for _, _, cls in _setting_declarations():
        if name in {f.name for f in dataclasses.fields(cls)}:
            return typing.get_type_hints(cls)[name]
    return None


def _fold_settings(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with every key that names a method's setting rather than a field moved into ``settings`` (on top
    of the settings given there): ``recipe("paper", gamma=60)``, ``--set compression.gamma=60`` and configs written
    when those settings were fields (``gamma``, ``grad_fraction``, ``sgd_iterations``...) read as one expects.

    A flat config of that time carried every such field, at its default where its method was not chosen: those
    are dropped here (they had no effect). A value other than the default goes into ``settings``, which refuses a
    setting of a method not chosen."""
    own = {f.name: f for f in dataclasses.fields(CompressionConfig)}
    moved = {key: value for key, value in fields.items() if key not in own and setting_type(key) is not None}
    if not moved:
        return fields
    rest = {key: value for key, value in fields.items() if key not in moved}
    chosen = {kind: rest.get(kind, own[kind].default) for kind in ("decomposition", "allocation", "solver")}
    chosen_names: set[str] = set()
    others: dict[str, list[Any]] = {}  # a setting's defaults in the classes not chosen
    for kind, name, cls in _setting_declarations():
        for f in dataclasses.fields(cls):
            if chosen[kind] == name:
                chosen_names.add(f.name)
            else:
                others.setdefault(f.name, []).append(f.default)
    kept = {key: value for key, value in moved.items()
            if key in chosen_names or all(value != default for default in others[key])}
    return {**rest, "settings": {**(rest.get("settings") or {}), **kept}}


def recipe(name: str, **fields: Any) -> CompressionConfig:
    """``CompressionConfig`` of the named recipe (:data:`RECIPES`), with ``fields`` on top:
    ``recipe("paper", reduction=0.5)``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return CompressionConfig(**{**RECIPES[name], **fields})


def float32_matmul_is_ieee(device_type: str) -> bool:
    """Whether float32 matrix products on ``device_type`` are plain IEEE float32. ``torch.set_float32_matmul_precision
    ("high")`` (Lightning suggests it on Ampere GPUs) makes them TF32 on CUDA (10-bit mantissa), "medium" bfloat16 on
    CPUs: far from the float32 products the precision comparison measured, so "auto" must not pick float32 then."""
    backend = {"cuda": torch.backends.cuda, "cpu": torch.backends.mkldnn}.get(device_type)
    setting = getattr(getattr(backend, "matmul", None), "fp32_precision", "none")
    if setting == "none":  # the backend follows the global setting
        setting = getattr(torch.backends, "fp32_precision", "none")
    return setting in ("none", "ieee")


def resolve_gram_precision(cfg: CompressionConfig, device_type: str, *, float32_exact: bool | None = None) -> str:
    """The Gram product precision ``cfg`` gets when its statistics are computed on a ``device_type`` device ("cpu",
    "cuda", ...). An explicit ``cfg.gram_precision`` is returned as it is. None ("auto") gives "float32" where it is
    measured to be as good and is much faster, "float64" where the paper's rows have always used it:
    * "float32" for a method with a gradient pass ("loss_aware") on any device, and for every method on a device
      type in :data:`FLOAT32_GRAM_DEVICE_TYPES` (CUDA);
    * "float64" for the other methods on the CPU (their results there stay what they were), and for every method
      where float32 products are not IEEE float32 (TF32 or bfloat16 enabled, :func:`float32_matmul_is_ieee`).

    ``float32_exact`` states that last condition instead of reading torch's current setting (a cost estimate for
    another machine, or comparing configs independently of this process's settings).
    """
    if cfg.gram_precision is not None:
        return cfg.gram_precision
    prefers_float32 = get_method(cfg.decomposition).gradient_pass or device_type in FLOAT32_GRAM_DEVICE_TYPES
    exact = float32_matmul_is_ieee(device_type) if float32_exact is None else float32_exact
    return "float32" if prefers_float32 and exact else "float64"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


@dataclass(init=False)  # __init__ below: the dataclass's own, plus the flat keywords of earlier versions
class CompressionConfig:
    """What to compress, and how. Exactly one of ``reduction`` and ``target_params`` must be given."""

    reduction: float | None = None
    """Fraction of the *whole* model's parameter count to remove (Table 2's "-40%" is 0.4)."""
    target_params: int | None = None
    """Absolute parameter count of the compressed model, all parameters included (Table 3)."""
    target_speedup: float | None = None
    """Instead of a parameter target: the predicted end-to-end speedup over the dense model on ``latency_table``'s
    target (> 1). The ranks then minimize the allocation's absolute losses (the loss-aware method's predicted loss
    increase) per millisecond saved rather than per parameter, exactly over the profiled ranks
    (:func:`lowrank_vit.core.latency.allocate_latency`); needs allocation "marginal" or "integer"."""
    latency_table: str | None = None
    """A latency table (JSON, ``lowrank-vit profile`` or :func:`lowrank_vit.speed.cached_profile`) of this model on
    the deployment target. Given one, no layer gets a rank at which it is slower than dense there (a layer with no
    such rank stays dense; ``latency_limit=False`` turns that off), and the report predicts the end-to-end latency.
    A table measured on another machine or other software versions is refused."""
    latency_limit: bool = True
    """With ``latency_table``: cap every layer's rank at the largest profiled rank still faster than dense (False:
    parameters only, the table used for the prediction alone)."""

    decomposition: str = "loss_aware"
    """"plain": SVD of W (the paper's Vanilla SVD). "mean": eqs. (6)-(7) with X_rep the mean calibration input.
    "whitened": the exact minimizer of eq. (5) with Z = 0, W_hat = H^-1/2 SVD_r(H^1/2 W).
    "loss_aware": the minimizer of the predicted loss increase tr(dW^T H dW G) (K-FAC curvature: H of the inputs,
    G of the loss gradients at the output, from one forward and backward pass; see loss_aware.py),
    W_hat = H^-1/2 SVD_r(H^1/2 W G^1/2) G^-1/2; its energies are in the loss's units, comparable across layers.
    Comparison methods (see methods/decompositions.py, core/fisher.py, methods/comcat.py): "asvd" (Yuan et al. 2023:
    input channels scaled by mean |x|^asvd_alpha before the SVD), "fwsvd" (Hsu et al. 2022: input rows weighted by
    their Fisher information; needs labelled calibration batches), "comcat" (Xiao et al. 2023: every attention
    head's W_Q W_K^T and W_V W_O products factorized, ranks per head; MLP layers by plain SVD)."""
    allocation: str = "marginal"
    """"uniform": the same retained fraction of parameters in every layer. "greedy": Algorithm 1 with eq. (9), on
    each layer's normalized energy loss. "marginal": across all layers at once, remove the directions with the least
    absolute energy per parameter freed (meaningful when energies share a unit: decomposition "loss_aware")."""
    bias_correction: bool | None = None
    """decomposition "loss_aware": decompose each biased layer on the Gram of its *centred* inputs and let the bias
    absorb the mean input's output change, b' = b + mu^T (W - W_hat) (mu: the mean calibration token). The output
    error is then (x - mu)(W - W_hat): the mean direction, which every token shares, costs no rank, and no
    parameter is added. None (default): on for "loss_aware" (measured: lower KL to the dense model in every cell of
    docs/loss_aware_study.md), off for the others, which do not support it (True with them is a ValueError)."""
    refit: bool = False
    """decomposition "loss_aware": after the allocation, recompute every factorized layer, in forward order, for
    the inputs the compressed model gives it (which carry the errors of the layers before it), aiming at the dense
    layer's outputs in the same loss-aware metric, at the same rank (``lowrank_vit.core.refit``). Costs a few more
    forward passes over the calibration images and keeps them in memory; measured in docs/loss_aware_study.md (recipe
    "loss-aware-refit"). Needs ``compensation="none"``."""
    block_reconstruction: str = "none"
    """After the allocation (and the refit, if any): tune each transformer block of the compressed model, in forward
    order, by ``block_steps`` Adam steps so that its output on the compressed model's own inputs (the calibration
    images through the blocks already tuned) matches the dense block's output on the dense inputs (relative squared
    error; no labels; ``lowrank_vit.core.blockwise``). What it trains: "none" (off), "factors" (U and V of the
    block's factorized layers, and their Z), "factors_bias" (their biases too), "block" (every parameter of the
    block: norms, LayerScale, the layers left dense). Any decomposition and output kind; keeps the calibration
    images, a dense copy of the model and one block's activations in memory. Measured in docs/loss_aware.md (recipe
    "loss-aware-block")."""
    block_steps: int = 100
    """With ``block_reconstruction``: Adam steps per block (its cost: about ``block_steps * block_batch_size /
    calib_samples`` forward and backward passes of the model over the calibration images, all blocks together)."""
    block_lr: float = 1e-2
    """With ``block_reconstruction``: Adam's learning rate relative to each tensor's root mean square (a factor's
    scale depends on the decomposition's whitening), decayed to 0 by a cosine."""
    block_batch_size: int = 32
    """With ``block_reconstruction``: calibration images per Adam step (drawn at random, seeded by ``seed``)."""
    block_metric: str = "mse"
    """With ``block_reconstruction``: how a block's output error is measured. "mse": every position and channel
    alike; "fisher": each weighted by the dense model's diagonal Fisher there, under ``likelihood`` with targets
    drawn from the model's own output (no labels; one more forward and backward over the calibration images), so
    that what the model's output does not depend on costs nothing."""
    distill_steps: int = 0
    """After every other stage: train every parameter of the compressed model by this many AdamW steps so that its
    output matches the dense model's under ``likelihood`` (the KL divergence of class logits, the squared error of
    features and maps; no labels) on batches of calibration images augmented as ``distill_augment`` says, the dense
    model run on each batch for its targets (``lowrank_vit.core.distill``). The trained weights are kept only if
    the loss on the calibration images themselves fell (the report's ``distillation``). 0 (default): off. Costs
    about ``4 * distill_steps * distill_batch_size / calib_samples`` forward passes over the calibration images and
    keeps them, a dense copy and one more copy of the compressed model's weights; measured in docs/loss_aware.md
    (recipe "loss-aware-distill")."""
    distill_lr: float = 5e-5
    """With ``distill_steps``: AdamW's peak learning rate (no weight decay; warm-up over the first twentieth of the
    steps, then a cosine to 0)."""
    distill_batch_size: int = 64
    """With ``distill_steps``: calibration images per step (drawn with replacement, seeded by ``seed``; the backward
    runs on ``distill_micro_batch`` at a time)."""
    distill_micro_batch: int = 32
    """With ``distill_steps``: images per forward and backward (a step's gradients are accumulated over its batch, so
    the steps do not depend on it). The stage's activation memory is that of this many images through the whole
    model: lower it for large models and images (ViT-L at 224 pixels), at some speed."""
    distill_augment: str = "mix"
    """With ``distill_steps``: "mix" (each image mirrored, shifted by up to 4 pixels and mixed with another of the
    batch: ``lowrank_vit.core.distill.mix_augment``), "shift" (mirrored and shifted by up to an eighth of the side,
    not mixed: every image stays a natural one; on a real saliency model it raised the loss as "mix" did, so no
    recipe uses it: docs/loss_aware.md) or "none" (the calibration images as given: they are soon overfitted)."""
    distill_features: float = 0.0
    """With ``distill_steps``: the weight of a second term of each step's loss, the relative squared error of every
    block's output per image (``lowrank_vit.core.distill.relative_feature_error``; the blocks as the model's adapter
    lists them), matched to the dense model's blocks on the same augmented images. 0 (default): the output alone.
    The check that keeps or restores the trained weights reads the output's loss alone. Measured in docs/loss_aware.md
    ("Matching every block's output too"): no gain on the classifiers trained here, a small one on real weights that
    does not pass the refit, so no recipe sets it."""
    likelihood: Any = "auto"
    """The likelihood of the model's output that a gradient pass (decompositions "loss_aware", "kfac") and LEMS's
    probe measure the loss with (:mod:`lowrank_vit.core.likelihood`): "categorical" (class logits), "gaussian" (any
    real output: features, token maps, embeddings, regression maps; its squared error), "gaussian-direction" (an
    embedding's direction, for cosine comparisons), "bernoulli" (sigmoid maps given as logits),
    "bernoulli-probabilities" (the same given as probabilities), a registered name, or a callable
    ``fn(output, generator) -> scalar``. "auto" (default): "categorical" for the (B, C) output of a model that
    declares C classes (``num_classes``: timm's classifiers), else "gaussian". A compression records the one it
    used."""
    output_key: Any = None
    """Which part of the model's output the likelihood and the probes see: None (a tensor; a tuple's first tensor
    where all have one shape; a mapping's ``logits`` or its only tensor; anything else is refused with its parts
    listed), a mapping key or attribute name ("pooler_output", "image_embeds"), a tuple index, or a callable from
    the output to a tensor."""
    compensation: str = "none"
    """Kind of correction Z (Section 3.3, Table 1): "none", "lowrank" (G Y^T), "diagonal" (a band of wrapped
    diagonals), "sparse" (unstructured), "structured" (whole input rows of Z)."""
    z_fraction: float = 0.05
    """Parameters of Z as a fraction of the layer's dense weight (paper: 5%). Counted in the budget."""
    solver: str = "closed_form"
    """How Z is fitted: "closed_form" (exact weighted least squares on the chosen support / rank) or "sgd"
    (the paper: mini-batch gradient descent on eq. (10), every layer in parallel)."""

    calib_samples: int = 1024
    """Number of calibration images taken from the iterable (the paper's proxy dataset)."""
    gram_precision: str | None = None
    """Precision of each batch's Gram product X^T X: "float64" (exact) or "float32" (about twice as fast on CPUs;
    GPUs such as the A6000 have 1/32-1/64 of their float32 peak in float64). The running sum over batches is float64
    either way, so the error does not grow with the number of images. None (default, "auto"): decided where the
    statistics are computed, by :func:`resolve_gram_precision` (the compression report records the precision used)."""
    gram_space: str = "auto"
    """Where wide-input layers (fc2: 4x more inputs than outputs) collect their statistics. "input": H itself.
    "auto": their output Gram W^T H W (1/16 of the work for fc2) whenever the configuration uses H only through
    it, i.e. decomposition "whitened" with compensation "none" or "lowrank" and the closed-form solver; the
    decomposition, ranks, Z and reported errors are then the same as with H (see calibration.range_gram). Any
    other configuration silently uses "input", so "auto" never changes a result."""
    rank_multiple: int = 1
    """Round every allocated rank r (and a low-rank Z's rank) to a multiple of this, 8 being the usual choice for
    deployment: matrix products with such inner sizes run faster (benchmarks/rank_alignment.py). 1 (default) is the
    paper's unconstrained allocation. Ranks below the multiple are kept as they are; the budget freed by rounding
    down is given back in whole multiples by the allocation policy's own criterion."""
    damping: float = 1e-4
    """Added to the Gram matrix's diagonal, relative to its mean diagonal: keeps H^-1/2 finite when a feature is
    dead or there are fewer tokens than features, and pulls unseen directions toward plain SVD."""

    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The chosen decomposition's, allocation's and solver's own settings, by name: each registered choice declares
    a typed settings class that validates them (``methods.decompositions.LossAwareSettings``, ``AsvdSettings``,
    ``KfacSettings``; ``core.allocate.GreedySettings``; ``core.search.LemsSettings``...;
    ``methods.compensate.SgdSettings``; docs/api.md lists them all): ``settings={"grad_fraction": 0.5}``.
    A key that no chosen class declares is an error (it would be silently ignored). After validation it holds the
    values that differ from their defaults; :meth:`resolved_settings` gives every one, and the report records those.
    A setting may also be given as a keyword of its own (``CompressionConfig(reduction=0.5, gamma=60)``, as when
    these were fields): it is moved here, or dropped where its method is not chosen and it holds that method's
    default (an earlier flat config carried them all)."""

    device: str | None = None
    """Device for the calibration forward and the linear algebra; default: where the model is."""
    seed: int = 0
    """Seed for everything random (token sampling, SGD initialisation)."""
    progress: bool = True
    """Show progress bars."""

    def __init__(self, *args: Any, **fields: Any) -> None:
        """Every field by keyword (or in order), as a dataclass takes them. A method's own setting given as a keyword
        of its own (``CompressionConfig(reduction=0.5, gamma=60)``, as when these settings were fields) is moved into
        ``settings`` (:func:`_fold_settings`), so code and configs written against the flat config keep working."""
        declared = dataclasses.fields(CompressionConfig)
        if len(args) > len(declared):
            raise TypeError(f"CompressionConfig takes at most {len(declared)} positional arguments, got {len(args)}")
        for f, value in zip(declared, args, strict=False):
            if f.name in fields:
                raise TypeError(f"CompressionConfig got multiple values for argument {f.name!r}")
            fields[f.name] = value
        fields = _fold_settings(fields)
        unknown = [name for name in fields if name not in {f.name for f in declared}]
        if unknown:
            raise TypeError(f"CompressionConfig.__init__() got an unexpected keyword argument {unknown[0]!r}")
        for f in declared:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            setattr(self, f.name, fields.get(f.name, default))
        self.__post_init__()

    @property
    def fits_z_by_sgd(self) -> bool:
        """A correction Z fitted by the SGD solver (which needs stored calibration tokens), not in closed form."""
        return self.solver == "sgd" and Z_KINDS.lookup(self.compensation).fitted

    def __post_init__(self) -> None:
        targets = [self.reduction, self.target_params, self.target_speedup]
        if sum(target is not None for target in targets) != 1:
            raise ValueError("give exactly one of reduction (a fraction in (0, 1)), target_params (a count) or "
                             "target_speedup (with a latency_table)")
        if self.reduction is not None:
            if isinstance(self.reduction, bool) or not isinstance(self.reduction, (int, float)):
                raise ValueError(f"reduction must be a number in (0, 1), got {self.reduction!r}")
            if not 0.0 < float(self.reduction) < 1.0:
                raise ValueError(f"reduction must lie strictly between 0 and 1, got {self.reduction}")
            self.reduction = float(self.reduction)
        if self.target_params is not None:
            if isinstance(self.target_params, bool) or not isinstance(self.target_params, int):
                raise ValueError(f"target_params must be an integer parameter count, got {self.target_params!r}")
            if self.target_params <= 0:
                raise ValueError(f"target_params must be positive, got {self.target_params}")
        # the live registries, not the import-time tuples: a method registered later is a valid choice
        _check_choice("decomposition", self.decomposition, tuple(METHODS))
        _check_choice("allocation", self.allocation, tuple(POLICIES))
        _check_choice("compensation", self.compensation, tuple(Z_KINDS))
        _check_choice("solver", self.solver, tuple(SOLVERS))
        gradient_pass = get_method(self.decomposition).gradient_pass
        if gradient_pass and self.fits_z_by_sgd:
            raise ValueError(f"solver='sgd' fits Z on stored calibration tokens, which decomposition="
                             f"{self.decomposition!r} does not keep: use solver='closed_form'")
        if self.bias_correction is None:
            self.bias_correction = get_method(self.decomposition).default_bias_correction
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"bias_correction must be true, false or null, got {self.bias_correction!r}")
        if self.bias_correction and not gradient_pass:
            raise ValueError(f"bias_correction needs decomposition='loss_aware' (its statistics carry the mean input); "
                             f"got decomposition={self.decomposition!r}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"refit must be true or false, got {self.refit!r}")
        if self.refit and not get_method(self.decomposition).supports_refit:
            refits = ", ".join(repr(name) for name, method in METHODS.items() if method.supports_refit)
            raise ValueError(f"refit needs a decomposition with a refit ({refits}); got "
                             f"decomposition={self.decomposition!r}")
        if self.refit and Z_KINDS[self.compensation].fitted:
            raise ValueError(f"refit recomputes the factors alone: use compensation='none' (got "
                             f"{self.compensation!r})")
        _check_choice("block_reconstruction", self.block_reconstruction, BLOCK_RECONSTRUCTIONS)
        for name in ("block_steps", "block_batch_size"):
            check_count(name, getattr(self, name))
        check_number("block_lr", self.block_lr, "> 0")
        _check_choice("block_metric", self.block_metric, tuple(BLOCK_METRICS))
        if isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise ValueError(f"distill_steps must be an integer >= 0 (0: no distillation), got {self.distill_steps!r}")
        check_count("distill_batch_size", self.distill_batch_size)
        check_count("distill_micro_batch", self.distill_micro_batch)
        check_number("distill_lr", self.distill_lr, "> 0")
        _check_choice("distill_augment", self.distill_augment, tuple(AUGMENTATIONS))
        check_number("distill_features", self.distill_features, ">= 0")
        if self.distill_steps and callable(self.likelihood):
            raise ValueError("distill_steps needs a named likelihood (its outputs are matched under it): a likelihood "
                             "given as a callable has no distillation loss")
        if self.gram_precision is not None:  # None: resolved on the statistics' device (resolve_gram_precision)
            _check_choice("gram_precision", self.gram_precision, GRAM_PRECISIONS)
        _check_choice("gram_space", self.gram_space, ("input", "auto"))
        check_number("z_fraction", self.z_fraction, "[0, 0.5)")
        if Z_KINDS[self.compensation].fitted and self.z_fraction == 0.0:
            raise ValueError(f"compensation={self.compensation!r} needs z_fraction > 0 (or use compensation='none')")
        for name in ("calib_samples", "rank_multiple"):
            check_count(name, getattr(self, name))
        check_number("damping", self.damping, ">= 0")
        check_likelihood_choice(self.likelihood)
        check_output_key(self.output_key)
        self._check_settings()
        self._check_latency()

    def _check_latency(self) -> None:
        """What the latency table and the speedup target need: a table, a policy that can price milliseconds, a
        layer form the table measured (factored, with a low-rank Z folded in)."""
        if self.latency_table is not None and not isinstance(self.latency_table, str):
            raise ValueError(f"latency_table must be the path of a table (a string), got {self.latency_table!r}")
        if not isinstance(self.latency_limit, bool):
            raise ValueError(f"latency_limit must be true or false, got {self.latency_limit!r}")
        if self.target_speedup is not None:
            check_number("target_speedup", self.target_speedup, "> 1")
            if self.latency_table is None:
                raise ValueError("target_speedup needs a latency_table of the model on the target (`lowrank-vit "
                                 "profile MODEL`)")
            if not get_policy(self.allocation).prices_latency:
                pricing = ", ".join(repr(name) for name, policy in POLICIES.items() if policy.prices_latency)
                raise ValueError(f"target_speedup prices the allocation's losses in milliseconds, which allocation="
                                 f"{self.allocation!r} does not compare across layers: use one of {pricing}")
        if self.latency_table is not None:
            if not Z_KINDS[self.compensation].folds:
                raise ValueError(f"a latency table times factored layers (a low-rank Z folded in): "
                                 f"compensation={self.compensation!r} is not timed; use 'none' or 'lowrank'")
            if get_method(self.decomposition).whole_modules is not NO_MODULES:
                raise ValueError(f"decomposition={self.decomposition!r} replaces whole attention modules, which a "
                                 f"latency table does not time")

    def _setting_classes(self) -> list[type]:
        """The settings classes of the chosen decomposition, allocation and solver."""
        return [cls for cls in (get_method(self.decomposition).settings, get_policy(self.allocation).settings,
                                SOLVERS[self.solver]) if cls is not None]

    def _check_settings(self) -> None:
        """Every key of ``settings`` belongs to the chosen decomposition's, allocation's or solver's settings class
        (another's would be silently ignored), and each class accepts its values (its own validation). Those equal
        to their default are then dropped (:meth:`resolved_settings` gives them all)."""
        if not isinstance(self.settings, dict):
            raise ValueError(f"settings must be a mapping of setting names to values, got {self.settings!r}")
        classes = self._setting_classes()
        known = [f.name for cls in classes for f in dataclasses.fields(cls)]
        chosen = (f"decomposition={self.decomposition!r}, allocation={self.allocation!r}, solver={self.solver!r} "
                  f"(their settings: {', '.join(known) or 'none'})")
        for key, value in self.settings.items():
            if key not in known:  # who declares it, read from the registries only for the refusal
                where = " or ".join(setting_owners().get(key, ["no registered decomposition, allocation or solver"]))
                raise ValueError(f"setting {key!r}={value!r} belongs to {where}, not to {chosen}")
        for cls in classes:
            settings_of(self, cls)
        # a setting at its default says nothing: dropped, so that every spelling of one configuration compares equal
        defaults = {f.name: f.default for cls in classes for f in dataclasses.fields(cls)}
        self.settings = {key: value for key, value in self.settings.items() if value != defaults[key]}
        if get_policy(self.allocation).needs_probe and get_method(self.decomposition).whole_modules is not NO_MODULES:
            raise ValueError(f"allocation={self.allocation!r} measures the model with single layers truncated, which "
                             f"decomposition={self.decomposition!r} (whole attention modules) does not allow")

    def resolved_settings(self) -> dict[str, Any]:
        """Every setting the chosen decomposition, allocation and solver read, with their defaults filled in."""
        return {name: value for cls in self._setting_classes()
                for name, value in dataclasses.asdict(settings_of(self, cls)).items()}

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values: a callable likelihood or output key as its name (``callable:module.name``),
        which a config read back refuses (a callable cannot be saved)."""
        data = dataclasses.asdict(self)
        data["likelihood"] = likelihood_label(self.likelihood)
        if callable(self.output_key):
            data["output_key"] = likelihood_label(self.output_key)
        return data

    def report_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with ``settings`` resolved (:meth:`resolved_settings`): what a compression ran with, as its
        report and plan record it."""
        return {**self.to_dict(), "settings": self.resolved_settings()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        return from_fields(cls, _fold_settings(data))
