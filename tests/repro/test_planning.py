"""Tests of lowrank_vit/repro/planning.py."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_vit.repro.registry import get_experiment
from tests.helpers import (
    TINY_TIMM,
    _plan,
    cli,
)


@pytest.mark.usefixtures("offline_no_token")
def test_plan_smoke_rows(capsys):
    code, out, _ = cli(capsys, "plan", "table2/swin_b/ours-60", "--synthetic", "--scale", "smoke", "--json")
    plan = json.loads(out)
    assert code == 0 and set(plan) >= {"name", "params_before", "params_after", "paper_params"}
    assert plan["params_after"] / plan["params_before"] == pytest.approx(0.4, abs=1e-3)
    code, out, _ = cli(capsys, "plan", "table4/deit_b/ours-50-int8", "--synthetic", "--scale", "smoke", "--json")
    plan = json.loads(out)
    assert plan["paper_size_mib"] == 41.7 and 0 < plan["size_mib"] < plan["params_before"] * 2 / 2**20 / 3


@pytest.mark.usefixtures("offline_no_token")
def test_plan_full_scale_table3_deit_s(capsys):
    """The one full-size plan in the suite (DeiT-S -> 5.0M); `make check-plans` runs every row."""
    code, out, _ = cli(capsys, "plan", "table3/deit_s/ours", "--synthetic", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["params_before"] == 22_050_664 and plan["paper_params"] == 5_000_000
    assert abs(plan["params_after"] - 5_000_000) <= 5_000  # within 0.1%


def test_plan_gives_fwsvd_synthetic_labels():
    """`lowrank-vit plan --synthetic` works for FWSVD, whose Fisher pass needs labelled calibration batches."""
    from lowrank_vit.repro.models import synthetic_labelled
    from lowrank_vit.repro.planning import plan_row

    pairs = synthetic_labelled([torch.zeros(3, 1, 4, 4), torch.zeros(2, 1, 4, 4)], num_classes=10)
    assert [labels.shape[0] for _, labels in pairs] == [3, 2]
    assert all(0 <= int(labels.min()) and int(labels.max()) < 10 for _, labels in pairs)
    plan = plan_row(get_experiment("compare/deit_s/fwsvd-50-noft"), "smoke", calib_images=2)
    assert abs(plan["params_after"] - plan["target_params"]) <= 1e-3 * plan["target_params"]


@pytest.mark.usefixtures("offline")
def test_plan_json_says_the_parameter_target(capsys):
    """`plan --json` carries ``target_params``: the count the allocation aimed at, (1 - reduction) x the model's
    parameters, rounded (docs/api.md: the count lands within 0.1% of it)."""
    code, out, err = cli(capsys, "plan", "table2/deit_s/ours-50", "--scale", "smoke", "--calib-images", "2",
                         "--set", "compression.reduction=0.3", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["target_params"] == round(0.7 * data["params_before"])
    assert abs(data["params_after"] - data["target_params"]) <= 0.001 * data["target_params"]


@pytest.mark.usefixtures("_offline")
@pytest.mark.parametrize("model", [[], TINY_TIMM], ids=["standin", "timm"])
def test_plan_is_seeded_and_its_json_carries_the_layers(capsys, model):
    torch.manual_seed(1)  # whatever state the caller's generator is in, the plan is the same
    first = _plan(capsys, *model)
    torch.manual_seed(2)
    second = _plan(capsys, *model)
    assert first == second
    assert first["seed"] == 0 and first["size_mib"] > 0
    layers = first["layers"]
    assert layers and {tuple(sorted(layer)) for layer in layers} == {("dense_params", "name", "params", "rank")}
    factored = [layer for layer in layers if layer["rank"] is not None]
    assert factored and all(layer["params"] < layer["dense_params"] for layer in factored)
    assert first["params_before"] - first["params_after"] == sum(
        layer["dense_params"] - layer["params"] for layer in layers)


@pytest.mark.usefixtures("_offline")
def test_plan_leaves_the_callers_random_state_alone(capsys):
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    _plan(capsys, *TINY_TIMM)
    assert torch.equal(torch.rand(1), expected)
