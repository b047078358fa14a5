"""The dense-baseline guard: a full-scale row whose dense model scores under half the paper's baseline stops before
compressing (a class order that differs from the head's, wrong preprocessing or weights give a near-zero top-1
without any error); ``--set run.skip_baseline_guard=true`` lets it run.

The model is a tiny DeiT trained here for three epochs on the embedded digits, with timm's DeiT-S preprocessing, and
run as the full-scale row ``table2/deit_s/loss-aware-50`` through ``model.checkpoint`` (so the paper's DeiT-S
baseline, 79.8%, is the reference); the "wrong class order" copy is the same model with its head's rows rolled by
one class, which is what a dataset whose labels are ordered differently from the pretrained head looks like.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_vit.repro.registry import get_experiment
from lowrank_vit.repro.rows import BaselineGuardError, check_dense_baseline, paper_baseline
from lowrank_vit.repro.runner import row_config, run_row

ROW = "table2/deit_s/loss-aware-50"
KWARGS = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(honest, head-permuted) safetensors checkpoints of a tiny DeiT trained for three epochs on the digits."""
    import timm
    from safetensors.torch import save_file

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    torch.manual_seed(0)
    name = get_experiment(ROW).full.model.name
    model = timm.create_model(name, pretrained=False, **KWARGS)
    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=64, augment=False), model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):  # about 85% on the validation digits
        for images, labels in dm.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()
    folder = tmp_path_factory.mktemp("guard")
    honest = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    permuted = dict(honest)
    for key in ("head.weight", "head.bias"):  # class c's logit now answers for class c + 1
        permuted[key] = honest[key].roll(1, dims=0).contiguous()
    save_file(honest, str(folder / "honest.safetensors"))
    save_file(permuted, str(folder / "permuted.safetensors"))
    return folder / "honest.safetensors", folder / "permuted.safetensors"


def _overrides(checkpoint) -> list[str]:
    return [f"model.kwargs={json.dumps(KWARGS)}", f"model.checkpoint={checkpoint}", "data.name=mnist-5k",
            "data.num_workers=0", "data.calib_samples=32", "compression.calib_samples=32", "finetune.epochs=1",
            "finetune.max_steps=1", "finetune.batch_size=64"]


def _run(checkpoint, output, extra: tuple[str, ...] = ()):
    return run_row(get_experiment(ROW), "full", output=output, accelerator="cpu", devices=1,
                   overrides=_overrides(checkpoint) + list(extra), wandb="disabled", progress=False)


def test_paper_baseline_is_the_registry_baseline_of_the_same_weights():
    assert paper_baseline(get_experiment(ROW).full, "table2") == ("table2/deit_s/baseline", 79.8)
    assert paper_baseline(get_experiment("table3/deit_b/ours").full, "table3") == ("table2/deit_b/baseline", 81.8)
    assert paper_baseline(get_experiment("table3/vit_l/ours").full, "table3") is None  # the paper gives none
    random_weights = row_config(get_experiment(ROW), "full", ["model.pretrained=false"])
    assert paper_baseline(random_weights, "table2") is None


def test_the_guard_stops_below_half_the_papers_baseline_and_not_above():
    """The line is half the paper's dense top-1 (79.8% for DeiT-S): 39.8% stops the row, 39.95% passes."""
    exp = get_experiment(ROW)
    with pytest.raises(BaselineGuardError, match="under half the paper's 79.80%"):
        check_dense_baseline(exp, exp.full, 39.8)
    check_dense_baseline(exp, exp.full, 39.95)


def test_skip_baseline_guard_is_a_typed_run_setting():
    cfg = row_config(get_experiment(ROW), "full", ["run.skip_baseline_guard=true"])
    assert cfg.run.skip_baseline_guard is True
    assert row_config(get_experiment(ROW), "full").run.skip_baseline_guard is False
    with pytest.raises(ValueError, match="expected true or false"):
        row_config(get_experiment(ROW), "full", ["run.skip_baseline_guard=maybe"])
    with pytest.raises(ValueError, match="no field"):
        row_config(get_experiment(ROW), "full", ["run.skip_guard=true"])


def test_wrong_class_order_stops_the_row_before_compressing(checkpoints, tmp_path):
    _, permuted = checkpoints
    with pytest.raises(BaselineGuardError) as info:
        _run(permuted, tmp_path)
    message = str(info.value)
    assert "under half the paper's 79.80%" in message and "table2/deit_s/baseline" in message
    for cause in ("class order", "preprocessing", "wrong weights", "run.skip_baseline_guard=true"):
        assert cause in message
    assert not (tmp_path / ROW / "result.json").exists()  # nothing compressed, nothing written as a result


def test_override_runs_the_row_and_an_honest_model_passes(checkpoints, tmp_path):
    honest, permuted = checkpoints
    forced = _run(permuted, tmp_path / "forced", ("run.skip_baseline_guard=true",))
    assert forced["dense"]["top1"] < 0.5 * 79.8 and forced["params"] < forced["params_before"]
    result = _run(honest, tmp_path / "honest")
    assert result["dense"]["top1"] >= 0.5 * 79.8, result["dense"]
    assert (tmp_path / "honest" / ROW / "result.json").is_file()
