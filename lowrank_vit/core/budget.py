"""What a rank allocation works on and what it decides: :class:`LayerBudget`, the allocator's view of one compressible
layer (its shape, its Z, its loss curve, a rank ceiling from a latency table), and :class:`Allocation`, the ranks
chosen. Every policy (:mod:`lowrank_vit.core.allocate`, the peers' in :mod:`lowrank_vit.core.search`) and the latency
allocation (:mod:`lowrank_vit.core.latency`) read these, so neither of those modules reaches into the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerBudget:
    """What the allocator knows about one compressible layer."""

    name: str
    in_features: int
    out_features: int
    z_params: int
    energy_losses: torch.Tensor
    """Energy lost when keeping r singular values, indexed by r = 0..p; ranks above p lose nothing. Normalized
    (divided by the total) for "uniform" and "greedy"; absolute (in the decomposition's own units, the loss's for
    the loss-aware method) for "marginal", which compares layers by it."""
    rank_limit: int | None = None
    """A ceiling on the rank from outside the parameter count: the largest rank still faster than the dense layer on
    a profiled target (:func:`lowrank_vit.core.latency.rank_limits`); 0 keeps the layer dense. None: no ceiling."""

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def rank_step(self) -> int:
        return self.in_features + self.out_features

    @property
    def max_rank(self) -> int:
        """Largest rank whose factored cost is still below the dense cost (and not above ``rank_limit``)."""
        cheaper = max(0, (self.dense_params - self.z_params - 1) // self.rank_step)
        return cheaper if self.rank_limit is None else min(cheaper, self.rank_limit)

    def params(self, rank: int | None) -> int:
        return self.dense_params if rank is None else rank * self.rank_step + self.z_params

    def loss(self, rank: int | None) -> float:
        if rank is None:
            return 0.0
        losses = self.energy_losses
        return float(losses[rank]) if rank < losses.numel() else 0.0


@dataclass
class Allocation:
    """The decision: rank of every layer (``None`` = left dense) and the resulting compressible-weight count."""

    ranks: dict[str, int | None]
    params: int
    trace: list[dict] = field(default_factory=list)
    """Greedy steps taken: {"step", "layer", "rank", "params"} (empty for uniform)."""
