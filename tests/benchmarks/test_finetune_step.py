"""Tests of benchmarks/finetune_step.py."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TOY, load, positive_finite


def test_finetune_step_toy(tmp_path, capsys):
    out = tmp_path / "finetune_step.json"
    load("finetune_step").main([*TOY, "--batch-size", "4", "--steps", "4", "--warmup", "1",
                                "--precision", "32-true", "bf16-mixed", "--json", str(out)])
    assert "speedup" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "finetune_step"
    rows = payload["rows"]
    assert [r["precision"] for r in rows] == ["32-true", "bf16-mixed"]
    for row in rows:
        assert row["steps_timed"] == 3 == len(row["step_samples_ms"])  # 4 steps, the first dropped
        for key in ("step_ms", "images_per_s", "speedup"):
            assert positive_finite(row[key]), (key, row[key])
        assert row["images_per_s"] == pytest.approx(4 / (row["step_ms"] / 1e3))
    assert rows[0]["speedup"] == 1.0
    for bad in (["--warmup", "4"], ["--precision", "16-mixed"], ["--precision", "bf16-true"]):
        with pytest.raises(SystemExit) as info:
            load("finetune_step").main([*TOY, "--steps", "4", *bad])
        assert info.value.code == 2
