"""Tests of lowrank_vit/repro/rows.py."""

from __future__ import annotations

import json

import pytest

from lowrank_vit.repro.registry import (
    get_experiment,
)
from lowrank_vit.repro.rows import BaselineGuardError, check_dense_baseline, paper_baseline
from lowrank_vit.repro.runner import row_config
from tests.helpers import COMPARE, ROW, patch_everywhere


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


@pytest.mark.usefixtures("offline_no_token")
def test_results_of_an_older_version_still_count_as_finished(tmp_path):
    """A field added to the config since a row finished (filled with its default) does not orphan the result."""
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.rows import finished, standin_weights_fingerprint

    exp = get_experiment("compare/deit_s/ours-50")
    cfg = exp.config("smoke")
    old = cfg.to_dict()
    del old["model"]["checkpoint"]
    path = tmp_path / exp.name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": old, "standin_fingerprint": standin_weights_fingerprint("deit_s")}))
    assert finished(exp, cfg, tmp_path) is not None


def test_a_finished_row_of_an_earlier_version_is_still_the_same_config():
    """result.json of an earlier version holds the resolved precision; the same row with "auto" is not "another
    config" (which would refuse to resume), while an explicit different precision is."""
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.rows import comparable

    for name, written in (("table2/deit_s/ours-50", "float64"), ("table2/deit_s/loss-aware-50", "float32")):
        current = get_experiment(name).config("smoke").to_dict()
        assert current["compression"]["gram_precision"] is None
        earlier = {**current, "compression": {**current["compression"], "gram_precision": written}}
        assert comparable(earlier) == comparable(current)
        other = "float32" if written == "float64" else "float64"
        different = {**current, "compression": {**current["compression"], "gram_precision": other}}
        assert comparable(different) != comparable(current)


@pytest.mark.usefixtures("_offline")
def test_wandb_runs_carry_project_and_groupable_keys(monkeypatch, tmp_path):
    import lowrank_vit.stages.logging_utils
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.rows import make_row_logger

    seen = {}
    patch_everywhere(monkeypatch, lowrank_vit.stages.logging_utils, "make_logger", lambda mode, **kw: seen.update(kw))
    exp = get_experiment("table2/deit_s/ours-50")
    make_row_logger(exp, exp.config("smoke"), "offline", tmp_path)
    assert seen["project"] == "lowrank_vit" and seen["group"] == "table2-smoke"
    assert {k: seen["config"][k] for k in ("method", "arch", "ratio")} == {"method": "ours", "arch": "deit_s",
                                                                          "ratio": 50}
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    make_row_logger(exp, exp.config("smoke"), "offline", tmp_path)
    assert seen["project"] == "mine"


def test_compare_rows_log_into_one_wandb_group(monkeypatch, tmp_path):
    import lowrank_vit.stages.logging_utils as logging_utils
    from lowrank_vit.repro.rows import make_row_logger

    groups = []
    patch_everywhere(monkeypatch, logging_utils, "make_logger", lambda *a, **k: groups.append(k["group"]))
    for exp in (COMPARE[0], COMPARE[-1], get_experiment("compare/deit_s/comcat-40-noft")):
        make_row_logger(exp, exp.smoke, "offline", tmp_path)
    assert groups == ["compare-smoke"] * 3
