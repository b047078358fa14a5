"""Rank allocation across layers, Section 3.2: uniform, the greedy mixed-rank search of Algorithm 1, and the
marginal (Lagrangian) policy on absolute energies; registered by name in :data:`POLICIES`.

A layer of shape (k, m) costs k*m parameters while dense and r*(k+m) + z at rank r with a Z of z parameters. A
layer whose factored cost would not be below k*m is left dense (rank ``None``). Both policies work on energy-loss
curves computed once per layer (the paper's "SVD only once") and record every decision in a serializable plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowrank_vit.core.budget import Allocation, LayerBudget
from lowrank_vit.core.common import Registry, check_count, check_number, settings_of
from lowrank_vit.core.decompose import energy_loss_curve, energy_tail_curve


def check_feasible(layers: list[LayerBudget], budget: int, *, outside: int | None = None,
                   params_before: int | None = None) -> None:
    """Fail before any calibration when the target cannot be met. Given ``outside`` (the parameters the
    compression keeps as they are) and ``params_before`` (the whole model's), the message says the smallest
    reachable model and the largest reachable reduction, so the user knows what to ask for instead."""
    full = sum(layer.dense_params for layer in layers)
    smallest = sum(layer.params(1) for layer in layers if layer.max_rank >= 1)
    smallest += sum(layer.dense_params for layer in layers if layer.max_rank < 1)
    if budget >= full:
        raise ValueError(f"the target leaves {budget:,} parameters for the compressible layers, which already hold "
                         f"only {full:,}: nothing to compress")
    if budget >= smallest:
        return
    slow = sum(1 for layer in layers if layer.rank_limit == 0)
    why = (f" ({slow} layer(s) stay dense: no profiled rank of theirs is faster than dense on the latency table)"
           if slow else "")
    if outside is not None and params_before:
        lowest = outside + smallest
        largest = math.floor(10000 * (1 - lowest / params_before)) / 10000  # rounded down: reachable as printed
        raise ValueError(f"the target is unreachable: even rank 1 in every compressible layer (with its Z) needs "
                         f"{smallest:,} parameters there, and {outside:,} stay as they are, so the smallest reachable "
                         f"model has {lowest:,} parameters: the largest reachable reduction is {100 * largest:.2f}% "
                         f"(reduction={largest:g} or target_params={lowest:,}){why}")
    raise ValueError(f"the target is unreachable: even rank 1 in every compressible layer (with its Z) needs "
                     f"{smallest:,} parameters there, and the target leaves "
                     + (f"{budget:,}" if budget >= 0 else "none (it is below the parameters kept as they are)") + why)


def fill_slack(layers: list[LayerBudget], ranks: dict[str, int | None], budget: int, key, step: int = 1) -> int:
    """Spend what is left of the budget by raising one rank at a time to the next multiple of ``step`` (r + 1 for
    step 1), best ``key(layer, rank, new_rank)`` first, never exceeding the budget nor a layer's ``max_rank``."""
    total = sum(layer.params(ranks[layer.name]) for layer in layers)
    while True:
        best = None
        for layer in layers:
            r = ranks[layer.name]
            if r is None:
                continue
            new = (r // step + 1) * step
            if new > layer.max_rank or total + layer.params(new) - layer.params(r) > budget:
                continue
            score = key(layer, r, new)
            if best is None or score > best[0]:
                best = (score, layer, new)
        if best is None:
            return total
        _, layer, new = best
        total += layer.params(new) - layer.params(ranks[layer.name])
        ranks[layer.name] = new


def _gain(layer: LayerBudget, rank: int, new: int) -> float:
    return layer.loss(rank) - layer.loss(new)


def _gain_per_param(layer: LayerBudget, rank: int, new: int) -> float:
    return (layer.loss(rank) - layer.loss(new)) / (layer.params(new) - layer.params(rank))


def _uniform_deficit(layer: LayerBudget, rank: int, new: int) -> float:
    return -layer.params(rank) / layer.dense_params


def align_down(rank: int, multiple: int) -> int:
    """``rank`` rounded down to a multiple of ``multiple``; ranks below ``multiple`` are kept (rounding them to 0
    would drop the layer's whole low-rank term)."""
    return rank if rank < multiple else rank - rank % multiple


def _align_ranks(layers: list[LayerBudget], ranks: dict[str, int | None], budget: int, multiple: int, key) -> int:
    """Make every rank a multiple of ``multiple`` (a matrix product whose inner size is a multiple of 8 ran up to
    25% faster than its neighbours on our CPU, benchmarks/rank_alignment.py): round down, then hand the freed budget
    back one step to the next multiple at a time by the policy's own ``key``. What stays unspent is below one such
    step of the smallest layer."""
    for layer in layers:
        if ranks[layer.name] is not None:
            ranks[layer.name] = align_down(ranks[layer.name], multiple)
    return fill_slack(layers, ranks, budget, key, step=multiple)


def allocate_uniform(layers: list[LayerBudget], budget: int, rank_multiple: int = 1) -> Allocation:
    """The same retained fraction f of its dense parameters in every layer, the largest f that fits ``budget``;
    with ``rank_multiple`` > 1 every rank (from ``rank_multiple`` up) is then aligned to a multiple of it."""
    check_feasible(layers, budget)

    def ranks_for(f: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for layer in layers:
            if layer.max_rank < 1:
                out[layer.name] = None
                continue
            r = math.floor((f * layer.dense_params - layer.z_params) / layer.rank_step)
            out[layer.name] = min(max(r, 1), layer.max_rank)
        return out

    def cost(f: float) -> int:
        return sum(layer.params(r) for layer, r in zip(layers, ranks_for(f).values(), strict=True))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    ranks = ranks_for(lo)
    # Top up the layers furthest below the common fraction, so rounding does not waste budget.
    total = fill_slack(layers, ranks, budget, key=_uniform_deficit)
    if rank_multiple > 1:
        total = _align_ranks(layers, ranks, budget, rank_multiple, _uniform_deficit)
    return Allocation(ranks, total)


def schedule(step: int, start: int, target: int, gamma: float) -> float:
    """Eq. (9): the parameter count the search should have reached after ``step`` steps."""
    return target + (start - target) * math.exp(-step / gamma)


def allocate_greedy(layers: list[LayerBudget], budget: int, gamma: float = 80.0, iterations: int = 500,
                    tolerance: int = 0, rank_multiple: int = 1) -> Allocation:
    """Algorithm 1: at every step the schedule (eq. 9) says how many parameters to remove; every layer is tried,
    and the one whose cut loses the least normalized energy takes it. After ``iterations`` steps, any remainder is
    removed by the same rule (preferring cuts that overshoot by at most ``tolerance``); leftover slack below the
    budget is then given back one rank at a time where it recovers the most energy. With ``rank_multiple`` > 1
    the ranks are finally aligned to multiples of it, the freed budget again going where it recovers the most.
    """
    check_feasible(layers, budget)
    ranks: dict[str, int | None] = {layer.name: None for layer in layers}
    start = current = sum(layer.dense_params for layer in layers)
    trace: list[dict] = []
    step = 0
    while current > budget:
        step += 1
        goal = schedule(step, start, budget, gamma) if step <= iterations else budget
        need = math.ceil(current - goal)
        if need <= 0:
            continue
        best = None
        for layer in layers:
            r = ranks[layer.name]
            if r is None:
                if layer.max_rank < 1:
                    continue
                new = math.floor((layer.dense_params - need - layer.z_params) / layer.rank_step)
                new = min(max(new, 1), layer.max_rank)
            else:
                if r <= 1:
                    continue
                new = max(1, r - math.ceil(need / layer.rank_step))
            removed = layer.params(r) - layer.params(new)
            if removed <= 0:
                continue
            final = step > iterations
            overshoot_ok = not final or removed - need <= tolerance
            candidate = (not overshoot_ok, layer.loss(new), layer.name)
            if best is None or candidate < best[0]:
                best = (candidate, layer, new, removed)
        if best is None:  # cannot happen after check_feasible, but never loop forever
            raise RuntimeError("greedy allocation found no layer left to cut")
        _, layer, new, removed = best
        ranks[layer.name] = new
        current -= removed
        trace.append({"step": step, "layer": layer.name, "rank": new, "params": current})
    total = fill_slack(layers, ranks, budget, key=_gain)
    if rank_multiple > 1:
        total = _align_ranks(layers, ranks, budget, rank_multiple, _gain)
    return Allocation(ranks, total, trace)


def _exchange_slack(layers: list[LayerBudget], ranks: dict[str, int | None], budget: int, tolerance: int,
                    step: int = 1) -> int:
    """Bring the unspent budget below ``tolerance`` where rank steps allow: repeatedly lower one layer by ``step``
    ranks and raise a layer with a larger rank step by ``step``, choosing among the exchanges that fit the budget and
    spend more the one that loses the least energy. Layers of different widths make the leftover of one-rank steps
    as small as their differences (a block's qkv and proj differ by 2 x width)."""
    total = sum(layer.params(ranks[layer.name]) for layer in layers)
    for _ in range(4 * len(layers)):
        if budget - total <= tolerance:
            break
        best = None
        for down in layers:
            r = ranks[down.name]
            if r is None or r - step < 1:
                continue
            for up in layers:
                u = ranks[up.name]
                if up is down or u is None or u + step > up.max_rank or up.rank_step <= down.rank_step:
                    continue
                delta = step * (up.rank_step - down.rank_step)
                if total + delta > budget:
                    continue
                cost = (down.loss(r - step) - down.loss(r)) - (up.loss(u) - up.loss(u + step))
                if best is None or cost < best[0]:
                    best = (cost, down, up, delta)
        if best is None:
            break
        _, down, up, delta = best
        ranks[down.name] -= step
        ranks[up.name] += step
        total += delta
    return total


class _LagrangianTable:
    """Every layer's Lagrangian choice at a price, for all layers at once. The marginal policy's bisection asks ~200
    prices; a loop over layers building small tensors at each one spent its time on many tiny torch operations
    (0.3-0.7 s for a 48-layer DeiT-S), so the costs are laid out once in a (layers x largest rank) matrix and each
    price is one multiply-add and one arg min along the rows. The arithmetic is elementwise the per-layer one, in the
    same float64 order, so the choices are the same to the bit."""

    def __init__(self, layers: list[LayerBudget]):
        tops = [min(layer.max_rank, max(layer.energy_losses.numel() - 1, 1)) for layer in layers]
        self.names = [layer.name for layer in layers]
        self.rows = [i for i, top in enumerate(tops) if top >= 1]  # the others stay dense at any price
        self.always_dense = sum(layers[i].dense_params for i in range(len(layers)) if tops[i] < 1)
        width = max((tops[i] for i in self.rows), default=1)  # at least one column: argmin needs one
        # losses[row, r - 1] = loss(r) for r = 1..top; 0 where the curve is shorter than top (ranks beyond it lose
        # nothing), +inf beyond top so that the arg min never picks a rank the layer does not have
        self.losses = torch.full((len(self.rows), width), math.inf, dtype=torch.float64)
        for row, i in enumerate(self.rows):
            curve = layers[i].energy_losses.detach().double()[1: tops[i] + 1]
            self.losses[row, :curve.numel()] = curve
            self.losses[row, curve.numel(): tops[i]] = 0.0
        picked = [layers[i] for i in self.rows]
        self.rank_step = torch.tensor([layer.rank_step for layer in picked], dtype=torch.int64)
        self.z_params = torch.tensor([layer.z_params for layer in picked], dtype=torch.int64)
        self.dense_params = torch.tensor([layer.dense_params for layer in picked], dtype=torch.int64)
        ranks = torch.arange(1, width + 1, dtype=torch.float64)
        self.params = ranks * self.rank_step.double()[:, None] + self.z_params.double()[:, None]  # params(r), exact

    def choose(self, price: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the rank minimizing ``loss(r) + price * params(r)`` (the first, i.e. smallest, on ties) and
        whether dense (losing nothing) costs less than it."""
        cost = self.losses + price * self.params
        best = torch.argmin(cost, dim=1, keepdim=True)
        dense = price * self.dense_params.double() < cost.gather(1, best).squeeze(1)
        return best.squeeze(1) + 1, dense

    def total(self, price: float) -> int:
        """The parameters of the choices at ``price``, all layers together."""
        ranks, dense = self.choose(price)
        factored = ranks * self.rank_step + self.z_params
        return self.always_dense + int(torch.where(dense, self.dense_params, factored).sum())

    def ranks(self, price: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {name: None for name in self.names}
        ranks, dense = self.choose(price)
        for i, r, d in zip(self.rows, ranks.tolist(), dense.tolist(), strict=True):
            out[self.names[i]] = None if d else r
        return out


def allocate_marginal(layers: list[LayerBudget], budget: int, rank_multiple: int = 1,
                      tolerance: int = 0) -> Allocation:
    """Global allocation on *absolute* energies: the directions removed, across all layers at once, are those that
    lose the least energy per parameter freed (for the loss-aware method, the least predicted loss increase).

    Solved as its Lagrangian: for a price p per parameter every layer independently keeps the rank (or dense) that
    minimizes ``loss(r) + p params(r)``; the smallest p whose ranks fit ``budget`` is found by bisection (on
    non-increasing spectra that is exactly "cut the cheapest direction next", and unlike a one-rank-at-a-time
    search it handles the jump from dense to factored). What the bisection leaves unspent is handed back one rank at
    a time where it recovers the most energy per parameter; with ``rank_multiple`` > 1 ranks are then aligned the
    same way. If more than ``tolerance`` parameters are still unspent, one layer gives up a step and a wider one takes
    one, as long as that gets closer to the budget (:func:`_exchange_slack`). ``trace`` holds the price and, per
    layer, the price of its last kept direction."""
    check_feasible(layers, budget)
    table = _LagrangianTable(layers)
    hi = 1e-300
    while table.total(hi) > budget:
        hi *= 16.0
        if hi > 1e300:
            raise RuntimeError("marginal allocation: no price meets the budget (non-finite energies?)")
    lo = hi / 16.0
    for _ in range(200):  # geometric bisection: prices span many decades across models and units
        mid = (lo * hi) ** 0.5
        if mid <= lo or mid >= hi:
            break
        lo, hi = (mid, hi) if table.total(mid) > budget else (lo, mid)
    ranks = table.ranks(hi)
    spent = fill_slack(layers, ranks, budget, key=_gain_per_param)
    if rank_multiple > 1:
        spent = _align_ranks(layers, ranks, budget, rank_multiple, _gain_per_param)
    spent = _exchange_slack(layers, ranks, budget, tolerance, rank_multiple)
    trace: list[dict] = [{"price": hi}]
    for layer in layers:
        r = ranks[layer.name]
        last = None if r is None else (layer.loss(r - 1) - layer.loss(r)) / layer.rank_step
        trace.append({"layer": layer.name, "rank": r, "params": layer.params(r), "loss": layer.loss(r),
                      "last_price": last})
    return Allocation(ranks, spent, trace)


@dataclass(frozen=True)
class Policy:
    """An allocation policy as ``CompressionConfig.allocation`` names it: the per-layer curve it compares (computed
    once from each layer's spectrum) and how it spends the budget on those curves."""

    name: str
    curve: Callable[[torch.Tensor], torch.Tensor]
    """Singular values -> the loss of keeping r of them, for r = 0..p."""
    run: Callable[[list[LayerBudget], int, Any, int, Any], Allocation]
    """(layers, budget, config, tolerance, probe) -> the allocation; the config gives rank_multiple and the
    policy's own ``settings``; ``probe`` is a :class:`~lowrank_vit.core.probe.Probe` where
    ``needs_probe``, else None."""
    records_trace: bool = False
    """Whether ``Allocation.trace`` is part of the report (the marginal policy's prices)."""
    needs_probe: bool = False
    """Whether it measures the model with layers truncated (FLAR-SVD's and LEMS's searches): the pipeline then keeps
    the probe images and every layer's decomposition until the allocation is made."""
    settings: type | None = None
    """Its own typed settings (a dataclass validated on construction), read from ``CompressionConfig.settings``."""
    prices_latency: bool = False
    """Whether its curves are absolute losses comparable across layers, so that ``target_speedup`` can spend them
    per millisecond (:func:`lowrank_vit.core.latency.allocate_latency`)."""
    under_target: bool = False
    """Whether its ranks may hold fewer parameters than the budget by design (COMCAT's argmax ranks), so that a
    check of the reduction reached asks only that the target is not exceeded."""
    search: Callable[[Any, list, Any], Any] | None = None
    """A search that trains the model before it is calibrated (COMCAT's, :mod:`lowrank_vit.methods.comcat_search`):
    (model, calibration batches, the pipeline's setup) -> what ``run`` then reads in place of a probe. It may change
    the model's weights; ``plan`` cannot run it."""
    probe_forwards: Callable[[list[tuple[int, int]], Any], int] | None = None
    """Where ``needs_probe``: how many forward passes over the probe images it runs, from the layers' (in, out)
    shapes and its settings (the cost estimate of ``lowrank-vit reproduce --estimate`` reads it)."""


POLICIES: Registry[Policy] = Registry("allocation")


def register_policy(policy: Policy) -> Policy:
    return POLICIES.add(policy.name, policy)


get_policy = POLICIES.lookup


@dataclass(frozen=True)
class GreedySettings:
    """Algorithm 1's settings (the paper's Section 4.1 values)."""

    gamma: float = 80.0
    """Decay of the exponential schedule, eq. (9)."""
    greedy_iterations: int = 500
    """Iterations of Algorithm 1 on the schedule; any remainder is then removed greedily in final steps."""

    def __post_init__(self) -> None:
        check_number("gamma", self.gamma, "> 0")
        check_count("greedy_iterations", self.greedy_iterations)


def _greedy(layers: list[LayerBudget], budget: int, cfg: Any, tol: int, probe: Any) -> Allocation:
    own = settings_of(cfg, GreedySettings)
    return allocate_greedy(layers, budget, own.gamma, own.greedy_iterations, tol, cfg.rank_multiple)


register_policy(Policy("uniform", energy_loss_curve,
                       lambda layers, budget, cfg, tol, probe: allocate_uniform(layers, budget, cfg.rank_multiple)))
register_policy(Policy("greedy", energy_loss_curve, _greedy,  # Algorithm 1 compares normalized energy losses
                       settings=GreedySettings))
register_policy(Policy("marginal", energy_tail_curve,  # absolute energies: one unit across layers
                       lambda layers, budget, cfg, tol, probe: allocate_marginal(layers, budget, cfg.rank_multiple,
                                                                                 tol),
                       records_trace=True, prices_latency=True))
