"""What :func:`lowrank_vit.compress` returns: the compression's report, one :class:`LayerReport` a layer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    rank: int | None
    """``None``: the allocation left the layer dense."""
    z_params: int
    dense_params: int
    factored_params: int
    """Parameters of the layer's weight after compression (U, V and Z; the dense count if left dense)."""
    energy_loss: float
    """Normalized energy loss of the kept spectrum (what the allocation minimized)."""
    output_error_lowrank: float
    """Eq. (5) on the calibration images with U V^T alone."""
    output_error: float
    """Eq. (5) on the calibration images with U V^T + Z (the layer as it is now). For decomposition "loss_aware"
    both errors are pooled over the calibration set (``||X dW||^2 / ||X W||^2`` over all tokens of all images, one
    normalization instead of one per image): its statistics do not weigh images one by one."""
    predicted_loss: float | None = None
    """decomposition "loss_aware": the predicted increase of the loss (KL to the dense model) from this layer's
    change alone, 1/2 tr(dW^T H dW G) of the discarded directions (second order; Z not included). With ``refit``:
    the prediction of the layer as first decomposed, which the allocation compared; the output errors are of the
    refitted layer."""


@dataclass
class CompressionReport:
    config: dict[str, Any]
    params_before: int
    params_after: int
    target_params: int
    layers: list[LayerReport]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    sgd_loss: dict[str, list[float]] = field(default_factory=dict)
    """Per-layer loss of the SGD solver at every step (empty for the closed form)."""
    allocation: list[dict[str, Any]] = field(default_factory=list)
    """allocation "marginal": its decisions, the price per parameter it settled on, then per layer the rank, the
    energy lost and the price of the last direction kept (empty for the other policies)."""
    substage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time inside and after the stages, summed over layers (benchmarks read it): "whitening" (of H for a Z
    fitted on it), "svd_tail_z", "closed_form_z", "sgd_fit", "report_errors" (eq. 5 per layer) and "swap" (the
    layer swap). Not part of ``stage_seconds``, whose values add up to the whole compression."""
    latency: dict[str, Any] = field(default_factory=dict)
    """With ``latency_table``: the table's target (batch, device, runtime, dtype), the dense model's measured time,
    the predicted time and speedup of the compressed model (its low-rank Z folded) and every layer's predicted time
    (:func:`lowrank_vit.core.latency.latency_report`); empty without a table."""
    distillation: dict[str, Any] = field(default_factory=dict)
    """With ``distill_steps``: the steps, the likelihood, the distillation loss on the calibration images before and
    after them, and whether the trained weights were kept (``kept``: the loss fell; otherwise the model is as the
    stages before left it). Empty without the stage."""

    @property
    def ranks(self) -> dict[str, int | None]:
        return {layer.name: layer.rank for layer in self.layers}

    @property
    def reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reduction"] = self.reduction
        out["sgd_loss"] = {k: v[-1] for k, v in self.sgd_loss.items()}  # final loss only: keep the JSON small
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        lines = [f"{'layer':40s} {'rank':>5s} {'params':>10s} {'energy':>8s} {'err(UV)':>8s} {'err':>8s}"]
        for lr in self.layers:
            rank = "dense" if lr.rank is None else str(lr.rank)
            lines.append(f"{lr.name:40s} {rank:>5s} {lr.factored_params:>10,d} {lr.energy_loss:8.4f} "
                         f"{lr.output_error_lowrank:8.4f} {lr.output_error:8.4f}")
        target = (f"target speedup {self.config['target_speedup']:g}x" if self.config.get("target_speedup")
                  else f"target {self.target_params:,}")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,} (-{100 * self.reduction:.1f}%, "
                     f"{target})")
        if self.latency:
            latency = self.latency
            lines.append(f"predicted latency {latency['predicted_ms']:.2f} ms against {latency['dense_ms']:.2f} "
                         f"ms dense ({latency['predicted_speedup']:.2f}x; batch {latency['batch']}, "
                         f"{latency['runtime']} {latency['dtype']} on {latency['device']})")
        return "\n".join(lines)
