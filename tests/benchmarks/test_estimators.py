"""Tests of benchmarks/estimators.py."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TOY, load, positive_finite


def test_estimators_toy(tmp_path):
    out = tmp_path / "estimators.json"
    load("estimators").main([*TOY, "--calib", "8", "--heldout", "4", "--batch-size", "4", "--estimator", "exact",
                             "exact+f32", "range", "range+f32+tokens:0.5+eigh", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert payload["reference"] == "exact"
    assert [r["estimator"] for r in rows] == ["exact", "exact+f32", "range", "range+f32+tokens:0.5+eigh"]
    assert [r["exact_statistics"] for r in rows] == [True, True, True, False]
    for row in rows:
        assert positive_finite(row["heldout_eq5"]) and positive_finite(row["overhead_ratio"])
    assert rows[1]["heldout_vs_exact"] == pytest.approx(0.0, abs=1e-5)  # float32 products: the same statistics
    assert rows[2]["heldout_vs_exact"] == pytest.approx(0.0, abs=1e-5)  # output-side Gram: the same decomposition
