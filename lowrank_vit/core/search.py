"""The peers' rank allocations (docs/peers.md), registered beside the library's own in
:data:`lowrank_vit.core.allocate.POLICIES`:

* "integer": the exact optimum of a separable layer-error model under the parameter budget, as an integer program
  (a multiple-choice knapsack solved by SciPy's HiGHS interface): the allocation step of LEMS, usable on any curve;
* "lems": LEMS (with KFAC-SVD): each layer's error model is its measured KL sensitivity scaled by its own normalized
  spectrum tail, ranks from 0.1 to 0.95 of the layer's equal-cost rank in multiples of 8, solved by "integer";
* "flar": FLAR-SVD's search: a per-layer binary search over ranks in multiples of 8 for the smallest rank whose
  head-feature error (only that layer truncated) stays under a threshold derived from uniform compression, then
  one common scale of the searched ranks to the budget (the layers left dense stay dense);
* "svd_llm_v2": SVD-LLM v2's heterogeneous ratios: within each kind of layer, a layer's compression ratio is
  inversely proportional to log of its truncation loss at the uniform ratio (uniform where those scores are invalid).

Where our version differs from the published code, and why, is in docs/peers.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lowrank_vit.core.allocate import Policy, align_down, allocate_uniform, check_feasible, fill_slack, register_policy
from lowrank_vit.core.budget import Allocation, LayerBudget
from lowrank_vit.core.common import check_count, check_number, settings_of
from lowrank_vit.core.decompose import energy_loss_curve, energy_tail_curve
from lowrank_vit.core.probe import Probe

Choice = tuple[int | None, int, float]
"""(rank, or None for dense; parameters; error) of one option of one layer."""


def equal_cost_rank(layer: LayerBudget) -> int:
    """floor(k m / (k + m)): the rank at which the factored layer costs what the dense one does (the peers' "eq_rank",
    on which their ratios and rank floors are defined)."""
    return layer.dense_params // layer.rank_step


def allocate_integer(choices: list[list[Choice]], names: list[str], budget: int,
                     time_limit: float = 180.0) -> Allocation:
    """The exact minimum of ``sum_l error_l(choice_l)`` subject to ``sum_l params_l(choice_l) <= budget``, one choice
    per layer: a 0/1 integer program (one variable per layer and option, one equality per layer, one budget row)
    solved by HiGHS through ``scipy.optimize.milp``. Ties go to the solver. Raises ValueError when no combination of
    the options fits the budget; a solver stopped by ``time_limit`` with a feasible point returns that point (the
    trace says so)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if len(choices) != len(names) or any(not options for options in choices):
        raise ValueError("every layer needs at least one option")
    smallest = sum(min(params for _, params, _ in options) for options in choices)
    if smallest > budget:
        raise ValueError(f"the integer program has no feasible allocation: the smallest option of every layer "
                         f"already needs {smallest:,} parameters, above the budget of {budget:,}")
    cost = np.array([error for options in choices for _, _, error in options], dtype=np.float64)
    if not np.isfinite(cost).all():
        raise ValueError("the integer program's layer errors must be finite")
    params = np.array([p for options in choices for _, p, _ in options], dtype=np.float64)
    rows = np.zeros((len(choices), cost.size))
    start = 0
    for i, options in enumerate(choices):
        rows[i, start: start + len(options)] = 1.0
        start += len(options)
    constraints = [LinearConstraint(rows, 1.0, 1.0), LinearConstraint(params[None, :], -np.inf, float(budget))]
    # HiGHS stops within an absolute gap of 1e-6 of the objective it sees: solved again with the errors in units of
    # the optimum found, until that optimum is the objective's own scale, so the answer is exact for any spread of
    # magnitudes (a relative gap of 0 as well)
    scale = float(np.abs(cost).max()) or 1.0
    for _ in range(4):
        result = milp(cost / scale, constraints=constraints, integrality=np.ones(cost.size), bounds=Bounds(0, 1),
                      options={"time_limit": float(time_limit), "disp": False, "mip_rel_gap": 0.0})
        if result.x is None or not 0.0 < result.fun < 0.1:  # infeasible, zero, or already of order 1
            break
        scale *= float(result.fun)
    if result.x is None:
        raise ValueError(f"the integer program found no feasible allocation within the budget of {budget:,} "
                         f"parameters ({result.message})")
    picked = np.round(result.x).astype(bool)
    ranks: dict[str, int | None] = {}
    total = 0
    start = 0
    for name, options in zip(names, choices, strict=True):
        index = int(np.argmax(picked[start: start + len(options)]))
        rank, p, _ = options[index]
        ranks[name] = rank
        total += p
        start += len(options)
    return Allocation(ranks, total, [{"objective": float(result.fun) * scale, "optimal": result.status == 0}])


def candidate_ranks(layer: LayerBudget, floor: float, ceiling: float, multiple: int) -> list[int]:
    """LEMS's candidate ranks: from floor(``floor`` x equal-cost rank) (at least 1) below floor(``ceiling`` x it),
    the multiples of ``multiple`` among them (all of them where none is), never above the layer's ``max_rank``."""
    eq = equal_cost_rank(layer)
    low = max(1, math.floor(floor * eq))
    high = min(max(low + 1, math.floor(ceiling * eq)), layer.max_rank + 1)
    ranks = list(range(low, high))
    aligned = [r for r in ranks if r % multiple == 0]
    return aligned or ranks


# ---------------------------------------------------------------------------------------------------------- LEMS


@dataclass(frozen=True)
class LemsSettings:
    """LEMS's settings (its published defaults for vision)."""

    rank_floor: float = 0.1
    """Smallest candidate rank as a fraction of the layer's equal-cost rank (0.1 for vision)."""
    rank_ceiling: float = 0.95
    """Candidate ranks stay below this fraction of the equal-cost rank (above it, the layer stays dense)."""
    rank_step: int = 8
    """Candidate ranks are multiples of this."""
    temperature: float = 0.6
    """Temperature of the KL divergence that measures each layer's sensitivity."""
    probe_images: int = 512
    """Calibration images the sensitivities are measured on (the first ones; at most the calibration set)."""
    time_limit: float = 180.0
    """Seconds the integer program may take."""

    def __post_init__(self) -> None:
        check_number("rank_floor", self.rank_floor, "(0, 1)")
        check_number("rank_ceiling", self.rank_ceiling, "(0, 1]")
        if self.rank_ceiling <= self.rank_floor:
            raise ValueError(f"rank_ceiling must lie in (rank_floor, 1], got {self.rank_ceiling!r} with rank_floor="
                             f"{self.rank_floor!r}")
        check_count("rank_step", self.rank_step)
        check_number("temperature", self.temperature, "> 0")
        check_count("probe_images", self.probe_images)
        check_number("time_limit", self.time_limit, "> 0")


def lems_choices(layer: LayerBudget, sensitivity: float, reference: int, candidates: list[int]) -> list[Choice]:
    """LEMS's error model of one layer: ``e(r) = KL * tail(r) / max(tail(r0), 1e-6)``, tail the layer's normalized
    spectrum tail (``layer.energy_losses``) and KL its measured sensitivity at the reference rank r0; the options
    are the candidate ranks and dense (no error)."""
    denominator = max(layer.loss(reference), 1e-6)
    options: list[Choice] = [(r, layer.params(r), sensitivity * layer.loss(r) / denominator) for r in candidates]
    return options + [(None, layer.dense_params, 0.0)]


def allocate_lems(layers: list[LayerBudget], budget: int, settings: LemsSettings, probe: Probe) -> Allocation:
    """LEMS: measure every layer's KL sensitivity at its floor rank (that layer alone truncated), build its error
    model (:func:`lems_choices`) and solve the integer program (:func:`allocate_integer`)."""
    check_feasible(layers, budget)
    choices, names, trace = [], [], []
    for layer in layers:
        if layer.max_rank < 1:  # no rank is cheaper than dense: the layer's one option
            choices.append([(None, layer.dense_params, 0.0)])
            names.append(layer.name)
            continue
        candidates = candidate_ranks(layer, settings.rank_floor, settings.rank_ceiling, settings.rank_step)
        reference = min(max(1, math.floor(settings.rank_floor * equal_cost_rank(layer))), layer.max_rank)
        kl = probe.kl({layer.name: reference}, settings.temperature)
        choices.append(lems_choices(layer, kl, reference, candidates))
        names.append(layer.name)
        trace.append({"layer": layer.name, "sensitivity": kl, "reference_rank": reference})
    try:
        allocation = allocate_integer(choices, names, budget, settings.time_limit)
    except ValueError as err:
        raise ValueError(f"{err}; LEMS's smallest candidate rank is rank_floor={settings.rank_floor:g} of each "
                         f"layer's equal-cost rank: lower settings['rank_floor'] or ask for a smaller reduction"
                         ) from None
    allocation.trace += trace + [{"probe_forwards": probe.calls}]
    return allocation


# ----------------------------------------------------------------------------------------------------- FLAR-SVD


@dataclass(frozen=True)
class FlarSettings:
    """FLAR-SVD's search settings (its published defaults)."""

    rank_step: int = 8
    """Ranks searched are multiples of this."""
    threshold: float | None = None
    """The head-feature error a layer may cause alone; None (the default): the error of the uniformly compressed
    model at the same budget divided by the number of layers."""
    probe_images: int = 512
    """Images the feature errors are measured on: the first calibration images (at most the calibration set), or,
    with ``held_out_probe``, this many images apart from them."""
    held_out_probe: bool = False
    """Measure on the ``probe_images`` images that follow the ``calib_samples`` calibration images in the data rather
    than on the calibration images themselves, as FLAR-SVD's published runs do (512 training images kept apart from
    its calibration set); the data must then hold ``calib_samples + probe_images`` images."""

    def __post_init__(self) -> None:
        check_count("rank_step", self.rank_step)
        if not isinstance(self.held_out_probe, bool):
            raise ValueError(f"held_out_probe must be true or false, got {self.held_out_probe!r}")
        if self.threshold is not None:
            check_number("threshold", self.threshold, "> 0")
        check_count("probe_images", self.probe_images)


def search_grid(layer: LayerBudget, step: int) -> list[int]:
    """The ranks FLAR-SVD's search tries: multiples of ``step`` up to the layer's ``max_rank`` (all ranks where the
    layer is too small for one multiple)."""
    grid = list(range(step, layer.max_rank + 1, step))
    return grid or list(range(1, layer.max_rank + 1))


def smallest_passing(grid: list[int], passes: Callable[[int], bool]) -> int | None:
    """Binary search of the smallest rank of ``grid`` (ascending) that ``passes``, assuming that larger ranks pass
    whenever a smaller one does; None when even the largest fails (the layer then stays dense)."""
    lo, hi, best = 0, len(grid) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if passes(grid[mid]):
            best, hi = grid[mid], mid - 1
        else:
            lo = mid + 1
    return best


def scale_to_budget(layers: list[LayerBudget], searched: dict[str, int | None], budget: int,
                    step: int) -> tuple[dict[str, int | None], int]:
    """FLAR-SVD's rule after its search: the layers the search left dense stay dense, and every searched rank is
    multiplied by one common factor c, rounded down to a multiple of ``step`` (at least the smallest rank of its
    grid), a layer going dense where its scaled rank passes its ``max_rank`` (no longer cheaper, or with a latency
    table no longer faster, than dense: the published latency rule). The published code sets c once from a linear
    interpolation of the model's FLOPs (by default), landing near the target; here c is the largest that fits ``budget``
    (bisection), so that every method of a comparison holds the same number of parameters, and what is left is handed
    back one grid step at a time to the searched layer furthest below its scaled share.

    Raises ``ValueError`` where the layers left dense, with every other layer at the smallest rank of its grid,
    already exceed ``budget``: the published rule cannot meet it (its own rounding would give such a layer rank 0),
    and compressing the layers the search found most sensitive, or ranks off its grid, would be another method."""
    scaled = [layer for layer in layers if searched[layer.name] is not None]
    floor = {layer.name: min(step, layer.max_rank) for layer in scaled}

    def ranks_for(c: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {layer.name: None for layer in layers}
        for layer in scaled:
            rank = max(align_down(math.floor(c * searched[layer.name]), step), floor[layer.name])
            out[layer.name] = None if rank > layer.max_rank else rank
        return out

    def cost(c: float) -> int:
        ranks = ranks_for(c)
        return sum(layer.params(ranks[layer.name]) for layer in layers)

    if cost(0.0) > budget:
        dense = len(layers) - len(scaled)
        raise ValueError(f"allocation 'flar' cannot meet the budget of {budget:,} parameters: with the {dense} "
                         f"layer(s) its search left dense kept dense (FLAR-SVD's rule) and every other layer at the "
                         f"smallest rank of its grid (rank_step={step}), the model still holds "
                         f"{cost(0.0) - budget:,} parameters more; ask for a smaller reduction, or raise "
                         f"settings['threshold'] (fewer layers left dense) or lower settings['rank_step']")
    lo, hi = 0.0, 1.0
    while cost(hi) <= budget and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    ranks = ranks_for(lo)
    share = {layer.name: max(lo * searched[layer.name], 1e-9) for layer in scaled}
    total = fill_slack(layers, ranks, budget, step=step,
                       key=lambda layer, r, new: -r / share.get(layer.name, math.inf))
    return ranks, total


def allocate_flar(layers: list[LayerBudget], budget: int, settings: FlarSettings, probe: Probe) -> Allocation:
    """FLAR-SVD's allocation: the threshold (given, or the head-feature error of uniform compression at this
    budget over the number of layers), every layer's smallest passing rank (:func:`smallest_passing` on
    :func:`search_grid`, that layer alone truncated), then :func:`scale_to_budget`."""
    check_feasible(layers, budget)
    threshold = settings.threshold
    if threshold is None:
        uniform = allocate_uniform(layers, budget, settings.rank_step).ranks
        threshold = probe.feature_error(uniform) / max(1, len(layers))
    searched: dict[str, int | None] = {}
    trace: list[dict] = [{"threshold": threshold}]
    for layer in layers:
        searched[layer.name] = smallest_passing(
            search_grid(layer, settings.rank_step),
            lambda r, name=layer.name: probe.feature_error({name: r}) <= threshold)
        trace.append({"layer": layer.name, "searched_rank": searched[layer.name]})
    ranks, total = scale_to_budget(layers, searched, budget, settings.rank_step)
    return Allocation(ranks, total, trace + [{"probe_forwards": probe.calls}])


# ---------------------------------------------------------------------------------------------------- SVD-LLM v2


def layer_kind(name: str) -> str:
    """The kind of a layer for SVD-LLM v2's groups: its name without the block and stage indices
    ("blocks.3.attn.qkv" -> "blocks.attn.qkv"), so every block's qkv is one group."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", "", name).strip(".")


SCORE_GUARD = 1e-12
"""Added to a truncation loss before its log, as the published reimplementation does (a loss of exactly 1 would
give an infinite score)."""


def truncation_loss(layer: LayerBudget, rank: int) -> float:
    """SVD-LLM v2's truncation loss of ``layer`` kept at ``rank``: the sum of its discarded singular values, to the
    first power, as the published reimplementation sums them (``layer.energy_losses`` holds the tails of their
    squares, so s_i = sqrt(tail_i - tail_(i+1)))."""
    tails = layer.energy_losses.double()  # tails[r] for r = 0..p, tails[p] = 0
    return float((tails[rank:-1] - tails[rank + 1:]).clamp_min(0.0).sqrt().sum())


def svd_llm_v2_scores(losses: list[float]) -> list[float] | None:
    """SVD-LLM v2's scores 1 / log(L_i + 1e-12) of one group's truncation losses, or None where they are not a valid
    allocation (their sum not a positive finite number: losses at or below 1 in the calibration's units)."""
    scores = [1.0 / math.log(value + SCORE_GUARD) if value + SCORE_GUARD != 1.0 else math.inf for value in losses]
    total = sum(scores)
    return scores if math.isfinite(total) and total > 0 else None


def svd_llm_v2_keeps(losses: list[float], keep: float) -> list[float]:
    """SVD-LLM v2's kept fractions of one group of n layers at the uniform kept fraction ``keep``: scores
    1 / log(L_i + 1e-12) of the layers' truncation losses L_i, compression ``n (1 - keep) score_i / sum(scores)``, kept
    fraction 1 minus that; the group's mean compression stays 1 - keep. Where the scores' sum is not a positive
    finite number (losses at or below 1 in the calibration's units), the published fallback: every layer of the group
    keeps ``keep``."""
    scores = svd_llm_v2_scores(losses)
    if scores is None:
        return [keep] * len(losses)
    total = sum(scores)
    return [1.0 - len(losses) * (1.0 - keep) * score / total for score in scores]


@dataclass(frozen=True)
class SvdLlmV2Settings:
    """SVD-LLM v2's one setting."""

    loss_tokens: int | None = None
    """The number of tokens the truncation losses are sums over. None (the default, as the published code): the
    calibration's own tokens, so the scores 1 / log(L) change with the number of calibration images; a count: the
    losses rescaled to a Gram summed over that many tokens (524,288 is SVD-LLM's language calibration set, 256
    sequences of 2,048 tokens; docs/peers.md measures both)."""

    def __post_init__(self) -> None:
        if self.loss_tokens is not None:
            check_count("loss_tokens", self.loss_tokens)


def allocate_svd_llm_v2(layers: list[LayerBudget], budget: int,
                        settings: SvdLlmV2Settings = SvdLlmV2Settings()) -> Allocation:
    """SVD-LLM v2's allocation. At the uniform kept fraction f0 that meets ``budget`` (every layer at floor(f0 x its
    equal-cost rank)), a layer's truncation loss L is the sum of its discarded singular values
    (:func:`truncation_loss`) in the decomposition's units (decomposition "svd_llm": the input Gram summed over the
    calibration tokens, or over ``settings.loss_tokens``). Within each kind of layer (:func:`layer_kind`) the kept
    fractions follow :func:`svd_llm_v2_keeps` (uniform where its scores are invalid). To land on the budget exactly
    (the published method fixes f0 and lands there only when a group's layers share one shape), every layer's
    compression 1 - keep is then scaled by one common factor (bisection) and the rest of the budget goes one rank at a
    time to the layers furthest below their own kept fraction."""
    check_feasible(layers, budget)
    live = [layer for layer in layers if layer.max_rank >= 1]

    def uniform_cost(f: float) -> int:
        return sum(layer.params(min(max(math.floor(f * equal_cost_rank(layer)), 1), layer.max_rank))
                   for layer in live) + sum(layer.dense_params for layer in layers if layer.max_rank < 1)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if uniform_cost(mid) <= budget else (lo, mid)
    f0 = lo
    groups: dict[str, list[LayerBudget]] = {}
    for layer in live:
        groups.setdefault(layer_kind(layer.name), []).append(layer)
    keeps: dict[str, float] = {}
    fallbacks: list[str] = []
    for kind, members in groups.items():
        losses = [truncation_loss(layer, min(max(1, math.floor(f0 * equal_cost_rank(layer))), layer.max_rank))
                  for layer in members]
        if svd_llm_v2_scores(losses) is None:
            fallbacks.append(kind)
        keeps.update(zip((layer.name for layer in members), svd_llm_v2_keeps(losses, f0), strict=True))

    def ranks_for(c: float) -> dict[str, int | None]:
        ranks: dict[str, int | None] = {layer.name: None for layer in layers}
        for layer in live:
            keep = 1.0 - c * (1.0 - keeps[layer.name])
            ranks[layer.name] = min(max(math.floor(keep * equal_cost_rank(layer)), 1), layer.max_rank)
        return ranks

    def cost(c: float) -> int:
        ranks = ranks_for(c)
        return sum(layer.params(ranks[layer.name]) for layer in layers)

    lo, hi = 0.0, 1.0
    while cost(hi) > budget and hi < 1e6:
        lo, hi = hi, 2 * hi
    for _ in range(60):  # the smallest common factor on the compressions that fits
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= budget else (mid, hi)
    ranks = ranks_for(hi)
    if cost(hi) > budget:
        raise ValueError(f"allocation 'svd_llm_v2' finds no ratios within the budget of {budget:,} parameters; use "
                         f"allocation 'uniform' or ask for a smaller reduction")
    target = {layer.name: max(keeps.get(layer.name, 1.0), 1e-9) * layer.dense_params for layer in layers}
    total = fill_slack(layers, ranks, budget, key=lambda layer, r, new: -layer.params(r) / target[layer.name])
    return Allocation(ranks, total, [{"uniform_kept_fraction": f0, "uniform_fallback_kinds": fallbacks}]
                      + [{"layer": name, "kept_fraction": keep} for name, keep in keeps.items()])


# -------------------------------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class IntegerSettings:
    """The integer program's settings."""

    rank_step: int = 1
    """Candidate ranks are multiples of this (every rank with 1)."""
    time_limit: float = 180.0
    """Seconds the solver may take."""

    def __post_init__(self) -> None:
        check_count("rank_step", self.rank_step)
        check_number("time_limit", self.time_limit, "> 0")


def allocate_integer_on_curves(layers: list[LayerBudget], budget: int, settings: IntegerSettings) -> Allocation:
    """The integer program on the layers' own curves (absolute energies, as "marginal" compares): every rank in
    multiples of ``rank_step`` from 1 to ``max_rank``, and dense."""
    check_feasible(layers, budget)
    choices = []
    for layer in layers:
        ranks = [r for r in range(1, layer.max_rank + 1) if r % settings.rank_step == 0 or r == 1]
        choices.append([(r, layer.params(r), layer.loss(r)) for r in ranks] + [(None, layer.dense_params, 0.0)])
    return allocate_integer(choices, [layer.name for layer in layers], budget, settings.time_limit)


register_policy(Policy("integer", energy_tail_curve,
                       lambda layers, budget, cfg, tol, probe: allocate_integer_on_curves(
                           layers, budget, settings_of(cfg, IntegerSettings)),
                       records_trace=True, settings=IntegerSettings, prices_latency=True))
def flar_probe_forwards(shapes: list[tuple[int, int]], settings: FlarSettings) -> int:
    """FLAR-SVD's forward passes: one for the threshold, then a binary search over each layer's grid."""
    grids = [len(search_grid(LayerBudget("", k, m, 0, torch.zeros(1)), settings.rank_step)) for k, m in shapes]
    return 1 + sum(math.ceil(math.log2(n + 1)) for n in grids)


register_policy(Policy("lems", energy_loss_curve,  # LEMS scales the normalized tail by a measured KL
                       lambda layers, budget, cfg, tol, probe: allocate_lems(layers, budget,
                                                                             settings_of(cfg, LemsSettings), probe),
                       records_trace=True, needs_probe=True, settings=LemsSettings,
                       probe_forwards=lambda shapes, settings: len(shapes)))  # one sensitivity per layer
register_policy(Policy("flar", energy_tail_curve,
                       lambda layers, budget, cfg, tol, probe: allocate_flar(layers, budget,
                                                                             settings_of(cfg, FlarSettings), probe),
                       records_trace=True, needs_probe=True, settings=FlarSettings,
                       probe_forwards=flar_probe_forwards))
register_policy(Policy("svd_llm_v2", energy_tail_curve,  # its truncation losses are absolute
                       lambda layers, budget, cfg, tol, probe: allocate_svd_llm_v2(layers, budget,
                                                                                   settings_of(cfg, SvdLlmV2Settings)),
                       records_trace=True, settings=SvdLlmV2Settings))
