"""Tests of lowrank_vit/nn/comcat.py."""

from __future__ import annotations

import pytest
import timm

from lowrank_vit import (
    compress,
    load_compressed,
    save_compressed,
)
from lowrank_vit.nn.comcat import FactorizedAttention
from tests.helpers import ARCHS, make, method_cfg


@pytest.mark.usefixtures("one_thread_module")
def test_comcat_rejects_attention_it_cannot_factor(method_images):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True,
                              **ARCHS["vit"][1]).eval()
    with pytest.raises(ValueError, match="q_norm"):
        compress(model, [method_images], method_cfg(decomposition="comcat"))
    assert not any(isinstance(m, FactorizedAttention) for m in model.modules())


@pytest.mark.usefixtures("one_thread_module")
def test_load_rejects_a_mismatched_attention_spec(labelled, tmp_path):
    import json

    model = make("vit")
    compress(model, labelled, method_cfg(decomposition="comcat"))
    save_compressed(model, tmp_path / "m")
    plan_file = tmp_path / "m" / "lowrank_vit.json"
    plan = json.loads(plan_file.read_text())
    plan["attention"]["blocks.0.attn"]["num_heads"] = 8
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="blocks.0.attn has num_heads=8"):
        load_compressed(tmp_path / "m")
