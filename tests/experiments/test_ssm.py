"""Tests of experiments/ssm.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit.repro.registry import (
    Experiment,
    tables,
)
from tests.helpers import ALL

# ------------------------------------------------------------------------------- vision state-space models (VMeanba)
VMEANBA_ROWS = [e for e in ALL if e.table == "vmeanba"]


def test_the_vmeanba_table_has_the_sweep_the_low_rank_row_and_both_on_every_vmamba_size():
    names = {e.name for e in VMEANBA_ROWS}
    assert {f"vmeanba/vmamba_t/vmeanba-k{k}" for k in (2, 4, 8)} <= names
    assert {f"vmeanba/{a}/{v}" for a in ("vmamba_t", "vmamba_s", "vmamba_b") for v in ("baseline", "vmeanba-k4")} \
        <= names
    assert {"vmeanba/vmamba_t/loss-aware-40", "vmeanba/vmamba_t/vmeanba-k4-loss-aware-40"} <= names
    assert "vmeanba" in tables()


@pytest.mark.parametrize("exp", [e for e in VMEANBA_ROWS if e.method.startswith("vmeanba")], ids=lambda e: e.name)
def test_a_vmeanba_row_switches_the_k_its_name_declares_of_blocks_both_scales_have(exp: Experiment):
    """K is read from the row's name; it must exist in the full-size model and in its stand-in (which keeps the
    real block counts), over each scale's calibration images; VMeanba alone is training-free."""
    from lowrank_vit.methods.vmeanba import scan_blocks
    from lowrank_vit.nn.adapters import timm_with_our_models
    from lowrank_vit.repro.standins import STANDINS

    timm = timm_with_our_models()
    k = int(exp.name.split("/")[2].split("-")[1].removeprefix("k"))
    for cfg, calib in ((exp.full, 1024), (exp.smoke, 256)):
        assert (cfg.vmeanba.num_blocks, cfg.vmeanba.target_speedup, cfg.vmeanba.calib_samples) == (k, None, calib)
        assert cfg.data.calib_samples == calib
        assert (cfg.finetune is None) == (cfg.compression is None)  # VMeanba alone or with pruning: training-free
    with torch.device("meta"):
        full = timm.create_model(exp.full.model.name, pretrained=False)
        smoke = STANDINS[exp.arch].create_model()
    assert len(scan_blocks(full)) == len(scan_blocks(smoke)) and k <= len(scan_blocks(full))
