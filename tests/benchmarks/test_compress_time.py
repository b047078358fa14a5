"""Tests of benchmarks/compress_time.py."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import TOY, load, positive_finite


def test_compress_time_toy(tmp_path, capsys):
    out = tmp_path / "compress_time.json"
    load("compress_time").main([*TOY, "--calib", "8", "--batch-size", "4", "--recipe", "paper", "--solver",
                                "closed_form", "sgd", "--gram-space", "input", "auto", "--sgd-iterations", "2",
                                "--json", str(out)])
    assert "overhead ratio" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [(r["solver"], r["gram_space"]) for r in rows] == [
        ("closed_form", "input"), ("closed_form", "auto"), ("sgd", "input"), ("sgd", "auto")]
    for row in rows:
        for key in ("calibration_forward_s", "decomposition_s", "compensation_s", "total_s", "overhead_ratio",
                    "calibration_forward_cpu_s", "total_cpu_s"):
            assert positive_finite(row[key]), (key, row[key])
        for key in ("statistics_s", "allocation_s", "report_s", "overhead_ratio_cpu"):
            assert math.isfinite(row[key])  # a difference of two timings: may be slightly negative on a toy model
    assert positive_finite(rows[2]["sgd_s_per_iteration"])
    assert rows[1]["mean_output_error"] == pytest.approx(rows[0]["mean_output_error"], rel=1e-4)
    assert len(payload["environment"]["load_average_at_start"]) == 3


def test_compress_time_peak_child_in_process(tmp_path):
    out = tmp_path / "child.json"
    load("compress_time").main([*TOY, "--calib", "8", "--batch-size", "4", "--peak-child", str(out)])
    row = json.loads(out.read_text())
    assert row["calib_images"] == 8
    assert positive_finite(row["peak_rss_mib"]) and row["peak_rss_mib"] >= row["baseline_rss_mib"]


@pytest.mark.slow
def test_compress_time_peak_memory_toy(tmp_path):
    out = tmp_path / "memory.json"
    load("compress_time").main([*TOY, "--peak-memory", "4", "8", "--batch-size", "4", "--recipe", "loss-aware",
                                "--json", str(out)])
    payload = json.loads(out.read_text())
    assert [r["calib_images"] for r in payload["memory"]] == [4, 8]
    assert all(positive_finite(r["peak_rss_mib"]) for r in payload["memory"])
    assert positive_finite(payload["memory_growth"][0]["peak_ratio"])


@pytest.mark.slow
def test_compress_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """The docs' claim, measured as the benchmark does (peak RSS of a fresh process per N): 16x the images adds
    less than 32 MiB to compress's own memory, for the default (loss-aware) and the paper's recipe. Keeping every
    image's layer inputs would add about 200 MiB here (65 tokens x 448 input features x 2 blocks x 4 bytes = 233 KB
    an image, x 960 more images). Measured: +2 and +1 MiB."""
    out = tmp_path / "memory.json"
    model = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(
        dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10))]
    load("compress_time").main([*model, "--peak-memory", "64", "1024", "--batch-size", "32", "--recipe",
                                "loss-aware", "paper", "--json", str(out)])
    rows = json.loads(out.read_text())["memory"]
    assert [(r["recipe"], r["calib_images"]) for r in rows] == [
        ("loss-aware", 64), ("loss-aware", 1024), ("paper", 64), ("paper", 1024)]
    for small, large in (rows[:2], rows[2:]):
        growth = large["compress_extra_rss_mib"] - small["compress_extra_rss_mib"]
        assert growth < 32, (large["recipe"], growth)


def test_compress_time_gives_the_block_reconstruction_its_own_column(tmp_path):
    """The block stage's seconds are its own, zero in a recipe without it, and the columns still add up to the
    total (the stage counted once: not also in report_s, where it would pass for the swap's cost)."""
    out = tmp_path / "compress_time.json"
    load("compress_time").main([*TOY, "--calib", "8", "--batch-size", "4", "--recipe", "loss-aware",
                                "loss-aware-block", "--json", str(out)])
    rows = {row["recipe"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["loss-aware"]["block_s"] == 0.0
    block = rows["loss-aware-block"]
    assert positive_finite(block["block_s"]) and block["block_s"] < block["total_s"]
    assert block["block_x_forward"] == pytest.approx(block["block_s"] / block["calibration_forward_s"])
    parts = ("calibration_forward", "statistics", "decomposition", "allocation", "compensation", "refit", "block",
             "distill", "report")
    assert sum(block[f"{part}_s"] for part in parts) == pytest.approx(block["total_s"])  # counted once, not twice


def test_compress_time_gives_the_distillation_its_own_column_and_its_steps(tmp_path):
    """The distillation's seconds are their own (zero without it) beside the number of steps they took, and the
    columns add up to the total."""
    out = tmp_path / "compress_time.json"
    load("compress_time").main([*TOY, "--calib", "8", "--batch-size", "4", "--recipe", "loss-aware-refit",
                                "loss-aware-distill-16", "--json", str(out)])
    rows = {row["recipe"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["loss-aware-refit"]["distill_s"] == 0.0 and rows["loss-aware-refit"]["distill_steps"] == 0
    distill = rows["loss-aware-distill-16"]
    assert distill["distill_steps"] == 16 and positive_finite(distill["refit_s"])
    assert positive_finite(distill["distill_s"]) and distill["distill_s"] < distill["total_s"]
    parts = ("calibration_forward", "statistics", "decomposition", "allocation", "compensation", "refit", "block",
             "distill", "report")
    assert sum(distill[f"{part}_s"] for part in parts) == pytest.approx(distill["total_s"])
