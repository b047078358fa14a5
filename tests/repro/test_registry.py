"""Tests of lowrank_vit/repro/registry.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lowrank_vit.config import CompressionConfig
from lowrank_vit.repro.registry import (
    Experiment,
    ModelConfig,
    RunConfig,
    UnknownExperimentError,
    get_experiment,
    list_experiments,
    register_experiment,
)
from lowrank_vit.repro.runner import row_config
from lowrank_vit.stages.data_config import DataConfig
from tests.helpers import PACKAGE, ROW


def test_experiments_register_through_the_entry_point():
    from lowrank_vit.repro import registry

    assert registry.ENTRY_POINT_GROUP in Path(PACKAGE.parent / "pyproject.toml").read_text()
    assert registry.list_experiments("table2") and registry.arch_label("deit_s") == "DeiT-S"


def test_skip_baseline_guard_is_a_typed_run_setting():
    cfg = row_config(get_experiment(ROW), "full", ["run.skip_baseline_guard=true"])
    assert cfg.run.skip_baseline_guard is True
    assert row_config(get_experiment(ROW), "full").run.skip_baseline_guard is False
    with pytest.raises(ValueError, match="expected true or false"):
        row_config(get_experiment(ROW), "full", ["run.skip_baseline_guard=maybe"])
    with pytest.raises(ValueError, match="no field"):
        row_config(get_experiment(ROW), "full", ["run.skip_guard=true"])


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownExperimentError, match="did you mean table2/deit_b/ours-50"):
        get_experiment("table2/deit_b/ours50")
    with pytest.raises(UnknownExperimentError, match="lowrank-vit list"):
        get_experiment("nothing-like-it")


def test_list_patterns():
    assert [e.name for e in list_experiments("table2/deit_s/*")] == [
        "table2/deit_s/baseline", "table2/deit_s/ours-40", "table2/deit_s/loss-aware-40", "table2/deit_s/ours-50",
        "table2/deit_s/loss-aware-50", "table2/deit_s/ours-60", "table2/deit_s/loss-aware-60",
        "table2/deit_s/vanilla-svd-ft-40"]
    assert {e.table for e in list_experiments("table3")} == {"table3"}
    assert list_experiments("no/such/*") == []


def _row(name: str = "ablation/deit_s/test-row") -> Experiment:
    run = RunConfig("full", ModelConfig("timm", "deit_small_patch16_224"), DataConfig(name="mnist-5k"),
                    CompressionConfig(reduction=0.5))
    return Experiment(name, name.split("/")[0], "deit_s", "ours", run,
                      RunConfig("smoke", ModelConfig("standin", "deit_s"), DataConfig(name="mnist-5k")))


def test_registration_rejects_duplicates_and_bad_entries():
    row = get_experiment("table2/deit_s/ours-50")
    register_experiment(lambda: row)  # the same row again (experiments/ imported under two names): accepted
    assert get_experiment(row.name) is row
    with pytest.raises(ValueError, match="registered twice"):
        register_experiment(lambda: replace(row, reduction=0.3))
    with pytest.raises(ValueError, match="TABLE/ARCH/METHOD"):
        _row("ablation/deit_s")
    with pytest.raises(TypeError, match="not an Experiment"):
        register_experiment(lambda: ["a string"])
    with pytest.raises(ValueError, match="wrong scale"):
        exp = _row()
        Experiment(exp.name, exp.table, exp.arch, exp.method, exp.smoke, exp.full)


def test_overrides():
    cfg = get_experiment("table2/deit_s/ours-50").smoke
    new = cfg.override(["finetune.epochs=1", "data.calib_samples=32", "compression.calib_samples=32",
                        "model.pretrained=false", "compression.decomposition=plain"])
    assert new.finetune.epochs == 1 and new.data.calib_samples == 32 and not new.model.pretrained
    assert new.compression.decomposition == "plain" and cfg.finetune.epochs == 2  # the registry is untouched
    for bad, message in (("finetune.epochs", "expected section.field=value"), ("nope.x=1", "not a section"),
                         ("finetune.epoch=1", "no field 'epoch'"), ("finetune.epochs=0", "positive integer"),
                         ("compression.decomposition=qr", "decomposition")):
        with pytest.raises(ValueError, match=message):
            cfg.override([bad])


# ------------------------------------------------------------------------------------------- the pruning field


def test_pruning_is_serialized_like_vmeanba_and_set_from_the_command_line():
    from lowrank_vit.methods.prune import PruningConfig

    exp = get_experiment("vmeanba/vmamba_t/vmeanba-k4-prune-40")
    for cfg in (exp.full, exp.smoke):
        assert cfg.pruning == PruningConfig(0.4, "global") and cfg.vmeanba.num_blocks == 4
        assert cfg.to_dict()["pruning"] == {"sparsity": 0.4, "scope": "global"}
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
    new = exp.full.override(["pruning.sparsity=0.3", "pruning.scope=layer"])
    assert new.pruning == PruningConfig(0.3, "layer") and exp.full.pruning.sparsity == 0.4
    base = get_experiment("vmeanba/vmamba_t/baseline").full
    assert base.pruning is None and base.to_dict()["pruning"] is None
    assert base.override(["pruning.sparsity=0.3"]).pruning is None  # a section the row lacks: skipped
    for bad, message in (("pruning.sparsity=1", r"sparsity must lie in \[0, 1\)"),
                         ("pruning.scope=row", "scope must be one of"), ("pruning.spars=0.3", "no field 'spars'")):
        with pytest.raises(ValueError, match=message):
            exp.full.override([bad])
    with pytest.raises(ValueError, match="unknown PruningConfig field"):
        RunConfig.from_dict({**exp.full.to_dict(), "pruning": {"sparsity": 0.4, "amount": 1}})


def test_pruning_refuses_a_low_rank_step_or_a_fine_tune_after_it():
    from lowrank_vit.methods.prune import PruningConfig

    low_rank = get_experiment("vmeanba/vmamba_t/loss-aware-40").full
    with pytest.raises(ValueError, match="replaces the pruned weights by dense factors"):
        replace(low_rank, pruning=PruningConfig())
    with pytest.raises(ValueError, match="would regrow the pruned weights"):
        replace(low_rank, compression=None, pruning=PruningConfig())  # its fine-tune is still there
    assert replace(low_rank, compression=None, finetune=None, pruning=PruningConfig()).pruning.sparsity == 0.4


def test_pruning_rows_have_labels():
    from lowrank_vit.repro.registry import METHOD_LABELS

    methods = {e.method for e in list_experiments("vmeanba/*") if e.full.pruning is not None}
    assert methods == {"prune", "vmeanba+prune"} and methods <= set(METHOD_LABELS)
