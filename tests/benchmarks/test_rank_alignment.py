"""Tests of benchmarks/rank_alignment.py."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load, positive_finite


def test_rank_alignment_toy(tmp_path, capsys):
    out = tmp_path / "align.json"
    load("rank_alignment").main(["--tokens", "16", "--dim-in", "12", "--dim-out", "10", "--ranks", "3", "4",
                                 "--repeats", "2", "--json", str(out)])
    assert "flop speedup" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "rank_alignment" and [r["rank"] for r in payload["rows"]] == [3, 4]
    for row in payload["rows"]:
        assert all(positive_finite(row[k]) for k in ("dense_ms", "factorized_ms", "speedup", "flop_speedup"))
    assert payload["rows"][1]["flop_speedup"] == pytest.approx(120 / (4 * 22))
