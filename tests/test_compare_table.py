"""``reproduce compare``'s writer: one grid at equal parameters per column, from result.json files (no model runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lowrank_vit.repro.registry import get_experiment
from lowrank_vit.repro.runner import select_rows
from lowrank_vit.repro.tables import write_table


def _fake_result(output: Path, name: str, params: int, top1: float, dense: float = 97.0) -> None:
    path = output / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": name, "params": params, "top1": top1, "top5": 99.0,
                                "dense": {"top1": dense}, "compressed": {"top1": top1 - 1}}))


def test_compare_markdown_is_one_grid_with_paper_numbers_in_parentheses(tmp_path):
    _fake_result(tmp_path, "compare/deit_s/ours-40", 13_230_000, 96.5)
    _fake_result(tmp_path, "compare/deit_s/ours-40-noft", 13_230_100, 95.25)
    _fake_result(tmp_path, "compare/deit_s/comcat-40", 13_231_000, 94.0)
    _fake_result(tmp_path, "compare/deit_b/asvd-60-noft", 34_600_000, 91.125, dense=98.0)
    exps = select_rows("compare")
    data = write_table("compare", exps, "smoke", tmp_path)
    text = (tmp_path / "compare.md").read_text()
    assert json.loads((tmp_path / "compare.json").read_text())["grid"] == data["grid"]

    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["method", "DeiT-S -40%", "DeiT-S -50%", "DeiT-S -60%", "DeiT-B -40%", "DeiT-B -50%",
                      "DeiT-B -60%"]
    assert len(table) == 2 + 2 + 12 * 2  # header, rule, parameters, dense, 12 methods with and without FT
    cells = {line.split("|")[1].strip().split(" [")[0]: [c.strip() for c in line.strip("|").split("|")[1:]]
             for line in table[2:]}
    assert cells["parameters"][0] == "13.230-13.231M" and cells["parameters"][5] == "34.600M"
    assert cells["parameters"][1] == "—"
    assert cells["dense model"][0] == "97.00" and cells["dense model"][5] == "98.00"
    assert cells["paper's recipe (whitened SVD) + FT"][0].startswith("96.50 (79.60)")  # paper: Table 2, DeiT-S -40%
    assert cells["paper's recipe (whitened SVD) + FT"][1].startswith("— (79.34)")  # not run: the paper's number alone
    assert cells["paper's recipe (whitened SVD), no FT"][0] == "95.25"
    assert cells["COMCAT + FT"][0] == "94.00" and cells["ASVD, no FT"][5] == "91.12"
    assert "Not run yet (140 of 144)" in text and "Smoke scale" in text
    assert "[1]" in text and "Table 2" in text  # the notes are numbered below the table
    columns = {c["key"]: c for c in data["columns"]}
    assert columns["deit_s-40"]["equal_params"] and columns["deit_s-50"]["params_m_min"] is None


def test_compare_flags_a_column_with_unequal_parameters(tmp_path):
    _fake_result(tmp_path, "compare/deit_s/ours-50", 11_025_000, 96.0)
    _fake_result(tmp_path, "compare/deit_s/plain-50", 11_200_000, 95.0)  # 1.6% more: not a fair comparison
    exps = [get_experiment(f"compare/deit_s/{m}-50") for m in ("ours", "plain")]
    data = write_table("compare", exps, "full", tmp_path)
    assert not data["columns"][0]["equal_params"]
    assert "11.025-11.200M (unequal!)" in (tmp_path / "compare.md").read_text()


def test_other_tables_keep_the_generic_writer(tmp_path):
    exps = select_rows("ablation", "ablation/deit_s/z-*")
    write_table("ablation", exps, "smoke", tmp_path)
    text = (tmp_path / "ablation.md").read_text()
    assert "| row | params (paper) |" in text and "`ablation/deit_s/z-on-50`" in text


def test_plan_gives_fwsvd_synthetic_labels():
    """`lowrank-vit plan --synthetic` works for FWSVD, whose Fisher pass needs labelled calibration batches."""
    from lowrank_vit.repro.models import synthetic_labelled
    from lowrank_vit.repro.planning import plan_row

    pairs = synthetic_labelled([torch.zeros(3, 1, 4, 4), torch.zeros(2, 1, 4, 4)], num_classes=10)
    assert [labels.shape[0] for _, labels in pairs] == [3, 2]
    assert all(0 <= int(labels.min()) and int(labels.max()) < 10 for _, labels in pairs)
    plan = plan_row(get_experiment("compare/deit_s/fwsvd-50-noft"), "smoke", calib_images=2)
    assert abs(plan["params_after"] - plan["target_params"]) <= 1e-3 * plan["target_params"]


def test_residual_mean_is_undefined_when_a_unit_has_none():
    """COMCAT's attention units have no per-layer eq. 5 error (NaN): the row's mean residual is None, not NaN."""
    from lowrank_vit.repro.runner import _mean

    assert _mean([1.0, 3.0]) == 2.0
    assert _mean([1.0, math.nan]) is None
    assert _mean([]) is None


def test_compare_markdown_names_the_setup_and_lists_residuals(tmp_path):
    """Rows run with overrides (a checkpoint on CIFAR-10) say so instead of claiming the MNIST stand-ins, and the
    eq. 5 residuals of the no-FT rows get their own grid, NaN from older results shown as undefined."""
    config = {"model": {"source": "timm", "name": "deit_small_patch16_224", "checkpoint": "/x/model.safetensors"},
              "data": {"name": None, "path": "/data/cifar10"}}
    for name, residual in (("ours-50-noft", 0.00045), ("plain-50-noft", 0.002), ("comcat-50-noft", float("nan"))):
        _fake_result(tmp_path, f"compare/deit_s/{name}", 11_025_000, 60.0)
        path = tmp_path / "compare" / "deit_s" / name / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "residual_error": residual, "config": config}))
    write_table("compare", [get_experiment(f"compare/deit_s/{m}-50-noft") for m in ("ours", "plain", "comcat")],
                "smoke", tmp_path)
    text = (tmp_path / "compare.md").read_text()
    assert "Smoke scale" not in text
    assert "Measured with deit_small_patch16_224 (model.safetensors) on cifar10" in text
    residual = text.split("Mean residual error of eq. 5")[1]
    assert "| paper's recipe (whitened SVD) | 4.50e-04 |" in residual and "| plain SVD | 2.00e-03 |" in residual
    assert "| COMCAT | — |" in residual and "nan" not in text
