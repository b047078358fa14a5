"""A reduced demo (one row, random-weight stand-in, a few fine-tuning steps): the JSON schema, the figures and
the printed table. `make demo` runs the real one."""

from __future__ import annotations

import json

import pytest

from lowrank_vit.harness.demo import DEMO_ROWS, format_table, run_demo

TINY = ["model.pretrained=false", "compression.calib_samples=32", "data.calib_samples=32", "finetune.max_steps=2"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))


def test_demo_rows_are_the_issue_s():
    assert DEMO_ROWS[0] == "table2/deit_s/baseline"
    assert {r for r in DEMO_ROWS if "ours" in r} == {f"table2/deit_s/ours-{p}" for p in (40, 50, 60)} | {
        "table3/deit_s/ours"}
    assert {r for r in DEMO_ROWS if "loss-aware" in r} == {f"table2/deit_s/loss-aware-{p}" for p in (40, 50, 60)} | {
        "table3/deit_s/loss-aware"}
    assert {r for r in DEMO_ROWS if "vanilla" in r} == {"table2/deit_s/vanilla-svd-ft-40",
                                                        "ablation/deit_s/vanilla-svd-ft-50",
                                                        "ablation/deit_s/vanilla-svd-ft-60",
                                                        "ablation/deit_s/vanilla-svd-ft-table3"}
    from lowrank_vit.harness.registry import get_experiment

    table3 = {get_experiment(r).smoke.compression.reduction for r in DEMO_ROWS if "table3" in r}
    assert len(table3) == 1 and 0.77 < table3.pop() < 0.78  # the three methods at one Table 3 ratio


@pytest.mark.slow
def test_reduced_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    rows = ["table2/deit_s/ours-50"]
    summary = run_demo(out, rows=rows, overrides=TINY, wandb="offline", progress=False)
    data = json.loads((out / "table2.json").read_text())
    assert data == summary["rows"] and [r["name"] for r in data] == rows
    for row in data:
        assert set(row) == {"name", "method", "reduction", "params", "top1", "top1_noft", "residual",
                            "paper_params", "paper_top1"}
        assert 0 <= row["top1_noft"] <= 100
        assert 0 <= row["top1"] <= 100
    (ours,) = data
    assert ours["method"] == "ours" and ours["reduction"] == 0.5 and ours["paper_top1"] == 79.34
    assert ours["paper_params"] == 11_100_000
    result = json.loads((out / "table2/deit_s/ours-50/result.json").read_text())
    assert ours["params"] == result["params"] == pytest.approx(result["params_before"] / 2, rel=1e-3)
    for name in ("energy_vs_rank.png", "output_error_per_layer.png", "ranks_per_layer.png"):
        png = out / name
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5_000
    curves = json.loads((out / "energy_vs_rank.json").read_text())
    for layer in curves.values():  # the activation-aware basis is optimal for the output error at every rank
        for plain, white in zip(layer["plain_output_error"], layer["whitened_output_error"], strict=True):
            assert white <= plain * (1 + 1e-6) + 1e-12
    printed = capsys.readouterr().out
    assert "paper's recipe (whitened SVD) -50%" in printed and "79.34" in printed
    assert list(out.glob("table2/deit_s/ours-50/wandb/offline-run-*"))  # logged offline, grouped "demo"
    # a second call skips the finished rows
    again = run_demo(out, rows=rows, overrides=TINY, wandb="offline", progress=False, figures=False)
    assert again["rows"] == data


def test_format_table_layout():
    rows = [dict(name="b", method="baseline", reduction=0.0, params=100, top1=90.0, paper_params=22_100_000,
                 paper_top1=79.8),
            dict(name="v", method="vanilla", reduction=0.6, params=40, top1=70.0, paper_params=None, paper_top1=None)]
    text = format_table(rows)
    assert "vanilla SVD + FT -60%" in text and "-20.00" in text and "—" in text and "22.1M" in text
