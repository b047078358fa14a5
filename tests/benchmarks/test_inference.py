"""Tests of benchmarks/inference.py."""

from __future__ import annotations

import json

import pytest

from tests.helpers import (
    TOY,
    has_module,
    load,
    positive_finite,
)


def test_inference_toy(tmp_path, capsys):
    out = tmp_path / "inference.json"
    load("inference").main([*TOY, "--reduction", "0.5", "--batch-size", "1", "2", "--repeats", "2", "--warmup", "1",
                            "--min-time", "0", "--calib", "4", "--rank-multiple", "1", "4", "--json", str(out)])
    assert "speedup" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "inference"
    rows = payload["rows"]
    assert [(r["batch_size"], r["reduction"], r["rank_multiple"]) for r in rows] == [
        (1, 0.5, 1), (1, 0.5, 4), (2, 0.5, 1), (2, 0.5, 4)]
    aligned = [layer for layer in payload["layers"]["0.5/x4"].values() if layer != "dense"]
    assert aligned and all(layer["rank"] % 4 == 0 for layer in aligned)
    for row in rows:
        for key in ("dense_ms", "factorized_ms", "speedup", "flop_speedup", "model_flop_speedup", "fused_ms"):
            assert positive_finite(row[key]), (key, row[key])
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["factorized_ms"])
        assert row["flop_speedup"] > 1.0  # half the parameters gone: fewer multiplications in the block linears
        assert row["fused_max_abs_diff"] < 1e-4  # folding Z into [U G][V Y]^T is the same function


@pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime")
@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_inference_benchmark_times_onnxruntime_beside_pytorch(tmp_path, capsys):
    from tests.helpers import TOY, load, positive_finite

    out = tmp_path / "inference.json"
    load("inference").main([*TOY, "--reduction", "0.5", "--batch-size", "2", "--repeats", "2", "--warmup", "1",
                            "--min-time", "0", "--calib", "4", "--rank-multiple", "1", "--onnxruntime",
                            "--json", str(out)])
    assert "ort speedup" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("ort_dense_ms", "ort_factorized_ms", "ort_speedup"):
        assert positive_finite(row[key]), (key, row[key])
    assert row["ort_speedup"] == pytest.approx(row["ort_dense_ms"] / row["ort_factorized_ms"])
