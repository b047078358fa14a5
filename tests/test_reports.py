"""Tests of lowrank_vit/reports.py."""

from __future__ import annotations

import json

import pytest

from lowrank_vit.reports import CompressionReport, LayerReport


def layers() -> list[LayerReport]:
    return [
        LayerReport("blocks.0.mlp.fc1", 96, 384, 4, 0, 36_864, 12_345, 0.0625, 0.125, 0.1, predicted_loss=0.5),
        LayerReport("blocks.0.mlp.fc2", 384, 96, None, 0, 36_864, 36_864, 0.0, 0.0, 0.0),
    ]


def report(**overrides) -> CompressionReport:
    fields = dict(config={"reduction": 0.25}, params_before=1_200_000, params_after=900_000, target_params=910_000,
                  layers=layers(), sgd_loss={"blocks.0.mlp.fc1": [1.0, 0.5, 0.25]})
    return CompressionReport(**{**fields, **overrides})


def test_ranks_and_reduction():
    r = report()
    assert r.ranks == {"blocks.0.mlp.fc1": 4, "blocks.0.mlp.fc2": None}
    assert r.reduction == pytest.approx(0.25)  # 1 - 900k / 1.2M
    assert report(params_after=1_200_000).reduction == 0.0


def test_defaults_are_empty_and_not_shared_between_reports():
    a = CompressionReport({}, 10, 5, 5, [])
    b = CompressionReport({}, 10, 5, 5, [])
    a.stage_seconds["svd"] = 1.0
    a.allocation.append({"step": 0})
    assert b.stage_seconds == {} and b.allocation == [] and b.sgd_loss == {} and b.substage_seconds == {}
    assert b.latency == {}
    assert layers()[1].predicted_loss is None


def test_to_dict_keeps_the_final_sgd_loss_and_adds_the_reduction_without_touching_the_report():
    r = report(stage_seconds={"calibrate": 1.5})
    out = r.to_dict()
    assert out["reduction"] == pytest.approx(0.25)
    assert out["sgd_loss"] == {"blocks.0.mlp.fc1": 0.25}
    assert r.sgd_loss == {"blocks.0.mlp.fc1": [1.0, 0.5, 0.25]}  # the report keeps every step
    assert out["stage_seconds"] == {"calibrate": 1.5}
    assert out["layers"][0] == {"name": "blocks.0.mlp.fc1", "in_features": 96, "out_features": 384, "rank": 4,
                                "z_params": 0, "dense_params": 36_864, "factored_params": 12_345,
                                "energy_loss": 0.0625, "output_error_lowrank": 0.125, "output_error": 0.1,
                                "predicted_loss": 0.5}
    assert out["layers"][1]["rank"] is None and out["layers"][1]["predicted_loss"] is None


def test_to_json_is_valid_json_and_indent_none_gives_one_line():
    r = report()
    parsed = json.loads(r.to_json())
    assert parsed["params_before"] == 1_200_000 and parsed["layers"][1]["rank"] is None
    assert parsed["sgd_loss"] == {"blocks.0.mlp.fc1": 0.25}
    assert "\n" in r.to_json() and "\n" not in r.to_json(indent=None)
    assert json.loads(r.to_json(indent=None)) == parsed


def test_summary_lists_every_layer_then_the_totals():
    lines = report().summary().splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["layer", "rank", "params", "energy", "err(UV)", "err"]
    assert lines[1].split() == ["blocks.0.mlp.fc1", "4", "12,345", "0.0625", "0.1250", "0.1000"]
    assert lines[2].split() == ["blocks.0.mlp.fc2", "dense", "36,864", "0.0000", "0.0000", "0.0000"]
    assert {len(line) for line in lines[:3]} == {40 + 1 + 5 + 1 + 10 + 3 * (1 + 8)}  # aligned columns
    assert lines[3] == "params 1,200,000 -> 900,000 (-25.0%, target 910,000)"


def test_summary_names_a_speedup_target_and_the_predicted_latency():
    latency = {"predicted_ms": 1.5, "dense_ms": 3.0, "predicted_speedup": 2.0, "batch": 8, "runtime": "torch",
               "dtype": "float32", "device": "cpu"}
    lines = report(config={"target_speedup": 1.5}, latency=latency).summary().splitlines()
    assert lines[-2] == "params 1,200,000 -> 900,000 (-25.0%, target speedup 1.5x)"
    assert lines[-1] == "predicted latency 1.50 ms against 3.00 ms dense (2.00x; batch 8, torch float32 on cpu)"
    # a speedup target of None (the parameter target was used) reads as the parameter count
    assert report(config={"target_speedup": None}).summary().endswith("(-25.0%, target 910,000)")
