"""The baseline guard: a full-scale row whose dense model scores far from the paper's baseline is stopped before it
spends GPU hours compressing the wrong weights or data."""

from __future__ import annotations

from lowrank_vit.harness.models import SetupError
from lowrank_vit.harness.registry import (
    Experiment,
    RunConfig,
    list_experiments,
)

BASELINE_GUARD_FRACTION = 0.5
"""A full-scale row stops before compressing when its dense top-1 is under this fraction of the paper's baseline."""


class BaselineGuardError(SetupError):
    """The dense model scores far below the paper's baseline: the data or the weights are not what the row needs."""



def paper_baseline(cfg: RunConfig, table: str | None = None) -> tuple[str, float] | None:
    """The paper's dense top-1 for ``cfg``'s starting weights: the registry's baseline row (unquantized, no
    compression) whose full-scale model is the same timm model, preferring ``table``'s own. Returns the row's name
    and its top-1, or None when the paper reports no baseline for that model (ViT-L) or the weights are random. A
    ``model.checkpoint`` of that model is held to the same baseline: the guard is there to catch wrong weights."""
    if cfg.model.source != "timm" or (cfg.model.checkpoint is None and not cfg.model.pretrained):
        return None
    candidates = [e for e in list_experiments() if e.method == "baseline" and e.paper.top1 is not None
                  and e.full.quantization is None and e.full.model.name == cfg.model.name]
    candidates.sort(key=lambda e: e.table != table)  # stable: the row's own table first, then registration order
    return (candidates[0].name, float(candidates[0].paper.top1)) if candidates else None



def check_dense_baseline(exp: Experiment, cfg: RunConfig, dense_top1: float) -> str | None:
    """Stop a full-scale row whose dense model scores under half the paper's baseline, before hours of calibration
    and fine-tuning: a wrong class order, preprocessing or weights gives a near-zero top-1 without any error. Returns
    a note for the user where the guard cannot apply (the paper gives no baseline for the model), else None.

    Raises:
        BaselineGuardError: names the likely causes and the override (``--set run.skip_baseline_guard=true``).
    """
    reference = paper_baseline(cfg, exp.table)
    if reference is None:
        return f"{exp.name}: the paper reports no dense top-1 for {cfg.model.name}; the baseline guard is off"
    row, top1 = reference
    if dense_top1 >= BASELINE_GUARD_FRACTION * top1:
        return None
    data = cfg.data.path or cfg.data.name
    raise BaselineGuardError(
        f"{exp.name}: the dense {cfg.model.name} scores {dense_top1:.2f}% top-1 on {data!r}, under half the paper's "
        f"{top1:.2f}% ({row}); likely causes: the data's class order differs from the pretrained head's (ImageNet's "
        f"synset order n01440764...n15075141, labels 0..999), wrong preprocessing (mean/std, crop_pct, "
        f"interpolation, input size), or wrong weights (model.checkpoint, model.name); stopped before compressing. "
        f"If this is intended, pass --set run.skip_baseline_guard=true")
