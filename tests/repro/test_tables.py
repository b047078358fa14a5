"""Tests of lowrank_vit/repro/tables.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    # header, rule, parameters, dense, 13 methods with and without FT (COMCAT's search only at its two targets)
    assert len(table) == 2 + 2 + 13 * 2
    cells = {line.split("|")[1].strip().split(" [")[0]: [c.strip() for c in line.strip("|").split("|")[1:]]
             for line in table[2:]}
    assert cells["parameters"][0] == "13.230-13.231M" and cells["parameters"][5] == "34.600M"
    assert cells["parameters"][1] == "—"
    assert cells["dense model"][0] == "97.00" and cells["dense model"][5] == "98.00"
    assert cells["paper's recipe (whitened SVD) + FT"][0].startswith("96.50 (79.60)")  # paper: Table 2, DeiT-S -40%
    assert cells["paper's recipe (whitened SVD) + FT"][1].startswith("— (79.34)")  # not run: the paper's number alone
    assert cells["paper's recipe (whitened SVD), no FT"][0] == "95.25"
    assert cells["COMCAT + FT"][0] == "94.00" and cells["ASVD, no FT"][5] == "91.12"
    assert "Not run yet (144 of 148)" in text and "Smoke scale" in text
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


def _row(**fields) -> dict:
    row = dict(name="table2/deit_s/ours-50", paper_params_m=11.1, params_m=0.102, diff_params_m=-11.0,
               paper_top1=79.34, top1=95.6, diff_top1=16.26, top1_compressed=95.5, top1_dense=95.8,
               diff_top1_dense=-0.2, top5=99.0, paper_size_mib=None, size_mib=0.2, diff_size_mib=None,
               paper_residual=None, residual=4e-05, diff_residual=None, notes=[], finished=True)
    return {**row, **fields}


@pytest.mark.usefixtures("_offline")
def test_smoke_table_compares_with_its_own_baseline():
    from lowrank_vit.repro.tables import markdown_table

    text = markdown_table("table2", "smoke", [_row(), _row(name="table2/deit_s/vanilla-svd-ft-40", residual=2e-3)])
    header = next(line for line in text.splitlines() if line.startswith("| row"))
    assert "Δ vs dense" in header and header.count("Δ") == 1
    assert "-0.20" in text and "+16.26" not in text and "79.34" in text
    assert "4.00e-05" in text and "2.00e-03" in text and "0.000" not in text
    full = markdown_table("table2", "full", [_row()])
    assert "+16.26" in full and "4.00e-05" in full  # the full scale is a reproduction: Δ against the paper


def test_rows_sharing_a_caveat_share_its_footnote(tmp_path):
    from lowrank_vit.repro.registry import list_experiments
    from lowrank_vit.repro.tables import render_table

    rows = list_experiments("vmeanba/vmamba_t/*")
    text = render_table("vmeanba", rows, "smoke", tmp_path)
    assert text.count("` [1] |") == len(rows) and "[2]" not in text
    assert text.count("released VMamba checkpoints (.pth, converted on load)") == 1
