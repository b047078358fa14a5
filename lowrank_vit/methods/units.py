"""Modules a method replaces as a whole, and the allocation units inside them.

Most methods factorize each block linear on its own: the pipeline's units are the adapter's linears. A method may
instead replace a whole module and allocate rank inside it (COMCAT replaces each attention module and gives every
head's QK and VO product its own rank). :class:`WholeModules` says how: which modules, what they cost, their units,
those units' spectra, and the module that an allocation builds. The pipeline calls it for every method; the default
finds no module, so for the other methods every loop over it is empty and nothing in the pipeline names a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.budget import LayerBudget
from lowrank_vit.core.decompose import Decomposition
from lowrank_vit.methods import comcat
from lowrank_vit.nn.adapters import TimmViTAdapter
from lowrank_vit.nn.comcat import FactorizedAttention, attention_geometry


@dataclass(frozen=True)
class UnitSummary:
    """One allocation unit as the compression report lists it (its output error is not measured on its own)."""

    name: str
    in_features: int
    out_features: int
    rank: int
    dense_params: int
    params: int
    energy_loss: float


class WholeModules:
    """No module is replaced as a whole (every method but COMCAT). Subclasses override every method."""

    def find(self, model: nn.Module, adapter: TimmViTAdapter) -> dict[str, nn.Module]:
        """Name -> dense module to replace. The block linears inside them are then not units of their own."""
        return {}

    def replaced_params(self, module: nn.Module) -> int:
        """Parameters of the dense module that its replacement removes."""
        raise NotImplementedError

    def fixed_params(self, module: nn.Module) -> int:
        """Parameters of the replacement outside every allocation unit."""
        raise NotImplementedError

    def budgets(self, modules: dict[str, nn.Module],
                curves: dict[str, torch.Tensor] | None = None) -> list[LayerBudget]:
        """The allocation units of ``modules`` (energy curves from ``curves`` by unit name; zeros without them)."""
        return []

    def decompositions(self, modules: dict[str, nn.Module], device: torch.device) -> dict[str, Decomposition]:
        """Unit name -> the unit's decomposition (its spectrum is what the allocation compares)."""
        return {}

    def spec(self, name: str, module: nn.Module, ranks: dict[str, int | None]) -> dict[str, Any]:
        """The replacement's shape under an allocation, without computing factors (for plans and skeletons)."""
        raise NotImplementedError

    def from_spec(self, name: str, module: nn.Module, spec: dict[str, Any]) -> nn.Module:
        """A replacement shaped by ``spec`` with uninitialised factors."""
        raise NotImplementedError

    def build(self, name: str, module: nn.Module, decompositions: dict[str, Decomposition],
              ranks: dict[str, int | None]) -> nn.Module:
        """The replacement of ``module`` under an allocation, its factors from ``decompositions``."""
        raise NotImplementedError

    def summaries(self, modules: dict[str, nn.Module], decompositions: dict[str, Decomposition],
                  ranks: dict[str, int | None]) -> list[UnitSummary]:
        """One line of the report per unit."""
        return []


NO_MODULES = WholeModules()


class AttentionHeads(WholeModules):
    """COMCAT (Xiao et al. 2023, :mod:`lowrank_vit.methods.comcat`): each attention module with a fused qkv and a proj
    linear becomes a :class:`~lowrank_vit.nn.comcat.FactorizedAttention`; its units are every head's QK and VO
    products."""

    def find(self, model, adapter):
        modules = adapter.attention_modules(model)
        if not modules:
            raise ValueError("decomposition='comcat' factorizes attention modules with a fused qkv and a proj linear; "
                             f"{type(model).__name__} has none")
        return modules

    def replaced_params(self, module):
        return sum(p.numel() for layer in (module.qkv, module.proj) for p in layer.parameters())

    def fixed_params(self, module):
        # the output bias (qkv's v bias folded into it); the q bias rows belong to the QK units
        geom = attention_geometry(module)
        return geom.out_dim if geom.out_bias else 0

    def budgets(self, modules, curves=None):
        return comcat.head_budgets(modules, curves)

    def decompositions(self, modules, device):
        return comcat.head_decompositions(modules, device)

    def spec(self, name, module, ranks):
        return comcat.attention_spec(name, module, ranks)

    def from_spec(self, name, module, spec):
        return FactorizedAttention.from_spec_like(module, spec, name)

    def build(self, name, module, decompositions, ranks):
        return comcat.factorize_attention(name, module, decompositions, ranks)

    def summaries(self, modules, decompositions, ranks):
        out = []
        for unit in comcat.head_budgets(modules):
            # a unit absent from ``ranks`` is dense (head_dim), as spec and build read it (comcat.attention_ranks)
            rank = comcat.unit_rank(ranks.get(unit.name), unit.head_dim)
            out.append(UnitSummary(unit.name, unit.in_features, unit.out_features, rank, unit.dense_params,
                                   unit.params(rank), decompositions[unit.name].energy_loss(rank)))
        return out
