"""COMCAT's automatic rank selection (Xiao et al. ICML 2023, Sec. 4.2; its public code's ``--search-rank``), the
allocation ``"comcat_search"`` beside the per-head factorization of :mod:`lowrank_vit.methods.comcat`.

COMCAT does not rank layers by their spectra: it *learns* the ranks. Every factorized unit (an attention module's
QK product, its VO product, each MLP linear) holds one architecture weight alpha_k per candidate rank r_k. The search
forward replaces the unit by a Gumbel-softmax mixture of its candidates' truncated SVDs,

    W_mix = sum_k m_k W(r_k),    m = softmax((alpha + g) / tau),  g ~ Gumbel(0, 1),

and accumulates the expected parameter count ``P = sum_units sum_k m_k params(r_k)``. The loss is the task loss,
multiplied by ``(P / target)^beta`` while P is above the target, so the gradient on alpha trades accuracy for size.
Rounds alternate: one search pass (only alpha learns), every unit set to its argmax candidate, the temperature
annealed, then the model's weights trained at those ranks with distillation from the dense model. Then the usual
partial fine-tune (the library's stage) follows.

Two facts make this cheap here:

* A mixture of truncations of one SVD is one diagonal mask on its singular values: ``sum_k m_k U_{:r_k} S V_{:r_k}^T
  = U diag(w * s) V^T`` with ``w_j = sum_{k: r_k > j} m_k`` (:func:`mixture_mask`). Scores and value-output maps
  are linear in the products, so the same holds for the attention units. The search model is the dense model with
  every unit at full rank and a mask on its rank dimension.
* After the search the trained, rank-r products are written back into the dense layers (rank r exactly), so the
  pipeline's own COMCAT factorization at the searched ranks reproduces them without error; its statistics,
  reports, checkpoints and export are the usual ones.

Where this differs from the public code (docs/peers.md has the table): the search and the weight training run on the
images given to ``compress`` (the public code searches on ImageNet's validation split and trains on its training
split); the classifier head, which the public code also factorizes, stays dense, as every method here leaves it;
the target is the library's parameter budget of the factorized units; the argmax ranks are held to that budget (the
public code does not check them): a unit over it steps down to its next smaller candidate, the one whose architecture
weights prefer it least first.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from lowrank_vit.core.allocate import Policy, register_policy
from lowrank_vit.core.budget import Allocation, LayerBudget
from lowrank_vit.core.common import batch_images, batch_labels, check_count, check_number, settings_of
from lowrank_vit.core.decompose import energy_loss_curve, truncated_svd
from lowrank_vit.core.likelihood import build_likelihood, select_output
from lowrank_vit.core.progress import progress_bar
from lowrank_vit.methods import comcat
from lowrank_vit.nn.adapters import get_adapter
from lowrank_vit.nn.comcat import attention_geometry

# ---------------------------------------------------------------------------------------------------------------------
# Candidate ranks (the public code's tables, and their generalization to other widths)

PUBLIC_LINEAR_CANDIDATES: dict[int, tuple[int, ...]] = {
    192: (6, 12, 24, 48, 64, 96, 128, 144),
    384: (12, 24, 32, 48, 64, 96, 128, 144, 192, 288),
    768: (24, 32, 48, 64, 128, 192, 256, 320, 384, 448, 512),
}
"""A linear layer's candidate ranks by its smaller dimension (``SVDLinear4AutoRank.Rank_Step_Size``)."""
PUBLIC_ATTENTION_CANDIDATES: dict[int, tuple[int, ...]] = {
    192: (32, 64, 96, 128, 160),
    384: (64, 128, 192, 256, 320),
    768: (128, 192, 256, 320, 384, 448, 512),
}
"""An attention module's candidate ranks by its width, summed over its heads: every head gets ``r // heads``
(``AttentionNewSVD4AutoRank.Rank_Step_Size``)."""


def candidate_ranks(width: int, table: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
    """The candidates of a unit of ``width``: the public set where the table has that width, else the set of the
    nearest tabulated width (on a log scale) scaled by ``width / that width``, rounded, at least 1 and below
    ``width``, duplicates dropped. The public sets are fractions of the width (1/32 to 3/4 for linears, 1/6 to 5/6 for
    attention), so scaling keeps what they mean."""
    check_count("width", width)
    if width in table:
        return table[width]
    nearest = min(table, key=lambda w: (abs(math.log(width / w)), w))
    scaled = {min(width - 1, max(1, round(r * width / nearest))) for r in table[nearest]}
    return tuple(sorted(scaled)) if width > 1 else (1,)


# ---------------------------------------------------------------------------------------------------------------------
# The search's small pure pieces


def gumbel_softmax(alpha: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """softmax((alpha + g) / tau) with g ~ Gumbel(0, 1) drawn from ``generator`` on the host (seeded: the same draws
    on every device)."""
    uniform = torch.rand(alpha.shape, generator=generator).clamp_(1e-10, 1.0 - 1e-7).to(alpha.device)
    return torch.softmax((alpha - torch.log(-torch.log(uniform))) / tau, dim=-1)


def mixture_mask(weights: torch.Tensor, ranks: torch.Tensor, length: int) -> torch.Tensor:
    """The diagonal mask w (length,) on the singular values whose product equals the mixture of the candidates'
    truncations: ``w_j = sum_k weights_k [j < ranks_k]``. A one-hot ``weights`` gives the hard truncation at that
    candidate."""
    positions = torch.arange(length, device=weights.device)
    return ((positions[None, :] < ranks.to(weights.device)[:, None]).to(weights.dtype) * weights[:, None]).sum(0)


def penalized_loss(task_loss: torch.Tensor, params: torch.Tensor, target: float, beta: float) -> torch.Tensor:
    """The public search loss: the task loss times ``(params / target)^beta`` while the expected parameter count is
    above the target, the task loss alone below it."""
    if float(params) > target:
        return task_loss * (params / target) ** beta
    return task_loss


def temperature_at(search: int, searches: int, start: float, end: float) -> float:
    """Gumbel temperature of search pass ``search`` (0-based) out of ``searches``: exponential annealing from
    ``start`` by the factor ``(end / start)^(1 / (searches + 1))`` after every pass, as the public code's
    ``exp_anneal_rate`` over its epochs (one more epoch than search passes)."""
    return start * (end / start) ** (search / (searches + 1))


# ---------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class ComcatSearchSettings:
    """COMCAT's search (public values in docs/peers.md). The defaults finish in a minute or two on a CPU for a small
    model; the registry's rows set the public schedule."""

    search_rounds: int = 4
    """Rounds of (search pass, argmax ranks, weight training); the first round trains at the largest candidates
    without a search pass, as the public code's first epoch. Public: 30 epochs."""
    search_steps: int | None = None
    """Batches of one search pass; None: one pass over the images (public: one pass over its search split)."""
    train_steps: int | None = None
    """Batches of weight training per round; None: one pass over the images (public: one epoch of ImageNet)."""
    search_batch_size: int = 32
    """Images per search and training step (public ``--batch-size-search`` 128)."""
    arch_lr: float = 1e-2
    """AdamW learning rate of the architecture weights (public 1e-2)."""
    arch_weight_decay: float = 5e-4
    """Their weight decay (public 5e-4)."""
    weight_lr: float = 1e-4
    """AdamW learning rate of the model's weights between search passes (public: 5e-4 scaled by batch / 512)."""
    weight_decay: float = 0.05
    """Their weight decay (public 0.05)."""
    temperature: float = 5.0
    """Initial Gumbel-softmax temperature (public 5)."""
    final_temperature: float = 0.1
    """Temperature the exponential annealing aims at after the last round (public 0.1)."""
    beta: float = 1.5
    """Exponent of the parameter penalty (public ``--beta-search`` 1.5)."""
    align_weight: float = 0.5
    """Weight of the block-output alignment to the dense model during weight training (public ``--with-align``:
    mean squared error of the first two and last two blocks' outputs, weight 0.5 decayed by cos(pi/2 t/T) a round,
    at least 0.01); 0 switches it off."""
    seed: int = 0
    """Gumbel draws, batch order and dropout: the search is deterministic under a seed."""

    def __post_init__(self) -> None:
        check_count("search_rounds", self.search_rounds)
        for name in ("search_steps", "train_steps"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name))
        check_count("search_batch_size", self.search_batch_size)
        for name in ("arch_lr", "temperature", "final_temperature", "beta"):
            check_number(name, getattr(self, name), "> 0")
        for name in ("arch_weight_decay", "weight_lr", "weight_decay", "align_weight"):
            check_number(name, getattr(self, name), ">= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Search units: one architecture-weight vector each, applied as a mask on a full-rank factorization


class _Unit:
    """One searched unit: a linear layer, or one product (QK or VO) of one attention module."""

    def __init__(self, name: str, candidates: tuple[int, ...], per_candidate_params: list[int], length: int,
                 repeat: int, members: list[str]) -> None:
        self.name, self.candidates, self.length, self.repeat, self.members = name, candidates, length, repeat, members
        self.params = torch.tensor(per_candidate_params, dtype=torch.float64)
        self.ranks = torch.tensor(candidates)
        # public initialization: every candidate weighted 1 / K
        self.alpha = nn.Parameter(torch.full((len(candidates),), 1.0 / len(candidates)))
        self.index = len(candidates) - 1  # the largest candidate until the first search pass
        self.mask: torch.Tensor = self.hard_mask()

    def hard_mask(self) -> torch.Tensor:
        return mixture_mask(F.one_hot(torch.tensor(self.index), len(self.candidates)).float(), self.ranks,
                            self.length).repeat(self.repeat)

    def sample(self, tau: float, generator: torch.Generator) -> torch.Tensor:
        """Draw the mixture for one search step; returns this unit's expected parameter count (differentiable)."""
        weights = gumbel_softmax(self.alpha, tau, generator)
        self.mask = mixture_mask(weights, self.ranks, self.length).repeat(self.repeat)
        return (weights.double() * self.params.to(weights.device)).sum()

    def settle(self, index: int) -> None:
        self.index = index
        self.mask = self.hard_mask()

    @property
    def rank(self) -> int:
        return int(self.candidates[self.index])


class _Masked(nn.Module):
    """A parametrization multiplying a weight's rows (or a bias) by its unit's current mask."""

    def __init__(self, unit: _Unit) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.unit.mask.to(weight.device, weight.dtype)
        return weight * (mask[:, None] if weight.ndim == 2 else mask)


class _MaskedLinear(nn.Module):
    """``x -> ((x L^T) * mask) R^T + b``: a linear layer as its full SVD (singular values split evenly), its rank
    dimension masked by its unit."""

    def __init__(self, layer: nn.Linear, unit: _Unit) -> None:
        super().__init__()
        weight = layer.weight.detach().double()
        P, s, Q = truncated_svd(weight.T)  # W = weight^T (in, out) = P diag(s) Q^T
        root = s.sqrt()
        self.left = nn.Parameter((P * root).T.to(layer.weight.dtype).contiguous())  # (p, in)
        self.right = nn.Parameter((Q * root).to(layer.weight.dtype).contiguous())  # (out, p)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.left) * self.unit.mask.to(x.device, x.dtype)
        return F.linear(hidden, self.right, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The weight (out, in) of rank ``unit.rank`` this layer computes with its hard mask."""
        mask = self.unit.hard_mask().to(self.right.device, self.right.dtype)
        return (self.right * mask) @ self.left


def _units(layers: dict[str, nn.Linear], modules: dict[str, nn.Module]) -> list[_Unit]:
    """One search unit per linear layer and per product of every attention module, with its candidates and their
    parameter costs in the library's own counting (the allocation's units)."""
    units: list[_Unit] = []
    for name, layer in layers.items():
        budget = LayerBudget(name, layer.in_features, layer.out_features, 0, torch.zeros(1))
        length = min(layer.in_features, layer.out_features)
        candidates = candidate_ranks(length, PUBLIC_LINEAR_CANDIDATES)
        units.append(_Unit(name, candidates, [budget.params(r) for r in candidates], length, 1, [name]))
    heads = {budget.name: budget for budget in comcat.head_budgets(modules)}
    for name, attn in modules.items():
        geom = attention_geometry(attn, name)
        totals = candidate_ranks(geom.num_heads * geom.head_dim, PUBLIC_ATTENTION_CANDIDATES)
        per_head = tuple(sorted({min(geom.head_dim, max(1, r // geom.num_heads)) for r in totals}))
        for product in comcat.PRODUCTS:
            members = [comcat.unit_name(name, product, h) for h in range(geom.num_heads)]
            cost = [sum(heads[m].params(r) for m in members) for r in per_head]
            units.append(_Unit(f"{name}.{product}", per_head, cost, geom.head_dim, geom.num_heads, members))
    return units


def _masked_attention(name: str, attn: nn.Module, units: dict[str, _Unit]) -> nn.Module:
    """The full-rank :class:`~lowrank_vit.nn.comcat.FactorizedAttention` of ``attn`` (every head's products by their
    SVDs) with its query rows masked by the QK unit and its value rows by the VO unit."""
    full = comcat.factorize_attention(name, attn, comcat.head_decompositions({name: attn}), {})
    for product, targets in (("qk", ("q_weight", "q_bias")), ("vo", ("v_weight",))):
        for target in targets:
            if getattr(full, target, None) is not None:
                parametrize.register_parametrization(full, target, _Masked(units[f"{name}.{product}"]))
    return full.to(attn.qkv.weight.device)


@contextmanager
def _swapped(model: nn.Module, layers: dict[str, nn.Linear], modules: dict[str, nn.Module],
             units: dict[str, _Unit]) -> Iterator[None]:
    """The model with every unit replaced by its masked full-rank factorization, built from the SVD of the unit's
    current weights (so the candidates are truncations of what the last round trained, as the public code's are);
    on leaving, each unit's product at its hard rank is written back into the dense module, which returns."""
    masked: dict[str, nn.Module] = {name: _MaskedLinear(layer, units[name]) for name, layer in layers.items()}
    masked.update({name: _masked_attention(name, attn, units) for name, attn in modules.items()})
    for name, module in masked.items():
        model.set_submodule(name, module)
    try:
        yield
    finally:
        for name, layer in layers.items():
            _write_back_linear(layer, masked[name])
            model.set_submodule(name, layer)
        for name, attn in modules.items():
            _write_back_attention(name, attn, masked[name], units)
            model.set_submodule(name, attn)


# ---------------------------------------------------------------------------------------------------------------------
# Writing the searched model back into the dense one


@torch.no_grad()
def _write_back_linear(dense: nn.Linear, searched: _MaskedLinear) -> None:
    dense.weight.copy_(searched.dense_weight().to(dense.weight.dtype))
    if dense.bias is not None and searched.bias is not None:
        dense.bias.copy_(searched.bias)


@torch.no_grad()
def _write_back_attention(name: str, dense: nn.Module, searched: nn.Module, units: dict[str, _Unit]) -> None:
    """The dense timm attention that computes what the masked full-rank factorization computes at its hard ranks:
    W_Q^h = A_h / scale (the scale is folded into A), W_K^h = B_h, W_V^h = C_h, W_O^h = D_h^T, k and v biases zero
    (b_V was folded into the output bias, b_K cancels in the softmax). Its head products then have the searched
    ranks exactly."""
    geom = attention_geometry(dense, name)
    if geom.out_bias and dense.proj.bias is None:
        raise ValueError(f"{name}: the v bias of this attention has no output bias to fold into; "
                         "allocation='comcat_search' cannot write its searched heads back")
    qk, vo = units[f"{name}.qk"].hard_mask(), units[f"{name}.vo"].hard_mask()
    with parametrize.cached():
        q, k, v, o = searched.q_weight, searched.k_weight, searched.v_weight, searched.o_weight
        q_bias, o_bias = searched.q_bias, searched.o_bias
    q, v = q * qk[:, None].to(q), v * vo[:, None].to(v)  # already masked by the unit's current mask: the hard one
    attn_dim = geom.num_heads * geom.head_dim
    weight = dense.qkv.weight
    weight[:attn_dim] = (q / geom.scale).to(weight.dtype)
    weight[attn_dim: 2 * attn_dim] = k.to(weight.dtype)
    weight[2 * attn_dim:] = v.to(weight.dtype)
    if dense.qkv.bias is not None:
        dense.qkv.bias.zero_()
        if q_bias is not None:
            dense.qkv.bias[:attn_dim] = (q_bias * qk.to(q_bias) / geom.scale).to(weight.dtype)
    dense.proj.weight.copy_(o.to(dense.proj.weight.dtype))
    if dense.proj.bias is not None:
        dense.proj.bias.copy_(o_bias.to(dense.proj.bias.dtype))
    if geom.relative_position:  # Swin's table was trained with the rest
        dense.relative_position_bias_table.copy_(searched.relative_position_bias_table)


# ---------------------------------------------------------------------------------------------------------------------
# The search


@dataclass
class SearchResult:
    """What the search found: per-unit ranks keyed as the pipeline's allocation units, and its trace."""

    ranks: dict[str, int | None]
    trace: list[dict[str, Any]] = field(default_factory=list)

    def allocation(self, layers: list[LayerBudget], budget: int) -> Allocation:
        names = {layer.name for layer in layers}
        if set(self.ranks) != names:
            missing = sorted(names - set(self.ranks))[:3] or sorted(set(self.ranks) - names)[:3]
            raise ValueError(f"the COMCAT search's units do not match the allocation's (first differences: {missing})")
        spent = sum(layer.params(self.ranks[layer.name]) for layer in layers)
        return Allocation(dict(self.ranks), spent, self.trace)


def _batches(images: list[torch.Tensor], labels: list[torch.Tensor | None], size: int, steps: int | None,
             generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``steps`` batches of ``size`` images in a seeded order (one pass when ``steps`` is None), with their labels
    where every batch had some."""
    x = torch.cat(images)
    y = torch.cat(labels) if labels and all(label is not None for label in labels) else None
    count = steps if steps is not None else max(1, math.ceil(x.shape[0] / size))
    order = torch.randperm(x.shape[0], generator=generator)
    for step in range(count):
        if (step * size) % x.shape[0] + size > x.shape[0] and step:  # wrapped around: a new order
            order = torch.randperm(x.shape[0], generator=generator)
        start = (step * size) % x.shape[0]
        pick = order[start: start + size]
        yield x[pick], (None if y is None else y[pick])


def _task_loss(output: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, categorical: bool,
               distill: bool) -> torch.Tensor:
    """Classifiers: cross-entropy on the labels while searching (public), and DeiT's hard distillation while
    training (half on the labels, half on the dense model's argmax); without labels, the dense model's argmax in
    their place. Other outputs (features, maps): the mean squared error to the dense output."""
    if not categorical:
        return F.mse_loss(output.float(), teacher.float())
    hard = teacher.argmax(dim=1)
    if labels is None:
        return F.cross_entropy(output.float(), hard)
    if distill:
        return 0.5 * F.cross_entropy(output.float(), labels) + 0.5 * F.cross_entropy(output.float(), hard)
    return F.cross_entropy(output.float(), labels)


@contextmanager
def _block_outputs(model: nn.Module, names: list[str], store: dict[str, torch.Tensor]) -> Iterator[None]:
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, key=name: store.__setitem__(key, out)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _align_blocks(model: nn.Module) -> list[str]:
    """The public alignment's blocks: the first two and the last two (fewer in a shallower model)."""
    blocks = list(get_adapter(model).layers_by_block(model))
    picked = [blocks[i] for i in (0, 1, -2, -1) if -len(blocks) <= i < len(blocks)]
    return list(dict.fromkeys(picked))


def comcat_search(model: nn.Module, calib_batches: Iterable, layers: dict[str, nn.Linear],
                  modules: dict[str, nn.Module], budget: int, settings: ComcatSearchSettings, *,
                  likelihood: Any = "categorical", output_key: Any = None, calib_samples: int | None = None,
                  device: torch.device | None = None, progress: bool = True) -> SearchResult:
    """Run COMCAT's search on ``model`` (changed in place: its searched layers are left at the searched ranks, their
    weights trained) and return the ranks per allocation unit.

    Args:
        calib_batches: the images (tensors, (images, labels) pairs or dicts), already preprocessed; the first
            ``calib_samples`` are used.
        layers / modules: the linear units and the attention modules (COMCAT's head units), by name.
        budget: the parameters the units may hold together (the pipeline's budget).
        likelihood: "categorical" for class logits (cross-entropy on labels or on the dense argmax), anything else
            for a mean squared error to the dense output.
    """
    device = device or next(model.parameters()).device
    images, labels, seen = [], [], 0
    for batch in calib_batches:
        x = batch_images(batch)
        if x is None:
            raise ValueError("the COMCAT search needs image tensors in its calibration batches")
        take = x.shape[0] if calib_samples is None else min(x.shape[0], calib_samples - seen)
        if take <= 0:
            break
        images.append(x[:take].detach())
        y = batch_labels(batch)
        labels.append(None if y is None else y[:take])
        seen += take
    if not images:
        raise ValueError("the COMCAT search needs at least one calibration image")
    categorical = build_likelihood(likelihood).categorical if isinstance(likelihood, str) else False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return _search(model, images, labels, layers, modules, budget, settings, categorical, output_key, device,
                       progress)


def _search(model, images, labels, layers, modules, budget, settings, categorical, output_key, device, progress):
    s, generator = settings, torch.Generator().manual_seed(settings.seed)
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]  # the caller's choice, given back at the end
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    units = _units(layers, modules)
    by_name = {u.name: u for u in units}
    arch = torch.optim.AdamW([u.alpha for u in units], lr=s.arch_lr, weight_decay=s.arch_weight_decay)
    align = _align_blocks(model) if s.align_weight > 0 else []
    align_weight = s.align_weight
    trace: list[dict[str, Any]] = []
    searches = s.search_rounds - 1
    per_pass = math.ceil(sum(x.shape[0] for x in images) / s.search_batch_size)
    total = searches * (s.search_steps or per_pass) + s.search_rounds * (s.train_steps or per_pass)
    with progress_bar(total, "COMCAT search", "step", progress) as bar:
        for round_ in range(s.search_rounds):
            with _swapped(model, layers, modules, by_name):
                model.requires_grad_(True)
                if round_ > 0:
                    tau = temperature_at(round_ - 1, searches, s.temperature, s.final_temperature)
                    expected = _search_pass(model, teacher, units, arch, images, labels, budget, tau, s,
                                            categorical, output_key, device, generator, bar)
                    _settle_argmax(units)
                    trace.append({"round": round_, "temperature": tau, "expected_params": expected,
                                  "params": sum(int(u.params[u.index]) for u in units),
                                  "ranks": {u.name: u.rank for u in units}})
                    # the public alignment weight: multiplied by cos(pi/2 t/T) every round, never below 0.01
                    align_weight = max(align_weight * math.cos(math.pi / 2 * round_ / s.search_rounds), 0.01)
                if round_ == s.search_rounds - 1:
                    _fit_budget(units, budget)  # written back at these ranks whatever the training does
                optimizer = torch.optim.AdamW(list(model.parameters()), lr=s.weight_lr, weight_decay=s.weight_decay)
                _train_pass(model, teacher, optimizer, images, labels, s, categorical, output_key, device,
                            generator, align, align_weight if align else 0.0, bar)
    model.train(was_training)
    for p in frozen:
        p.requires_grad_(False)
    trace.append({"final": True, "params": sum(int(u.params[u.index]) for u in units), "budget": budget,
                  "ranks": {u.name: u.rank for u in units}})
    return SearchResult({member: unit.rank for unit in units for member in unit.members}, trace)


def _outputs(model, x, output_key):
    return select_output(model(x), output_key)


def _search_pass(search_model, teacher, units, arch, images, labels, budget, tau, s, categorical, output_key, device,
                 generator, bar) -> float:
    """One pass updating only the architecture weights; returns the last expected parameter count."""
    search_model.train()
    expected = 0.0
    for x, y in _batches(images, labels, s.search_batch_size, s.search_steps, generator):
        x = x.to(device)
        with torch.no_grad():
            target = _outputs(teacher, x, output_key)
        params = sum(unit.sample(tau, generator) for unit in units)
        output = _outputs(search_model, x, output_key)
        loss = penalized_loss(_task_loss(output, target, None if y is None else y.to(device), categorical, False),
                              params, float(budget), s.beta)
        arch.zero_grad()
        search_model.zero_grad(set_to_none=True)
        loss.backward()
        arch.step()
        expected = float(params)
        bar.update(1)
    search_model.zero_grad(set_to_none=True)
    return expected


def _settle_argmax(units: list[_Unit]) -> None:
    """Every unit at its argmax candidate (the public ``set_rank(use_argmax=True)``); a candidate above the unit's
    current rank would restore nothing the last training kept, so the argmax is taken among those at or below it."""
    for unit in units:
        allowed = unit.alpha.detach()[: unit.index + 1]
        unit.settle(int(allowed.argmax()))


def _fit_budget(units: list[_Unit], budget: int) -> None:
    """Hold the argmax ranks to the budget: while over it, the unit whose architecture weights prefer its next
    smaller candidate the most (smallest drop in alpha) steps down to it."""
    while sum(int(u.params[u.index]) for u in units) > budget:
        movable = [u for u in units if u.index > 0]
        if not movable:
            raise ValueError(f"the COMCAT search's smallest candidates need "
                             f"{sum(int(u.params[0]) for u in units):,} parameters, above the budget of {budget:,}")
        unit = min(movable, key=lambda u: (float(u.alpha[u.index] - u.alpha[u.index - 1]), u.name))
        unit.settle(unit.index - 1)


def _train_pass(search_model, teacher, optimizer, images, labels, s, categorical, output_key, device, generator,
                align, align_weight, bar) -> None:
    """Weight training at the current hard ranks with distillation from the dense model (and the block alignment)."""
    search_model.train()
    for x, y in _batches(images, labels, s.search_batch_size, s.train_steps, generator):
        x = x.to(device)
        dense_blocks: dict[str, torch.Tensor] = {}
        blocks: dict[str, torch.Tensor] = {}
        with torch.no_grad(), _block_outputs(teacher, align, dense_blocks):
            target = _outputs(teacher, x, output_key)
        with _block_outputs(search_model, align, blocks):
            output = _outputs(search_model, x, output_key)
        loss = _task_loss(output, target, None if y is None else y.to(device), categorical, True)
        if align:
            loss = loss + align_weight * sum(F.mse_loss(blocks[n].float(), dense_blocks[n].float()) for n in align)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)


# ---------------------------------------------------------------------------------------------------------------------
# The allocation policy


def _run(layers: list[LayerBudget], budget: int, cfg: Any, tol: int, found: Any) -> Allocation:
    if not isinstance(found, SearchResult):
        raise ValueError("allocation='comcat_search' takes its ranks from the search compress runs first; "
                         "it cannot allocate from spectra alone (use compress, not plan)")
    return found.allocation(layers, budget)


def search_for_pipeline(model: nn.Module, batches: list, setup: Any) -> SearchResult:
    """The pipeline's entry: the search on ``setup``'s units and budget (changes ``model``'s searched weights)."""
    cfg = setup.cfg
    return comcat_search(model, batches, setup.layers, setup.modules, setup.budget,
                         settings_of(cfg, ComcatSearchSettings), likelihood=cfg.likelihood,
                         output_key=cfg.output_key, calib_samples=cfg.calib_samples, device=setup.device,
                         progress=cfg.progress)


register_policy(Policy("comcat_search", energy_loss_curve, _run, records_trace=True, settings=ComcatSearchSettings,
                       under_target=True, search=search_for_pipeline))
