"""Tests of lowrank_vit/repro/overrides.py."""

from __future__ import annotations

import pytest

from tests.helpers import cli, one_line_error


def test_a_setting_set_on_the_command_line_reaches_the_row_and_a_bad_one_is_one_line():
    from lowrank_vit.repro.overrides import check_overrides
    from lowrank_vit.repro.registry import get_experiment

    row = get_experiment("table2/deit_s/ours-50").full
    check_overrides(["compression.gamma=60", "compression.settings.gamma=60"])
    assert row.override(["compression.gamma=60"]).compression.settings == {"gamma": 60}
    with pytest.raises(ValueError, match=r"^bad override 'compression.gamma=fast': .* expected a number"):
        check_overrides(["compression.gamma=fast"])
    with pytest.raises(ValueError, match=r"^setting 'grad_fraction'=0.5 belongs to decomposition 'loss_aware' or "
                                         r"decomposition 'kfac', not to decomposition='whitened'"):
        row.override(["compression.grad_fraction=0.5"])


@pytest.mark.usefixtures("_offline")
@pytest.mark.parametrize("value, message", [
    ("model.kwargs={img_size: 32}", "not valid JSON"),
    ("model.kwargs={bad", "expected a JSON object"),
    ("finetune.epochs=two", "expected an integer"),
    ("finetune.epochs=1.5", "expected an integer, got float"),
    ("model.pretrained=yes", "expected true or false"),
    ("compression.reduction=[0.5]", "expected a number or null, got list"),
    ("nosuch.field=1", "with a section among"),
])
def test_set_values_are_checked_before_anything_runs(capsys, tmp_path, value, message):
    out = tmp_path / "r"
    for argv in (["run", "table2/deit_s/ours-50", "--scale", "smoke", "--output", str(out)],
                 ["plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke"],
                 ["reproduce", "table2", "--scale", "smoke", "--output", str(out)]):
        code, stdout, err = cli(capsys, *argv, "--set", value)
        assert code == 2 and stdout == "" and message in one_line_error(err)
    assert not out.exists()


@pytest.mark.usefixtures("_offline")
def test_set_values_of_the_right_type_pass():
    from lowrank_vit.repro.overrides import check_overrides

    check_overrides(["finetune.epochs=3", "compression.decomposition=plain", 'model.kwargs={"img_size": 32}',
                     "model.pretrained=false", "data.path=/data/x", "compression.reduction=0.5",
                     "compression.target_params=null", "finetune.lr=1e-2", "size_bits=16",
                     "model.kwargs.img_size=32", "model.kwargs.global_pool=avg"])  # one key of a mapping
    with pytest.raises(ValueError, match="finetune.epochs is not a mapping"):
        check_overrides(["finetune.epochs.first=3"])


def test_pruning_settings_are_checked_like_every_sections():
    from lowrank_vit.repro.overrides import check_overrides

    check_overrides(["pruning.sparsity=0.3", "pruning.scope=global"])
    with pytest.raises(ValueError, match=r"^bad override 'pruning.sparsity=lots': .* expected a number"):
        check_overrides(["pruning.sparsity=lots"])
    with pytest.raises(ValueError, match="no field 'amount' in pruning"):
        check_overrides(["pruning.amount=0.3"])
