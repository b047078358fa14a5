"""Vision state-space models: VMeanba alone (K blocks of least impact on the channel-mean scan), the library's
low-rank default alone, and both, on the published VMamba sizes (full scale) and their MNIST stand-ins (smoke).

VMamba's published weights are not converted to this library's implementation (``lowrank_vit/nn/vssm.py``) yet: a
full-scale run needs ``--set model.checkpoint=PATH``; ``lowrank-vit rehearse`` runs these rows with random weights
like every other full-scale row. The stand-ins keep the real models' block counts, so K means the same at both
scales."""

from __future__ import annotations

from lowrank_vit.methods.vmeanba import VMeanbaConfig
from lowrank_vit.repro.registry import register_experiment

from ._rows import ARCHS, make_row

SSM_TABLE = "vmeanba"
KS = (2, 4, 8)
"""Blocks switched on VMamba-T (14 blocks): from the cheapest (measured on the CIFAR-10 stand-ins: the block of least
impact costs nothing measurable) to more than half."""
LOW_RANK = 0.4
"""The low-rank reduction of the block linears, alone and after VMeanba."""


def _vmeanba(k: int) -> VMeanbaConfig:
    # the impact scores average over the rows' calibration images at each scale (make_row sets calib_samples)
    return VMeanbaConfig(num_blocks=k)


@register_experiment
def vmeanba_rows():
    """VMeanba's K sweep on VMamba-T, one K on VMamba-S and -B, the loss-aware low-rank recipe alone and combined."""
    note = ("VMamba's published weights are not converted to this implementation yet: a full-scale run needs "
            "--set model.checkpoint=PATH (safetensors in lowrank_vit/nn/vssm.py's layout)",)
    for arch in ("vmamba_t", "vmamba_s", "vmamba_b"):
        label = ARCHS[arch].label
        yield make_row(f"{SSM_TABLE}/{arch}/baseline", "baseline", notes=note,
                       description=f"{label}, evaluated")
        for k in KS if arch == "vmamba_t" else (4,):
            yield make_row(f"{SSM_TABLE}/{arch}/vmeanba-k{k}", "vmeanba", vmeanba=_vmeanba(k), notes=note,
                           description=f"{label}: VMeanba's channel-mean scan in the {k} blocks of least impact, "
                                       "training-free")
    pct = round(100 * LOW_RANK)
    yield make_row(f"{SSM_TABLE}/vmamba_t/loss-aware-{pct}", "loss-aware", reduction=LOW_RANK, notes=note,
                   description=f"VMamba-T -{pct}%: the library's loss-aware low-rank recipe on the block linears "
                               "(projections in and out, x and dt projections, MLP), partial fine-tune")
    yield make_row(f"{SSM_TABLE}/vmamba_t/vmeanba-k4-loss-aware-{pct}", "loss-aware", vmeanba=_vmeanba(4),
                   reduction=LOW_RANK, notes=note,
                   description=f"VMamba-T: VMeanba in 4 blocks, then -{pct}% by the loss-aware low-rank recipe, "
                               "partial fine-tune")
