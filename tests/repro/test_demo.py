"""Tests of lowrank_vit/repro/demo.py."""

from __future__ import annotations

import json

import pytest

from lowrank_vit.repro.demo import DEMO_ROWS, format_table, run_demo
from tests.helpers import COMMITTED, patch_everywhere

TINY = ["model.pretrained=false", "compression.calib_samples=32", "data.calib_samples=32", "finetune.max_steps=2"]


@pytest.mark.usefixtures("offline")
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
    from lowrank_vit.repro.registry import get_experiment

    table3 = {get_experiment(r).smoke.compression.reduction for r in DEMO_ROWS if "table3" in r}
    assert len(table3) == 1 and 0.77 < table3.pop() < 0.78  # the three methods at one Table 3 ratio


@pytest.mark.usefixtures("offline")
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


@pytest.mark.usefixtures("offline")
def test_format_table_layout():
    rows = [dict(name="b", method="baseline", reduction=0.0, params=100, top1=90.0, paper_params=22_100_000,
                 paper_top1=79.8),
            dict(name="v", method="vanilla", reduction=0.6, params=40, top1=70.0, paper_params=None, paper_top1=None)]
    text = format_table(rows)
    assert "vanilla SVD + FT -60%" in text and "-20.00" in text and "—" in text and "22.1M" in text


@pytest.mark.usefixtures("offline")
def test_the_demo_uses_the_committed_stand_in_and_trains_only_when_asked(tmp_path, monkeypatch):
    from lowrank_vit.repro import demo, standins

    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    calls = []
    patch_everywhere(monkeypatch, standins, "pretrain_standin", lambda arch, **kw: calls.append(("pretrain", arch)))
    patch_everywhere(monkeypatch, standins, "build_standin", lambda arch, **kw: calls.append(("build", arch)))
    assert demo._prepare_standin("deit_s", COMMITTED, retrain=False, progress=False) == ("committed", True)
    assert demo._prepare_standin("deit_s", COMMITTED, retrain=False, progress=False) == ("committed", False)
    assert calls == []  # nothing trained, nothing built from the cache's own recipe run
    assert demo._prepare_standin("deit_s", tmp_path / "none", retrain=False, progress=False) == ("cached", False)
    assert demo._prepare_standin("deit_s", COMMITTED, retrain=True, progress=False) == ("retrained", True)
    assert calls == [("build", "deit_s"), ("pretrain", "deit_s")]


DEMO_TOLERANCE = 0.3
"""Points of top-1 a demo cell may move on another CPU (3 of the 1,000 digits): the committed stand-in fixes the
weights, but a fine-tune's floating-point order is the CPU's. On the machine that published the table: 0."""


@pytest.mark.usefixtures("offline")
@pytest.mark.slow
def test_three_demo_rows_from_the_committed_stand_in_repeat_the_published_table(tmp_path):
    """A fresh cache (the autouse fixture), the committed stand-in, three of the published rows (the dense model, a
    compressed and fine-tuned one of each kind of allocation): each top-1 within the stated tolerance of
    experiments/results/demo_table2.json, which the README's excerpt equals."""
    published = {r["name"]: r for r in json.loads(
        (COMMITTED.parents[1] / "results" / "demo_table2.json").read_text())["rows"]}
    rows = ["table2/deit_s/baseline", "table2/deit_s/vanilla-svd-ft-40", "table2/deit_s/loss-aware-50"]
    summary = run_demo(tmp_path / "demo", rows=rows, wandb="disabled", figures=False, progress=False,
                       standins=COMMITTED)
    assert summary["standin"] == "committed"
    for row in summary["rows"]:
        theirs = published[row["name"]]
        assert row["params"] == theirs["params"]
        for key in ("top1", "top1_noft"):
            if theirs[key] is not None:
                assert abs(row[key] - theirs[key]) <= DEMO_TOLERANCE, (row["name"], key, row[key], theirs[key])


def _smallest_significant_net_loss(alpha: float = 0.05) -> int:
    """The fewest images a fine-tune must lose, net, before a paired exact McNemar test could call the loss real at
    ``alpha`` (two-sided): with k losses and no gain among the discordant images, p = 2 * 0.5**k, the smallest p any
    k losses can reach; more discordant images only raise it."""
    k = 1
    while 2 * 0.5 ** k >= alpha:
        k += 1
    return k


@pytest.mark.usefixtures("offline")
def test_no_published_demo_row_loses_to_its_own_fine_tune_beyond_the_noise():
    """Issue 41: the smoke fine-tune must not end below the compressed model it started from by more than the
    validation set can resolve. On the 1,000 digits of the demo's validation split a net loss of fewer than 6 images
    (0.6 points) can never be significant by a paired exact McNemar test, whatever the discordant count; every
    published row's drop must stay under it."""
    rows = json.loads((COMMITTED.parents[1] / "results" / "demo_table2.json").read_text())["rows"]
    images = 1_000  # the digits' validation split (stages/data.py: 4,000 train / 1,000 validation)
    limit = 100 * _smallest_significant_net_loss() / images
    assert _smallest_significant_net_loss() == 6 and limit == 0.6
    pairs = [(r["name"], r["top1_noft"], r["top1"]) for r in rows if r["top1_noft"] is not None]
    assert len(pairs) >= 12
    worse = [(name, noft, ft) for name, noft, ft in pairs if noft - ft >= limit - 1e-9]
    assert not worse, f"fine-tuned rows below their no-FT top-1 by {limit} points or more: {worse}"


@pytest.mark.usefixtures("_offline")
def test_publish_rewrites_only_the_excerpt(tmp_path):
    from lowrank_vit.repro.demo import README_MARKERS, format_table, publish, readme_excerpt

    rows = [dict(name="b", method="baseline", reduction=0.0, params=100, top1=90.0, top1_noft=None, residual=None,
                 paper_params=22_100_000, paper_top1=79.8)]
    readme = tmp_path / "README.md"
    start, end = README_MARKERS
    readme.write_text(f"before\n{start}\n```\nold\n```\n{end}\nafter\n")
    publish({"rows": rows, "table": format_table(rows), "seconds": 1.0}, tmp_path / "res" / "demo_table2", readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old" not in text
    assert readme_excerpt(text) == format_table(rows) == (tmp_path / "res/demo_table2.txt").read_text().rstrip()
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no demo excerpt"):
        publish({"rows": rows, "table": "t", "seconds": 1.0}, tmp_path / "res2" / "demo_table2", readme)
    assert not (tmp_path / "res2").exists()
