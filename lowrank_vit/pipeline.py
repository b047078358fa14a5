"""``compress``: calibration -> decomposition -> allocation -> compensation -> layer swap, and its report."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lowrank_vit.config import CompressionConfig, resolve_gram_precision
from lowrank_vit.core.allocate import check_feasible, get_policy
from lowrank_vit.core.blockwise import block_reconstruction, measuring_layer_errors, metric_weights
from lowrank_vit.core.budget import Allocation, LayerBudget
from lowrank_vit.core.calibration import LayerStats, first_calibration_images, iter_calibration_batches, output_error
from lowrank_vit.core.common import release_freed_memory, settings_of
from lowrank_vit.core.decompose import Decomposition, Whitening, whitening
from lowrank_vit.core.distill import distill_on_calibration
from lowrank_vit.core.latency import LatencyTable, allocate_latency, check_speedup, latency_report, rank_limits
from lowrank_vit.core.likelihood import AUTO, build_likelihood, model_output, resolve_likelihood, select_output
from lowrank_vit.core.probe import Probe
from lowrank_vit.core.progress import progress_bar
from lowrank_vit.core.refit import (
    PairGrams,
    block_calls,
    dense_output_error,
    micro_batches,
    refit_bias,
    sequential_refit,
)
from lowrank_vit.core.stopwatch import StageClock
from lowrank_vit.io.surgery import swap_layers
from lowrank_vit.methods.compensate import (
    CompensationProblem,
    SgdSettings,
    SGDTask,
    closed_form_z,
    fit_sgd,
    get_z_kind,
    init_z_for_sgd,
    svd_tail_z,
    z_param_count,
    z_spec,
)
from lowrank_vit.methods.decompositions import anchors_blocks, get_method
from lowrank_vit.methods.units import WholeModules
from lowrank_vit.nn.adapters import count_params, get_adapter
from lowrank_vit.nn.comcat import FactorizedAttention
from lowrank_vit.nn.factorized import FactorizedLinear
from lowrank_vit.reports import CompressionReport, LayerReport
from lowrank_vit.speed.runtimes import environment


def _target_total(cfg: CompressionConfig, params_before: int) -> int:
    if cfg.target_speedup is not None:  # no parameter target: the latency allocation spends milliseconds
        return params_before
    if cfg.target_params is not None:
        if cfg.target_params >= params_before:
            raise ValueError(f"target_params={cfg.target_params:,} is not below the model's {params_before:,} "
                             "parameters")
        return cfg.target_params
    return round((1.0 - cfg.reduction) * params_before)


@dataclass
class _Setup:
    """What compress and plan_compression both derive from the model and the config before calibration."""

    cfg: CompressionConfig
    layers: dict[str, nn.Linear]
    params_before: int
    target_total: int
    budget: int
    """Parameters left for the compressible layers' weights (and their factors and Z)."""
    z_params: dict[str, int]
    device: torch.device
    replaced_params: int
    """Parameters of the model that compression replaces: the layers' weights and the whole modules' parameters
    (COMCAT: the attention modules' qkv and proj weights and biases)."""
    whole: WholeModules
    """The method's modules replaced as a whole (:mod:`lowrank_vit.methods.units`)."""
    fixed_params: int = 0
    """New parameters outside every allocation unit (COMCAT's attention output biases)."""
    modules: dict[str, nn.Module] = field(default_factory=dict)
    """Name -> dense module replaced as a whole (its linears are then not in ``layers``); empty for most methods."""
    latency: LatencyTable | None = None
    """``config.latency_table``, loaded and checked against this machine and this model."""
    budgets: list[LayerBudget] = field(default_factory=list)
    """The allocator's view of every layer, built once here (shapes, Z, rank limits); the allocation adds the loss
    curves the calibration measured."""


def check_target(model: nn.Module, config: CompressionConfig) -> None:
    """Raise the ValueError ``compress`` would raise before calibrating (an unreachable target, a compressed or
    unsupported model), without any data: for callers that load data before compressing (the CLI)."""
    _setup(model, config, {})


def _setup(model: nn.Module, config: CompressionConfig | None, overrides: dict[str, Any]) -> _Setup:
    if config is None:
        config = CompressionConfig(**overrides)
    elif overrides:
        config = CompressionConfig.from_dict({**config.to_dict(), **overrides})
    adapter = get_adapter(model)
    if any(isinstance(m, (FactorizedLinear, FactorizedAttention)) for m in model.modules()):
        raise ValueError("the model is already compressed (it holds factorized layers); compress the dense model")
    adapter.call_qkv_as_module(model)  # BEiT, EVA, Swin V2: the same function, through qkv's module call
    whole = get_method(config.decomposition).whole_modules
    modules = whole.find(model, adapter)
    layers: dict[str, nn.Linear] = {name: layer for name, layer in adapter.compressible_layers(model).items()
                                    if not any(name.startswith(f"{outer}.") for outer in modules)}
    for name, layer in layers.items():
        if not torch.isfinite(layer.weight).all():
            raise ValueError(f"layer {name} has NaN or inf weights")
    params_before = count_params(model)
    target_total = _target_total(config, params_before)
    replaced = sum(layer.weight.numel() for layer in layers.values())
    replaced += sum(whole.replaced_params(module) for module in modules.values())
    fixed = sum(whole.fixed_params(module) for module in modules.values())
    budget = target_total - (params_before - replaced) - fixed
    z_params = {name: z_param_count(config.compensation, layer.in_features, layer.out_features, config.z_fraction,
                                    config.rank_multiple)
                for name, layer in layers.items()}
    table = _latency_table(config, layers)
    # Fail on an impossible target before the (long) calibration pass.
    budgets = _budgets(config, layers, z_params, table)
    shapes = budgets + whole.budgets(modules)
    if config.target_speedup is None:
        check_feasible(shapes, budget, outside=params_before - replaced + fixed, params_before=params_before)
    else:
        check_speedup(shapes, table, config.target_speedup)
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    # "auto" precision becomes the one used on this device, so the report (and result.json) records it
    config = replace(config, gram_precision=resolve_gram_precision(config, device.type))
    return _Setup(config, layers, params_before, target_total, budget, z_params, device, replaced, whole, fixed,
                  modules, table, budgets)


def _latency_table(cfg: CompressionConfig, layers: dict[str, nn.Linear]) -> LatencyTable | None:
    """``cfg.latency_table`` loaded, refused unless measured on this machine with this software for these layers."""
    if cfg.latency_table is None:
        return None

    table = LatencyTable.load(cfg.latency_table)
    table.check_environment(environment(table.device, table.runtime))
    table.check_layers({name: (layer.in_features, layer.out_features, layer.bias is not None)
                        for name, layer in layers.items()})
    return table


def _budgets(cfg: CompressionConfig, layers: dict[str, nn.Linear], z_params: dict[str, int],
             table: LatencyTable | None) -> list[LayerBudget]:
    """The allocator's view of every layer: its shape, Z, a placeholder loss curve (the calibration's comes later,
    :func:`_allocate`) and, with a latency table and ``latency_limit``, the largest rank still faster than dense."""
    budgets = [LayerBudget(name, layer.in_features, layer.out_features, z_params[name], torch.zeros(1))
               for name, layer in layers.items()]
    if table is not None and cfg.latency_limit:
        limits = rank_limits(budgets, table)
        budgets = [replace(budget, rank_limit=limits[budget.name]) for budget in budgets]
    return budgets


def statistics_space(cfg: CompressionConfig) -> str:
    """The ``gram_space`` given to :func:`collect_statistics` (and :func:`collect_loss_statistics`): "auto" (each
    layer's statistics on its narrow side) only where every later use of the wide Gram goes through W: the whitened
    and the loss-aware decompositions and their spectra, the closed-form low-rank Z (its columns lie in the range of
    the residual, hence of W) and eq. (5)'s errors of such W_hat."""
    exact = (get_method(cfg.decomposition).narrow_side_exact and get_z_kind(cfg.compensation).is_more_rank
             and cfg.solver == "closed_form")
    return "auto" if cfg.gram_space == "auto" and exact else "input"


def _resolve_output(model: nn.Module, setup: _Setup, calib_images: Iterable) -> tuple[_Setup, Iterable]:
    """The setup with ``likelihood`` decided ("auto" -> "categorical" or "gaussian") and checked on the output of
    the first calibration images, for a method that reads the output (a gradient pass, a probing allocation); the
    report then records the likelihood used. Returns the calibration batches to use (a one-shot iterator's first
    batch put back)."""
    cfg = setup.cfg
    policy = get_policy(cfg.allocation)
    if not (get_method(cfg.decomposition).gradient_pass or policy.needs_probe or policy.search is not None):
        return setup, calib_images
    images, calib_images = first_calibration_images(calib_images)
    resolved = resolve_likelihood(model, images[:8].to(setup.device), cfg.likelihood, cfg.output_key)
    return replace(setup, cfg=replace(cfg, likelihood=resolved)), calib_images


def _calibrate(model: nn.Module, setup: _Setup, calib_images: Iterable,
               sample_tokens: int) -> tuple[dict[str, LayerStats], dict[str, torch.Tensor]]:
    """Per-layer statistics, and the method's per-layer extras (ASVD's and FWSVD's row scales; else empty)."""
    cfg = setup.cfg
    return get_method(cfg.decomposition).calibrate(model, setup.layers, calib_images, cfg, setup.device,
                                                   sample_tokens, statistics_space(cfg))


def _energy_curve(cfg: CompressionConfig, singular_values: torch.Tensor) -> torch.Tensor:
    """The curve the allocation policy compares (normalized energy losses, or absolute tails)."""
    return get_policy(cfg.allocation).curve(singular_values).cpu()


def _allocate(setup: _Setup, curves: dict[str, torch.Tensor], probe: Probe | None = None) -> Allocation:
    cfg = setup.cfg
    budgets = [replace(budget, energy_losses=curves[budget.name]) for budget in setup.budgets]
    if cfg.target_speedup is not None:
        return allocate_latency(budgets, setup.latency, cfg.target_speedup)
    budgets += setup.whole.budgets(setup.modules, curves)
    return get_policy(cfg.allocation).run(budgets, setup.budget, cfg, int(0.0005 * setup.target_total), probe)


def _latency_report(setup: _Setup, ranks: dict[str, int | None]) -> dict[str, Any]:
    """The report's ``latency``: predicted end-to-end time of the allocation on the table's target."""
    if setup.latency is None:
        return {}
    return latency_report(setup.budgets, setup.latency, ranks)


def _keeps_images(cfg: CompressionConfig) -> bool:
    """Whether the calibration images are needed again after the statistics (the refit, the block reconstruction,
    a probing allocation)."""
    policy = get_policy(cfg.allocation)
    return _revisits_images(cfg) or policy.needs_probe or policy.search is not None


def _check_replayable(model: nn.Module, cfg: CompressionConfig, images: list[torch.Tensor]) -> None:
    """The refit and the block reconstruction re-run each block on cached inputs with the rest of the call the
    model's forward makes (:func:`~lowrank_vit.core.refit.block_calls`); a block called with a value that depends
    on the batch (GCViT's global query, a mask per image) cannot be replayed. Refused here, on two forwards of one and
    two images, rather than after the whole calibration. Every block is checked, also one the allocation may leave
    dense."""
    if not images or not (cfg.refit or cfg.block_reconstruction != "none"):
        return  # (no images: the calibration says so)
    stage = "the refit" if cfg.refit else "the block reconstruction"
    device = next(model.parameters()).device
    training = model.training
    try:
        block_calls(model.eval(), list(get_adapter(model).layers_by_block(model)), images, device, stage)
    finally:
        model.train(training)


def _revisits_images(cfg: CompressionConfig) -> bool:
    """Whether a stage after the layer swap runs the calibration images through the compressed model and a dense
    copy (the refit, the block reconstruction, the distillation), so that the layers' errors are measured after it."""
    return cfg.refit or cfg.block_reconstruction != "none" or cfg.distill_steps > 0


def _held_out_probe(cfg: CompressionConfig) -> int:
    """How many images a probing allocation measures apart from the calibration images (its ``held_out_probe``
    setting: the ``probe_images`` that follow them in the data); 0 where it probes the first calibration images."""
    policy = get_policy(cfg.allocation)
    if not policy.needs_probe:
        return 0
    settings = settings_of(cfg, policy.settings)
    return settings.probe_images if getattr(settings, "held_out_probe", False) else 0


def _kept_batches(calib_images: Iterable, cfg: CompressionConfig) -> tuple[list[torch.Tensor], list,
                                                                            list[torch.Tensor]]:
    """The calibration images (detached), the very batches the statistics will see (they read the first
    ``calib_samples`` images of them), and the probe's images: the calibration images themselves, or the ones that
    follow them where the probe is held out (:func:`_held_out_probe`)."""
    held_out = _held_out_probe(cfg)
    kept = list(iter_calibration_batches(calib_images, cfg.calib_samples + held_out))
    images, batches = [images.detach() for images, _ in kept], [batch for _, batch in kept]
    if not held_out:
        return images, batches, images
    calibration, probe, seen = [], [], 0
    for chunk in images:
        split = max(0, min(chunk.shape[0], cfg.calib_samples - seen))
        calibration += [chunk[:split]] if split else []
        probe += [chunk[split:]] if split < chunk.shape[0] else []
        seen += chunk.shape[0]
    if seen < cfg.calib_samples + held_out:
        raise ValueError(f"the held-out probe (settings held_out_probe=True) measures on the {held_out} images that "
                         f"follow the {cfg.calib_samples} calibration images, but the data gave {seen} in all: pass "
                         f"{cfg.calib_samples + held_out} images, or lower settings['probe_images']")
    return calibration, batches, probe


def _probe(model: nn.Module, setup: _Setup, decompositions: dict[str, Decomposition],
           images: list[torch.Tensor]) -> Probe | None:
    """The :class:`Probe` a probing allocation measures the model with: the first ``probe_images`` calibration
    images (its settings), every layer truncated from its own decomposition. None for the other policies."""
    policy = get_policy(setup.cfg.allocation)
    if not policy.needs_probe:
        return None
    count = settings_of(setup.cfg, policy.settings).probe_images
    batches, taken = [], 0
    for batch in micro_batches(images, 64):
        if taken >= count:
            break
        batches.append(batch[: count - taken])
        taken += batches[-1].shape[0]
    classifiers = get_adapter(model).classifier_names(model)  # none in a backbone, an embedding or a dense model

    def reconstruct(name: str, rank: int) -> torch.Tensor:
        U, V = decompositions[name].factors(rank)
        return U @ V.T

    cfg = setup.cfg
    features_of = model.get_submodule(classifiers[0]) if classifiers else None
    return Probe(model, setup.layers, reconstruct, batches, features_of, setup.device,
                 build_likelihood(cfg.likelihood) if cfg.likelihood != AUTO else None, cfg.output_key)


def _weight(layer: nn.Linear, device: torch.device) -> torch.Tensor:
    """The paper's W = weight^T, (in, out), float64."""
    return layer.weight.detach().to(device).double().T


@dataclass
class CompressionPlan:
    """The rank allocation alone (no factor computed): what ``lowrank-vit plan`` prints."""

    config: dict[str, Any]
    params_before: int
    params_after: int
    target_params: int
    ranks: dict[str, int | None]
    layer_specs: dict[str, dict[str, Any]]
    """FactorizedLinear spec of every layer the plan factorizes (see :meth:`FactorizedLinear.spec`)."""
    module_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Spec of every module replaced as a whole (COMCAT: :meth:`FactorizedAttention.spec`); empty for most methods."""
    latency: dict[str, Any] = field(default_factory=dict)
    """As :attr:`CompressionReport.latency`."""


def plan_compression(model: nn.Module, calib_images: Iterable, config: CompressionConfig | None = None,
                     **overrides: Any) -> CompressionPlan:
    """Calibrate and allocate ranks exactly as :func:`compress` would, without computing any factor or touching
    the model: singular values only, so it is several times faster (used to check parameter budgets)."""
    switched = get_adapter(model).call_qkv_as_module(model)  # for the hooks; switched back below
    try:
        return _plan(model, calib_images, config, overrides)
    finally:
        for attn in switched:
            attn.qkv_bias_separate = False


def _plan(model: nn.Module, calib_images: Iterable, config: CompressionConfig | None,
          overrides: dict[str, Any]) -> CompressionPlan:
    setup = _setup(model, config, overrides)
    if get_policy(setup.cfg.allocation).search is not None:
        raise ValueError(f"allocation={setup.cfg.allocation!r} trains the model while it searches its ranks: a plan "
                         "cannot show them without running the search; run compress")
    setup, calib_images = _resolve_output(model, setup, calib_images)
    cfg = setup.cfg
    method = get_method(cfg.decomposition)
    probing = get_policy(cfg.allocation).needs_probe
    probe_images: list[torch.Tensor] = []
    if probing:  # the probe runs the images again (the refit, which also keeps them, is not part of a plan)
        _, calib_images, probe_images = _kept_batches(calib_images, cfg)
    stats, scales = _calibrate(model, setup, calib_images, sample_tokens=0)
    curves, decompositions = {}, {}
    with progress_bar(len(setup.layers), "spectra", "layer", cfg.progress) as bar:
        for name, layer in setup.layers.items():
            weight = _weight(layer, setup.device)
            if probing:  # the probe truncates the layers: their factors, not only their spectra
                decompositions[name] = method.decompose(weight, stats[name], scales.get(name), cfg)[0]
                spectrum = decompositions[name].singular_values
            else:
                spectrum = method.spectrum(weight, stats[name], scales.get(name), cfg)
            curves[name] = _energy_curve(cfg, spectrum)
            bar.update(1)
    for name, decomposition in setup.whole.decompositions(setup.modules, setup.device).items():
        curves[name] = _energy_curve(cfg, decomposition.singular_values)
    allocation = _allocate(setup, curves, _probe(model, setup, decompositions, probe_images))
    specs = {}
    for name, layer in setup.layers.items():
        rank = allocation.ranks[name]
        if rank is not None:
            specs[name] = {"in_features": layer.in_features, "out_features": layer.out_features, "rank": rank,
                           "bias": layer.bias is not None,
                           "z": z_spec(cfg.compensation, layer.in_features, layer.out_features, setup.z_params[name])}
    module_specs = {name: setup.whole.spec(name, module, allocation.ranks) for name, module in setup.modules.items()}
    params_after = setup.params_before - setup.replaced_params + setup.fixed_params + allocation.params
    return CompressionPlan(cfg.report_dict(), setup.params_before, params_after, setup.target_total, allocation.ranks,
                           specs, module_specs, _latency_report(setup, allocation.ranks))


def apply_plan_skeleton_(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Swap in zero-initialised factorized layers shaped as ``plan`` says: exact parameter counts and model sizes
    without computing factors (their values are meaningless until trained or loaded)."""
    swap_layers(model, lambda fqn, _: FactorizedLinear.from_spec(plan.layer_specs[fqn]),
                lambda fqn, _: fqn in plan.layer_specs)
    whole = get_method(plan.config["decomposition"]).whole_modules
    swap_layers(model, lambda fqn, m: whole.from_spec(fqn, m, plan.module_specs[fqn]),
                lambda fqn, _: fqn in plan.module_specs)
    return model


def compress(model: nn.Module, calib_images: Iterable, config: CompressionConfig | None = None,
             **overrides: Any) -> CompressionReport:
    """Compress ``model`` in place: every block linear becomes ``U V^T + Z`` (or stays dense where the allocation
    says so), so that the whole model holds ``config``'s target number of parameters.

    Args:
        model: a timm ViT, DeiT, Swin, BEiT or EVA (any size, input resolution, patch size, channels).
        calib_images: iterable of batches: image tensors (B, C, H, W), (images, labels) tuples or dicts with an
            "image" tensor, already preprocessed for the model. ``config.calib_samples`` images are used.
        config: what to do; ``overrides`` are applied on top (``compress(m, data, reduction=0.5)``).

    Returns:
        A :class:`CompressionReport`.
    """
    setup = _setup(model, config, overrides)
    if setup.cfg.distill_steps and setup.cfg.likelihood != AUTO:
        _distillation_loss(setup.cfg.likelihood)  # refused before any work
    setup, calib_images = _resolve_output(model, setup, calib_images)
    cfg, clock = setup.cfg, StageClock(setup.device)
    kept_images, calib_images, probe_images = (_kept_batches(calib_images, cfg) if _keeps_images(cfg)
                                               else ([], calib_images, []))
    _check_replayable(model, cfg, kept_images)
    found = None
    search = get_policy(cfg.allocation).search
    if search is not None:  # COMCAT's: trains the model, so it runs before the statistics are taken
        with clock.stage("search"):
            found = search(model, calib_images, setup)
    with clock.stage("calibration"):
        tokens = settings_of(cfg, SgdSettings).sgd_tokens_per_image if cfg.fits_z_by_sgd else 0
        stats, scales = _calibrate(model, setup, calib_images, tokens)
    with clock.stage("decomposition"):
        decompositions, whitenings = _decompose(setup, stats, scales, clock)
    with clock.stage("allocation"):
        curves = {name: _energy_curve(cfg, d.singular_values) for name, d in decompositions.items()}
        allocation = _allocate(setup, curves, found or _probe(model, setup, decompositions, probe_images))
    kept_images = kept_images if _revisits_images(cfg) else []  # the probe's alone: free them
    del probe_images
    with clock.stage("compensation", less="report_errors"):  # the report's errors are not the stage's
        new_layers, reports, sgd_history = _factorize(setup, stats, decompositions, whitenings, allocation.ranks,
                                                      clock)
    # the modules replaced as a whole (COMCAT's attention), one report per unit (output errors not measured)
    new_modules = {name: setup.whole.build(name, module, decompositions, allocation.ranks)
                   for name, module in setup.modules.items()}
    unit_reports = [LayerReport(unit.name, unit.in_features, unit.out_features, unit.rank, 0, unit.dense_params,
                                unit.params, unit.energy_loss, math.nan, math.nan)
                    for unit in setup.whole.summaries(setup.modules, decompositions, allocation.ranks)]
    dense = copy.deepcopy(model) if _revisits_images(cfg) else None
    with clock.sub("swap"):
        swap_layers(model, lambda fqn, _: new_layers.get(fqn), lambda fqn, m: fqn in new_layers)
        swap_layers(model, lambda fqn, _: new_modules.get(fqn), lambda fqn, m: fqn in new_modules)
    if cfg.refit:
        with clock.stage("refit", less="report_errors"):
            errors = _refit(dense, model, setup, stats, new_layers, kept_images, clock)
        reports.update({name: replace(reports[name], output_error_lowrank=err, output_error=err)
                        for name, err in errors.items()})
    if cfg.block_reconstruction != "none":
        with clock.stage("block_reconstruction"):
            errors = _reconstruct_blocks(dense, model, setup, new_layers, kept_images)
        reports.update({name: replace(reports[name], output_error_lowrank=err, output_error=err)
                        for name, err in errors.items()})
    distillation = {}
    if cfg.distill_steps:
        with clock.stage("distillation", less="report_errors"):
            distillation = _distill(dense, model, setup, kept_images)
            if distillation["kept"] or not (cfg.refit or cfg.block_reconstruction != "none"):
                with clock.sub("report_errors"):  # every weight moved (or none was measured): on the tokens
                    errors = _errors_on_tokens(dense, model, setup, new_layers, kept_images)
                reports.update({name: replace(reports[name], output_error_lowrank=err, output_error=err)
                                for name, err in errors.items()})
    del stats, decompositions, whitenings, dense, kept_images  # (the new layers live on in the model)
    release_freed_memory()  # under DDP on one host the next process compresses while this one holds what it freed
    return CompressionReport(cfg.report_dict(), setup.params_before, count_params(model), setup.target_total,
                             [reports[name] for name in setup.layers] + unit_reports, clock.stages, sgd_history,
                             allocation.trace if get_policy(cfg.allocation).records_trace else [], clock.substages,
                             _latency_report(setup, allocation.ranks), distillation)


def _decompose(setup: _Setup, stats: dict[str, LayerStats], scales: dict[str, torch.Tensor],
               clock: StageClock) -> tuple[dict[str, Decomposition], dict[str, Whitening]]:
    """Every layer's decomposition by the method (its factors at any rank, and the spectrum the allocation compares)
    and the whole modules'; and the whitening of H of each layer whose Z is fitted on it (eq. 10), where the method
    gave none. The gradient statistics serve the decomposition alone unless the refit reads them: freed here."""
    cfg, device, method = setup.cfg, setup.device, get_method(setup.cfg.decomposition)
    needs_whitening = get_z_kind(cfg.compensation).fitted and not _z_is_svd_tail(cfg)
    decompositions, whitenings = {}, {}
    with progress_bar(len(setup.layers), "decomposition", "layer", cfg.progress) as bar:
        for name, layer in setup.layers.items():
            decompositions[name], white = method.decompose(_weight(layer, device), stats[name], scales.get(name), cfg)
            if white is None and needs_whitening:  # the closed-form or SGD Z of eq. (10) is fitted on H
                with clock.sub("whitening"):
                    white = whitening(stats[name].gram, cfg.damping)
            if white is not None:
                whitenings[name] = white
            if not cfg.refit:
                stats[name].grad_gram = stats[name].grad_range_gram = None
            bar.update(1)
        decompositions.update(setup.whole.decompositions(setup.modules, device))
    return decompositions, whitenings


def _z_is_svd_tail(cfg: CompressionConfig) -> bool:
    """Whether Z is the decomposition's next singular triplets: the exact optimum of a low-rank Z (more rank) in
    closed form where the decomposition's own metric is eq. (10)'s, found without a second SVD or H."""
    kind = get_z_kind(cfg.compensation)
    return kind.fitted and kind.is_more_rank and get_method(cfg.decomposition).tail_is_lowrank_z and \
        not cfg.fits_z_by_sgd


def _factorize(setup: _Setup, stats: dict[str, LayerStats], decompositions: dict[str, Decomposition],
               whitenings: dict[str, Whitening], ranks: dict[str, int | None],
               clock: StageClock) -> tuple[dict[str, FactorizedLinear], dict[str, LayerReport], dict[str, list[float]]]:
    """Each layer at its allocated rank (:func:`_factorize_layer`) or left dense, and its report; for the SGD solver,
    then every Z fitted at once. Returns the new layers, the reports and the SGD losses. A layer's float64 factors,
    whitening and residual are dropped once it is built: a large model (ViT-L) never holds all of them at once."""
    cfg = setup.cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    new_layers, reports, tasks = {}, {}, {}
    for name, layer in setup.layers.items():
        if ranks[name] is None:
            predicted = 0.0 if get_method(cfg.decomposition).loss_units else None
            reports[name] = LayerReport(name, layer.in_features, layer.out_features, None, 0, layer.weight.numel(),
                                        layer.weight.numel(), 0.0, 0.0, 0.0, predicted)
            continue
        new_layers[name], reports[name], task = _factorize_layer(
            setup, name, ranks[name], stats[name], decompositions.pop(name), whitenings.pop(name, None), generator,
            clock)
        if task is not None:
            tasks[name] = task
    if not tasks:
        return new_layers, reports, {}
    with clock.sub("sgd_fit"):
        own = settings_of(cfg, SgdSettings)
        history = fit_sgd(tasks, lr=own.sgd_lr, iterations=own.sgd_iterations, batch_size=own.sgd_batch_size,
                          seed=cfg.seed, progress=cfg.progress)
    for name, task in tasks.items():  # each Z in its layer, whose report gets its parameters and error now
        layer, new = setup.layers[name], new_layers[name]
        new.z = task.z.to(layer.weight.dtype)
        reports[name] = replace(reports[name], factored_params=_factored_params(new),
                                output_error=_output_error_now(stats[name], layer, new, clock))
    return new_layers, reports, history


def _factorize_layer(setup: _Setup, name: str, rank: int, stats: LayerStats, decomposition: Decomposition,
                     white: Whitening | None, generator: torch.Generator,
                     clock: StageClock) -> tuple[FactorizedLinear, LayerReport, SGDTask | None]:
    """Layer ``name`` as ``U V^T + Z`` (U V^T: the rank-``rank`` truncation of its decomposition) and its report. Z
    of eq. (10) for the residual R = W - U V^T is none, the decomposition's next singular triplets, the closed form
    on the whitened H, or the SGD solver's start and the task (sampled tokens X_i, targets X_i R) that fits it. The
    report's eq. (5) errors are measured unless the layer changes again (the refit; an SGD Z: after the fit)."""
    cfg, layer, z_params = setup.cfg, setup.layers[name], setup.z_params[name]
    weight = _weight(layer, setup.device)
    U, V = decomposition.factors(rank)
    residual = weight - U @ V.T
    err_lr = math.nan  # with refit the layer changes again; its errors are measured after the refit
    if not _revisits_images(cfg):
        with clock.sub("report_errors"):
            err_lr = output_error(stats, residual)
    z, task = None, None
    if _z_is_svd_tail(cfg):
        with clock.sub("svd_tail_z"):
            z = svd_tail_z(decomposition, rank, z_params)
    elif get_z_kind(cfg.compensation).fitted:  # never an output-side layer (statistics_space)
        problem = CompensationProblem(residual, white)
        if cfg.fits_z_by_sgd:
            z = init_z_for_sgd(cfg.compensation, problem, z_params, generator).float().to(setup.device)
            inputs = stats.samples.to(setup.device)
            task = SGDTask(z, inputs, (inputs.double() @ residual).float(), stats.sample_weights.to(setup.device))
        else:
            with clock.sub("closed_form_z"):
                z = closed_form_z(cfg.compensation, problem, z_params)
        del problem
    del residual, white
    dtype = layer.weight.dtype
    new = FactorizedLinear.from_factors(U.to(dtype), V.to(dtype), _centred_bias(layer, stats, weight, U, V, z),
                                        z.to(dtype) if z is not None else None).to(setup.device)
    predicted = 0.5 * float(decomposition.energy_tails()[rank]) if get_method(cfg.decomposition).loss_units else None
    err = math.nan if task is not None or _revisits_images(cfg) else _output_error_now(stats, layer, new, clock)
    return new, LayerReport(name, layer.in_features, layer.out_features, rank, z_params, layer.weight.numel(),
                            _factored_params(new), decomposition.energy_loss(rank), err_lr, err, predicted), task


def _centred_bias(layer: nn.Linear, stats: LayerStats, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                  z: nn.Module | None) -> torch.Tensor | None:
    """The new layer's bias: the dense one, plus mu^T (W - W_hat) where the statistics are of centred inputs (their
    token mean mu taken out), so that the layer's change on x is the change on x - mu the statistics measured."""
    bias = None if layer.bias is None else layer.bias.detach()
    if stats.token_mean is None or bias is None:
        return bias
    kept = U @ V.T if z is None else U @ V.T + z.dense().double()
    return (bias.double() + stats.token_mean.to(weight.device) @ (weight - kept)).to(bias.dtype)


def _refit(dense: nn.Module, model: nn.Module, setup: _Setup, stats: dict[str, LayerStats],
           new_layers: dict[str, FactorizedLinear], images: list[torch.Tensor], clock: StageClock) -> dict[str, float]:
    """``CompressionConfig.refit``: every factorized layer refitted, in forward order, for the compressed model's
    own inputs (:mod:`lowrank_vit.core.refit`), at the rank the allocation gave it. Returns each refitted layer's
    eq. (5) error: for statistics kept on its output side (exact only for weights in the range of W) measured by the
    refit on the dense inputs it sees anyway, else from the statistics (exact for any weight change)."""
    cfg, device, method = setup.cfg, setup.device, get_method(setup.cfg.decomposition)
    blocks = {block: names for block, block_layers in get_adapter(model).layers_by_block(dense).items()
              if (names := [name for name in block_layers if name in new_layers])}

    def centred(name: str) -> bool:
        return stats[name].token_mean is not None and setup.layers[name].bias is not None

    def output_side(name: str) -> bool:
        return stats[name].output_gram is not None

    errors: dict[str, float] = {}

    def fit(name: str, pair: PairGrams) -> None:
        layer, new = setup.layers[name], new_layers[name]
        weight = _weight(layer, device)
        U, V = method.refit(weight, stats[name], pair, cfg, new.rank).factors(new.rank)
        new.U.data.copy_(U)
        new.V.data.copy_(V)
        if new.bias is not None and layer.bias is not None:
            new.bias.data.copy_(refit_bias(layer.bias.detach().to(device), weight, U @ V.T, pair))
        if output_side(name):
            errors[name] = dense_output_error(pair, weight, weight - new.dense_weight().detach().double())
        stats[name].grad_gram = stats[name].grad_range_gram = None

    block_target = anchors_blocks(cfg)

    def anchored(name: str) -> bool:  # G kept on the input side (W G W^T) only serves W* = S W
        return block_target and stats[name].grad_gram is not None

    sequential_refit(dense, model, blocks, list(micro_batches(images, 32)), fit, centred=centred,
                     dense_gram=output_side, anchored=anchored, device=device, gram_precision=cfg.gram_precision,
                     progress=cfg.progress)
    for name, new in new_layers.items():
        if name not in errors:  # input-side statistics
            errors[name] = _output_error_now(stats[name], setup.layers[name], new, clock)
    return errors


def _reconstruct_blocks(dense: nn.Module, model: nn.Module, setup: _Setup, new_layers: dict[str, FactorizedLinear],
                        images: list[torch.Tensor]) -> dict[str, float]:
    """``CompressionConfig.block_reconstruction``: every block of the compressed model tuned, in forward order, so
    that its output on the compressed model's own inputs matches the dense block's (:mod:`lowrank_vit.core.
    blockwise`). Returns each factorized layer's output error on the dense inputs after it, pooled over the
    calibration tokens (sum ||x (W - W_hat) + db||^2 / sum ||x W||^2: any weight change, measured on the tokens)."""
    cfg = setup.cfg
    blocks = {block: [name for name in block_layers if name in new_layers]
              for block, block_layers in get_adapter(model).layers_by_block(dense).items()}
    weights = metric_weights(cfg.block_metric, dense, list(blocks), images,
                             lambda: _sampled_loss(dense, setup, images[0][:8]), setup.device, cfg.progress)
    result = block_reconstruction(dense, model, blocks, images, trainable=cfg.block_reconstruction,
                                  factorized=(FactorizedLinear, FactorizedAttention), steps=cfg.block_steps,
                                  lr=cfg.block_lr, batch_size=cfg.block_batch_size, seed=cfg.seed, device=setup.device,
                                  progress=cfg.progress, weights=weights)
    return result.layer_errors


def _distill(dense: nn.Module, model: nn.Module, setup: _Setup, images: list[torch.Tensor]) -> dict[str, Any]:
    """``CompressionConfig.distill_steps``: the compressed model trained end to end toward the dense one's outputs on
    augmented calibration images, under the compression's likelihood (:mod:`lowrank_vit.core.distill`); the stage's
    result as the report's ``distillation``."""
    cfg = setup.cfg
    likelihood = cfg.likelihood
    if likelihood == AUTO:  # a decomposition without a gradient pass left it unresolved
        likelihood = resolve_likelihood(dense, images[0][:8].to(setup.device), AUTO, cfg.output_key)
    result = distill_on_calibration(
        dense, model, torch.cat(images), lambda m, x: select_output(m(x), cfg.output_key),
        _distillation_loss(likelihood), steps=cfg.distill_steps,
        lr=cfg.distill_lr, batch_size=cfg.distill_batch_size, augment=cfg.distill_augment, seed=cfg.seed,
        device=setup.device, micro_batch=cfg.distill_micro_batch, progress=cfg.progress,
        features=list(get_adapter(model).layers_by_block(dense)) if cfg.distill_features else (),
        feature_weight=cfg.distill_features)
    return {**result.as_dict(), "likelihood": likelihood}


def _distillation_loss(likelihood: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The distillation's loss under a named likelihood (the fine-tune's: ``output_distillation_loss``); a
    ValueError for a likelihood that has none."""
    from lowrank_vit.stages.finetune import DISTILLATION_LIKELIHOODS, output_distillation_loss

    if likelihood not in DISTILLATION_LIKELIHOODS:
        raise ValueError(f"distill_steps: no distillation loss for the likelihood {likelihood!r}; use one of "
                         f"{', '.join(DISTILLATION_LIKELIHOODS)}, or distill_steps=0")
    return lambda student, teacher: output_distillation_loss(likelihood, student, teacher)


@torch.no_grad()
def _errors_on_tokens(dense: nn.Module, model: nn.Module, setup: _Setup, new_layers: dict[str, FactorizedLinear],
                      images: list[torch.Tensor]) -> dict[str, float]:
    """Each factorized layer's output error as the model holds it now, on the dense model's inputs over the
    calibration images (:func:`lowrank_vit.core.blockwise.measuring_layer_errors`)."""
    was_training = dense.training
    dense.eval()
    try:
        with measuring_layer_errors(dense, model, list(new_layers)) as errors:
            for batch in micro_batches(images, 32):
                dense(batch.to(setup.device))
    finally:
        dense.train(was_training)
    return errors


def _sampled_loss(dense: nn.Module, setup: _Setup, first: torch.Tensor) -> Callable[[Any], torch.Tensor | None]:
    """The likelihood's loss of a target drawn from the output itself (seeded by ``seed``), for a block metric that
    weighs by the output's sensitivity: "auto" resolved on ``first`` (calibration images) where no gradient pass did,
    then checked and fitted to their dense outputs as the gradient pass does."""
    cfg = setup.cfg
    likelihood = cfg.likelihood
    if likelihood == AUTO:  # a decomposition without a gradient pass left it unresolved
        likelihood = resolve_likelihood(dense, first.to(setup.device), AUTO, cfg.output_key)
    built, generator = build_likelihood(likelihood), torch.Generator().manual_seed(cfg.seed)
    output = model_output(dense, first.to(setup.device), cfg.output_key)
    built.check(output, output.shape[0])
    built.fit(output.float())
    return lambda out: built.sampled_loss(select_output(out, cfg.output_key), generator)


def _factored_params(new: FactorizedLinear) -> int:
    return new.U.numel() + new.V.numel() + (sum(p.numel() for p in new.z.parameters()) if new.z else 0)


def _output_error_now(stats: LayerStats, layer: nn.Linear, new: FactorizedLinear, clock: StageClock) -> float:
    """Eq. (5) of the layer as built (U V^T + Z) against the dense ``layer``."""
    with clock.sub("report_errors"):
        return output_error(stats, _weight(layer, clock.device) - new.dense_weight().detach().double())
