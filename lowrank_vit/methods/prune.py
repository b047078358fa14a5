"""Unstructured magnitude pruning of the block linear layers, the companion VMeanba's paper (Chi et al., 2024)
combines with its channel-mean scans ("40% unstructured pruning, accuracy drop under 3%").

What is pruned: the weights of the layers the adapter lists for low-rank compression (attention or scan projections
and the MLP of every block; ``TimmViTAdapter.compressible_layers``), on ViTs and state-space models alike. Biases,
norms, convolutions, the scan's A and D, embeddings and the head are left as they are, as the low-rank methods
leave them. Within the pruned set, the weights of smallest absolute value are set to zero, either under one threshold
over all of them (``scope="global"``, the default) or the same fraction in every layer (``scope="layer"``).

How it is stored: a pruned weight is a zero in the layer's ordinary ``nn.Linear`` weight; no mask, no
parametrization, no extra buffer. A pruned model therefore saves (``save_compressed``), loads and exports to ONNX
exactly like a dense one, and the sparsity can always be read back from the weights (:func:`measure_sparsity`). The
price is that nothing in the module remembers which zeros were pruned: a training loop that updates these weights
regrows them, unless it holds them with :func:`hold_pruned` (the library's partial fine-tune never trains them; see
docs/pruning.md). The zeros are stored dense: the file is no smaller and a dense matrix product is no faster; the
saving needs a sparse kernel or format, which is not built here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.common import check_number
from lowrank_vit.nn.adapters import TimmViTAdapter

SCOPES = ("global", "layer")
"""``"global"``: one magnitude threshold over all the pruned layers together; ``"layer"``: every layer loses the same
fraction of its weights."""


@dataclass(frozen=True)
class PruningConfig:
    """What the pruning does."""

    sparsity: float = 0.4
    """Fraction of the block linear weights set to zero, in [0, 1) (0: nothing changes). 0.4 is the paper's."""
    scope: str = "global"
    """``"global"`` (the default) or ``"layer"``. VMeanba's paper states the fraction and nothing else. The default
    is the scope that cost less on both state-space stand-ins measured here (docs/pruning.md: at 40%, a KL to the
    dense model 5-10x smaller than the same fraction taken from every layer, and top-1 within 0.2 points of the dense
    model); it leaves the layers unequally sparse (there, 2% to 73%), which the report lists layer by layer.
    ``"layer"`` makes the fraction true of every layer, for a comparison that wants that."""

    def __post_init__(self) -> None:
        check_number("sparsity", self.sparsity, "[0, 1)")  # 1 would zero every layer: no model left to evaluate
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {self.scope!r}")


@dataclass(frozen=True)
class LayerSparsity:
    """One layer's weights after pruning."""

    weights: int
    zeros: int
    """Weights equal to zero, those zero before pruning included."""

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0


@dataclass
class PruningReport:
    """What :func:`prune_model` did (or what :func:`measure_sparsity` reads off a model)."""

    layers: dict[str, LayerSparsity]
    """Each pruned layer's weight count and zeros, in forward order."""
    zeroed: int
    """Weights this call set to zero (those already zero not counted)."""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers.values())

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers.values())

    @property
    def sparsity(self) -> float:
        """Zeros over weights of all the pruned layers together."""
        return self.zeros / self.weights if self.weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the overall figures, then each layer's (what a result file or a saved plan's metadata keeps)."""
        return {"sparsity": self.sparsity, "weights": self.weights, "zeros": self.zeros, "zeroed": self.zeroed,
                "layers": {name: {"weights": s.weights, "zeros": s.zeros, "sparsity": s.sparsity}
                           for name, s in self.layers.items()},
                "config": dict(self.config)}


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The block linear layers of ``model`` (the adapter's compressible layers that are plain ``nn.Linear``), in
    forward order; a ValueError when there are none. A layer already factorized by a low-rank method is not among
    them: its weight is a product of factors that a zero cannot be written into."""
    layers = TimmViTAdapter().compressible_layers(model)
    if not layers:
        factorized = len(TimmViTAdapter().compressible_layers(model, include_factorized=True))
        why = (f"its {factorized} block layer(s) are factorized by a low-rank method; prune before, not after"
               if factorized else "expected blocks with attention or selective-scan projections and an MLP")
        raise ValueError(f"{type(model).__name__} has no block nn.Linear layer to prune: {why}")
    return layers


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a ``sparsity`` removes: the nearest integer, halves rounded up, so that the
    count is a function of the two numbers alone (no dependence on the weights) and the fraction reached is as
    close as a whole number of weights allows."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be a non-negative integer, got {total!r}")
    check_number("sparsity", sparsity, "[0, 1)")
    return min(total, math.floor(sparsity * total + 0.5))


def smallest_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """A boolean mask of the ``count`` smallest entries of the 1-D ``magnitudes``; among equal values at the
    threshold the earliest positions are taken, so the count is met exactly and the same weights are chosen on every
    run and device (a plain ``magnitudes <= threshold`` would take every tie, and a sort's order among ties is not
    specified). Memory: the threshold comes from ``kthvalue`` and the ties from a cumulative sum, a few copies of
    ``magnitudes`` and no index tensor of its size from a full sort.

    Raises:
        ValueError: ``magnitudes`` is not 1-D, holds NaN, or ``count`` is outside [0, its length].
    """
    if magnitudes.ndim != 1:
        raise ValueError(f"magnitudes must be 1-D, got shape {tuple(magnitudes.shape)}")
    n = magnitudes.numel()
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= n:
        raise ValueError(f"count must be an integer in [0, {n}], got {count!r}")
    if torch.isnan(magnitudes).any():
        raise ValueError("magnitudes hold NaN: a weight that is not a number has no magnitude to rank")
    if count == 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    threshold = magnitudes.kthvalue(count).values  # the count-th smallest value
    below = magnitudes < threshold
    ties = magnitudes == threshold
    needed = count - int(below.sum())  # >= 1: the count-th smallest is itself a tie
    return below | (ties & (torch.cumsum(ties, 0) <= needed))


def pruning_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Name -> boolean mask (True: set to zero) for each weight tensor, by magnitude.

    ``scope="layer"``: each tensor's own ``prune_count(numel, sparsity)`` smallest. ``scope="global"``: the
    ``prune_count(total, sparsity)`` smallest of all tensors together, ties taken in the order of ``weights`` and
    then row-major within a tensor (forward order, when ``weights`` is the model's layers).
    """
    config = PruningConfig(sparsity, scope)  # the same checks as a config's
    if config.scope == "layer":
        return {name: smallest_mask(w.detach().abs().flatten().to(torch.float32),
                                    prune_count(w.numel(), config.sparsity)).view_as(w)
                for name, w in weights.items()}
    if not weights:
        return {}
    flat = torch.cat([w.detach().abs().flatten().to(torch.float32) for w in weights.values()])
    mask = smallest_mask(flat, prune_count(flat.numel(), config.sparsity))
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = mask[start: start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
    return out


def measure_sparsity(model: nn.Module) -> PruningReport:
    """The zeros of every block linear weight of ``model`` as it is (a pruned model, saved and loaded again, reads
    the same as when it was pruned); ``zeroed`` is 0."""
    return PruningReport({name: LayerSparsity(layer.weight.numel(), int((layer.weight == 0).sum()))
                          for name, layer in prunable_layers(model).items()}, zeroed=0)


def prune_model(model: nn.Module, config: PruningConfig | None = None, **overrides: Any) -> PruningReport:
    """Set the smallest-magnitude block linear weights of ``model`` to zero, in place.

    Args:
        model: a timm vision transformer or a vision state-space model (``nn/vssm.py``), dense or after VMeanba.
        config: a :class:`PruningConfig`; ``overrides`` replace its fields (``prune_model(m, sparsity=0.4)``).

    Raises:
        ValueError: a bad setting, a model without block ``nn.Linear`` layers, or a weight holding NaN.
    """
    cfg = PruningConfig(**overrides) if config is None else replace(config, **overrides)
    layers = prunable_layers(model)
    weights = {name: layer.weight for name, layer in layers.items()}
    masks = pruning_masks(weights, cfg.sparsity, cfg.scope)
    zeroed = 0
    with torch.no_grad():
        for name, weight in weights.items():
            zeroed += int((masks[name] & (weight != 0)).sum())
            weight.masked_fill_(masks[name], 0.0)
    report = measure_sparsity(model)
    report.zeroed, report.config = zeroed, asdict(cfg)
    return report


class HeldZeros:
    """Gradient hooks that keep zero weights at zero while a model trains (:func:`hold_pruned`); ``remove()`` (or
    leaving a ``with`` block) takes them off."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> HeldZeros:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def hold_pruned(model: nn.Module) -> HeldZeros:
    """Zero the gradient of every block linear weight that is zero now, for a training loop of one's own that trains
    those weights (the library's partial fine-tune does not). With a zero gradient from the first step, SGD (with
    momentum) and Adam/AdamW leave the entry at zero: their moments stay zero, and decoupled weight decay scales
    zero to zero. The mask is taken when this is called: prune first."""
    handles = []
    for layer in prunable_layers(model).values():
        keep = (layer.weight.detach() != 0).to(layer.weight.dtype)
        handles.append(layer.weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)))
    return HeldZeros(handles)


__all__ = ["SCOPES", "HeldZeros", "LayerSparsity", "PruningConfig", "PruningReport", "hold_pruned",
           "measure_sparsity", "prunable_layers", "prune_count", "prune_model", "pruning_masks",
           "smallest_mask"]
