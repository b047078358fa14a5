"""Tests of benchmarks/latency.py."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load, positive_finite


def test_latency_toy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "latency.json"
    toy = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
           json.dumps(dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=4))]
    module = load("latency")
    module.main([*toy, "--reduction", "0.5", "--target-speedup", "1.1", "1000", "--batch-size", "2", "--repeats",
                 "2", "--profile-repeats", "1", "--min-time", "0", "--calib", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "predicted" in printed and "speed@1000: target_speedup=1000 is out of reach" in printed
    payload = json.loads(out.read_text())
    rows = {row["variant"]: row for row in payload["rows"]}
    assert set(rows) == {"params@0.5", "capped@0.5", "speed@1.1", "speed@1000"}
    assert "error" in rows["speed@1000"] and "speedup" not in rows["speed@1000"]
    assert rows["params@0.5"]["reduction"] == pytest.approx(0.5, abs=0.01)  # blind to speed: always reachable
    for row in rows.values():  # what the measured timings make reachable varies; every row is one or the other
        if "error" in row:
            continue
        assert positive_finite(row["speedup"]) and positive_finite(row["predicted_speedup"])
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["ms"])
        assert all(r is None or r % 8 == 0 or r < 8 for r in row["ranks"].values())
        if row["variant"].startswith("speed@"):
            assert row["predicted_speedup"] >= float(row["variant"][6:]) - 1e-9
    table = module.markdown(payload)
    assert table.count("\n") == 1 + len(rows) and "not reachable on this table" in table


def _compile_runs_here() -> str | None:
    """Why torch.compile cannot run here (no C compiler, an unsupported platform...), or None where it can."""
    import torch

    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(2))
    except Exception as exc:  # inductor's failures come as many types: any one means not here
        return f"torch.compile cannot run here: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def test_latency_offers_the_librarys_runtimes():
    """The runtimes are the library's registry (the CLI's ``--runtime``), so one it gains the benchmark has too."""
    from lowrank_vit.speed.runtimes import RUNTIMES

    runtime = next(a for a in load("latency").build_parser()._actions if a.dest == "runtime")
    assert list(runtime.choices) == list(RUNTIMES) and "torch.compile" in runtime.choices


@pytest.mark.slow  # every layer form compiled once: ~20 s on one core with a cold inductor cache
def test_latency_runs_the_librarys_torch_compile_runtime(tmp_path, capsys, monkeypatch):
    """``--runtime torch.compile``: the dense model profiled and every variant timed compiled, its rows and table
    named by the runtime (a CPU, a tiny model: skipped where inductor cannot compile here)."""
    module = load("latency")
    reason = _compile_runs_here()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "latency.json"
    toy = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
           json.dumps(dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0,
                                num_classes=4))]
    module.main([*toy, "--runtime", "torch.compile", "--reduction", "0.5", "--target-speedup", "--batch-size", "1",
                 "--repeats", "1", "--profile-repeats", "1", "--min-time", "0", "--calib", "2", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert {row["runtime"] for row in payload["rows"]} == {"torch.compile"}
    assert {row["variant"] for row in payload["rows"]} == {"params@0.5", "capped@0.5"}
    assert all(row["table"].endswith(".json") and "-torch.compile-" in row["table"] for row in payload["rows"])
    assert positive_finite(payload["rows"][0]["dense_ms"])
    assert "torch.compile" in capsys.readouterr().out


def test_latency_profiles_in_the_runtime_named_and_times_in_the_others(tmp_path, monkeypatch):
    """``--profile-runtime torch``: the allocations read the eager table while onnxruntime times the models, and
    each row names both (a compiled runtime's profile would compile every layer form once)."""
    from tests.helpers import has_module

    if not has_module("onnxruntime"):
        pytest.skip("needs onnxruntime")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "latency.json"
    toy = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
           json.dumps(dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3))]
    load("latency").main([*toy, "--runtime", "onnxruntime", "--profile-runtime", "torch", "--reduction", "0.5",
                          "--target-speedup", "--batch-size", "2", "--repeats", "1", "--profile-repeats", "1",
                          "--min-time", "0", "--calib", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(row["runtime"], row["profile_runtime"]) for row in rows} == {("onnxruntime", "torch")}
    assert all("-torch-" in row["table"] and "onnxruntime" not in row["table"] for row in rows)
