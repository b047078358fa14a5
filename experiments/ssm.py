"""Vision state-space models: VMeanba alone (K blocks of least impact on the channel-mean scan), the library's
low-rank default alone, and both; 40% unstructured magnitude pruning alone, and after VMeanba (the combination
VMeanba's paper reports); on the published VMamba sizes (full scale) and their MNIST stand-ins (smoke).

No weights are downloaded for these models: a full-scale run needs ``--set model.checkpoint=PATH``, a released VMamba
checkpoint or a safetensors file in ``lowrank_vit/nn/vssm.py``'s layout; ``lowrank-vit rehearse`` runs these rows
with random weights like every other full-scale row. The stand-ins keep the real models' block counts, so K means the
same at both scales."""

from __future__ import annotations

from lowrank_vit.methods.prune import PruningConfig
from lowrank_vit.methods.vmeanba import VMeanbaConfig
from lowrank_vit.repro.registry import register_experiment

from ._rows import ARCHS, make_row

SSM_TABLE = "vmeanba"
KS = (2, 4, 8)
"""Blocks switched on VMamba-T (14 blocks): from the cheapest (measured on the CIFAR-10 stand-ins: the block of least
impact costs nothing measurable) to more than half."""
LOW_RANK = 0.4
"""The low-rank reduction of the block linears, alone and after VMeanba."""
SPARSITY = 0.4
"""The fraction of the block linear weights pruned, alone and after VMeanba: the paper's 40%."""


def _vmeanba(k: int) -> VMeanbaConfig:
    # the impact scores average over the rows' calibration images at each scale (make_row sets calib_samples)
    return VMeanbaConfig(num_blocks=k)


@register_experiment
def vmeanba_rows():
    """VMeanba's K sweep on VMamba-T, one K on VMamba-S and -B, 40% pruning alone and after VMeanba on every size,
    the loss-aware low-rank recipe alone and combined on VMamba-T."""
    note = ("no weights are downloaded for VMamba: a full-scale run needs --set model.checkpoint=PATH, released "
            "VMamba checkpoints (.pth, converted on load) or safetensors in this layout (lowrank_vit/nn/vssm.py)",)
    for arch in ("vmamba_t", "vmamba_s", "vmamba_b"):
        label = ARCHS[arch].label
        yield make_row(f"{SSM_TABLE}/{arch}/baseline", "baseline", notes=note,
                       description=f"{label}, evaluated")
        for k in KS if arch == "vmamba_t" else (4,):
            yield make_row(f"{SSM_TABLE}/{arch}/vmeanba-k{k}", "vmeanba", vmeanba=_vmeanba(k), notes=note,
                           description=f"{label}: VMeanba's channel-mean scan in the {k} blocks of least impact, "
                                       "training-free")
        sparse = round(100 * SPARSITY)
        # the library's default scope, one global threshold: the paper states the fraction only (docs/pruning.md)
        yield make_row(f"{SSM_TABLE}/{arch}/prune-{sparse}", "prune", pruning=PruningConfig(SPARSITY), notes=note,
                       description=f"{label}: the {sparse}% of the block linear weights of smallest magnitude (one "
                                   "threshold over all of them) set to zero; training-free")
        yield make_row(f"{SSM_TABLE}/{arch}/vmeanba-k4-prune-{sparse}", "prune", vmeanba=_vmeanba(4),
                       pruning=PruningConfig(SPARSITY), notes=note,
                       description=f"{label}: VMeanba in the 4 blocks of least impact, then {sparse}% of the block "
                                   "linear weights pruned by magnitude; training-free (the paper's combination)")
    pct = round(100 * LOW_RANK)
    yield make_row(f"{SSM_TABLE}/vmamba_t/loss-aware-{pct}", "loss-aware", reduction=LOW_RANK, notes=note,
                   description=f"VMamba-T -{pct}%: the library's loss-aware low-rank recipe on the block linears "
                               "(projections in and out, x and dt projections, MLP), partial fine-tune")
    yield make_row(f"{SSM_TABLE}/vmamba_t/vmeanba-k4-loss-aware-{pct}", "loss-aware", vmeanba=_vmeanba(4),
                   reduction=LOW_RANK, notes=note,
                   description=f"VMamba-T: VMeanba in 4 blocks, then -{pct}% by the loss-aware low-rank recipe, "
                               "partial fine-tune")
