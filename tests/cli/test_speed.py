"""Tests of lowrank_vit/cli/speed.py."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_vit.cli.main import main
from lowrank_vit.core.latency import (
    LatencyTable,
    Timing,
)
from tests.helpers import CLI_MODEL, _compress_argv, _fabricated, _latency_model, cli, one_line_error, patch_everywhere

ARCH = "vit_tiny_patch16_224"


KWARGS = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=3)


PROFILE = ["profile", ARCH, "--model-kwargs", json.dumps(KWARGS), "--quiet", "--json"]


def _profile(*extra: str) -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*PROFILE, *extra])
    assert code == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> tuple[list[dict], Path]:
    """`profile --json --plot DIR` of a one-block ViT with the default repeats: (its JSON, DIR)."""
    tmp = tmp_path_factory.mktemp("profile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWRANK_VIT_CACHE", str(tmp / "cache"))
        return _profile("--plot", str(tmp / "figs")), tmp / "figs"


@pytest.mark.usefixtures("offline")
def test_profile_json_has_the_keys_scripts_read(profiled):
    """A script reading profile's JSON (docs/speed.md) would meet a KeyError: each timing's quartiles q1 and q3,
    the device measured, the figure drawn."""
    (entry,), figs = profiled
    table = LatencyTable.load(entry["table"])
    assert entry["device"] == table.device_name and entry["device"].strip()
    assert (entry["model"], entry["batch"], entry["runtime"], entry["dtype"]) == (ARCH, 1, "torch", "float32")
    figure = Path(entry["figure"])
    assert figure.parent == figs and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = {(s.in_features, s.out_features): s.dense for s in table.shapes.values()}
    assert {(s["in"], s["out"]) for s in entry["shapes"]} == {(16, 48), (16, 16), (16, 32), (32, 16)}
    for shape in entry["shapes"]:
        timing, truth = shape["dense_ms"], stored[shape["in"], shape["out"]]
        assert set(timing) == {"median", "q1", "q3", "repeats"}
        assert (timing["q1"], timing["median"], timing["q3"]) == pytest.approx((truth.low, truth.median, truth.high))
        assert timing["q1"] <= timing["median"] <= timing["q3"]
    assert set(entry["model_ms"]) == {"median", "q1", "q3", "repeats"}


@pytest.mark.usefixtures("offline")
def test_profile_times_five_repeats_by_default(profiled):
    """`--repeats` is documented as "default 5": without it a user would get another number of samples per form
    (or none at all)."""
    (entry,), _ = profiled
    assert {shape["dense_ms"]["repeats"] for shape in entry["shapes"]} == {5}


@pytest.mark.usefixtures("offline")
def test_profile_force_measures_again_instead_of_reading_the_cache():
    """`profile --force` must measure anew; a user would otherwise get the stale cached table back, here told apart
    by its repeat count."""
    assert {s["dense_ms"]["repeats"] for s in _profile("--repeats", "1")[0]["shapes"]} == {1}
    assert {s["dense_ms"]["repeats"] for s in _profile("--repeats", "2")[0]["shapes"]} == {1}  # the cached table
    assert {s["dense_ms"]["repeats"] for s in _profile("--repeats", "2", "--force")[0]["shapes"]} == {2}


@pytest.mark.usefixtures("offline")
def test_an_auto_latency_table_is_profiled_in_the_precision_asked_for(
    images_and_weights, tmp_path, capsys, monkeypatch
):
    """`--latency-table auto --latency-dtype bfloat16`: the profile compress takes is measured in bfloat16, on the
    runtime and batch asked for, not in a default."""
    from lowrank_vit import speed

    asked = {}

    def profile(model, **kwargs):
        asked.update(kwargs)
        raise ValueError("stop here")  # refused as the user's error: enough to see what was asked

    patch_everywhere(monkeypatch, speed, "cached_profile", profile)
    code, _, err = cli(
        capsys,
        *_compress_argv(
            images_and_weights,
            tmp_path / "l",
            "--latency-table",
            "auto",
            "--latency-dtype",
            "bfloat16",
            "--latency-batch",
            "4",
            "--quiet",
        ),
    )
    assert code == 2 and "stop here" in err
    assert asked["dtype"] == "bfloat16" and asked["batch"] == 4 and asked["runtime"] == "torch"


@pytest.mark.usefixtures("offline")
def test_the_profile_table_heads_each_column_with_what_it_holds():
    """`profile`'s table: the third column is how many of the model's layers have that shape (counted by hand)."""
    from lowrank_vit.cli.speed import render, summary
    from lowrank_vit.core.latency import LatencyTable, ShapeLatency, Timing

    def t(ms: float) -> Timing:
        return Timing(ms, ms * 0.9, ms * 1.1, 3)

    shapes = [
        ShapeLatency(32, 96, 17, True, t(0.5), (8, 16), (t(0.2), t(0.6))),
        ShapeLatency(128, 32, 17, True, t(0.4), (8, 16), (t(0.3), t(0.35))),
    ]
    keys = [s.key for s in shapes]
    table = LatencyTable(
        "tiny",
        1,
        "cpu",
        "a CPU",
        "torch",
        "float32",
        2,
        {"torch": torch.__version__},
        t(3.0),
        {"blocks.0.attn.qkv": keys[0], "blocks.1.attn.qkv": keys[0], "blocks.0.mlp.fc2": keys[1]},
        dict(zip(keys, shapes, strict=True)),
    )
    assert [shape["layers"] for shape in summary(table)["shapes"]] == [2, 1]  # `profile --json`'s count
    lines = render(table).splitlines()
    assert lines[1].split() == ["shape", "rows", "layers", "dense", "ms", "IQR", "break-even", "of"]
    assert [line.split()[:3] for line in lines[2:4]] == [["32x96", "17", "2"], ["128x32", "17", "1"]]
    assert [line.split()[-2:] for line in lines[2:4]] == [["8", "16"], ["16", "16"]]
    assert lines[-1] == (
        "break-even: the largest profiled rank at which the factored layer is faster than dense (0: "
        "never); of: the largest rank profiled (the equal-cost rank, in steps)"
    )


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("quiet", [False, True])
def test_profiling_a_model_for_compress_shows_progress_unless_quiet(quiet, monkeypatch, tmp_path):
    from lowrank_vit import speed
    from lowrank_vit.cli.speed import resolve_latency_table

    seen = {}

    def profile(model, **kwargs):
        seen.update(kwargs)
        return None, tmp_path / "table.json", True

    patch_everywhere(monkeypatch, speed, "cached_profile", profile)
    args = argparse.Namespace(
        latency_table="auto",
        target_speedup=None,
        latency_device=None,
        latency_batch=1,
        latency_runtime="torch",
        latency_dtype="float32",
        quiet=quiet,
    )
    assert resolve_latency_table(args, torch.nn.Identity(), "tiny", "cpu") == str(tmp_path / "table.json")
    assert seen["progress"] is (not quiet) and seen["device"] == "cpu"


def test_cli_profile_prints_the_table_and_writes_the_figure(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    code, out, err = cli(
        capsys,
        "profile",
        *CLI_MODEL,
        "--batch",
        "2",
        "--repeats",
        "1",
        "--plot",
        str(tmp_path / "figs"),
        "--output",
        str(tmp_path / "tables"),
        "--quiet",
    )
    assert code == 0, err
    assert "break-even" in out and "36x108" in out
    assert len(list((tmp_path / "figs").glob("*.png"))) == 1
    (table_file,) = (tmp_path / "tables").glob("*.json")
    assert LatencyTable.load(table_file).batch == 2


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--runtime", "onnxruntime", "--dtype", "float16"], "runs float32"),
        (["--device", "cuda"], "cuda"),
    ],
)
def test_cli_profile_bad_input_is_one_line_with_status_2(capsys, tmp_path, monkeypatch, extra, match):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path))
    code, _, err = cli(capsys, "profile", *CLI_MODEL, "--quiet", *extra)
    assert code == 2
    assert match in one_line_error(err)


def test_cli_compress_for_a_target_speedup_reports_predicted_and_measured_latency(capsys, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(25):  # five classes, as the model has
        folder = tmp_path / "imgs" / f"c{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 40, 3)) * 120 + 25 * (i % 5)).astype(np.uint8)).save(folder / f"{i}.png")
    model = _latency_model()
    table = _fabricated(model, batch=4)
    path = table.save(tmp_path / "t.json")
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys,
        "compress",
        *CLI_MODEL,
        "--no-pretrained",
        "--data",
        str(tmp_path / "imgs"),
        "--target-speedup",
        "1.25",
        "--latency-table",
        str(path),
        "--calib-samples",
        "16",
        "--no-eval",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--quiet",
        "--output",
        str(out),
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    latency = report["latency"]
    assert latency["batch"] == 4 and latency["predicted_speedup"] >= 1.25 - 1e-9
    assert latency["measured"]["dense"]["repeats"] == 7 and latency["measured_speedup"] > 0
    assert "predicted" in stdout and "measured at batch 4" in stdout
    assert report["compression"]["config"]["rank_multiple"] == 8  # the profiled grid's step, by default
    plan = json.loads((out / "lowrank_vit.json").read_text())
    assert plan["metadata"]["compression_config"]["target_speedup"] == 1.25


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("quiet", [False, True])
def test_profile_measures_with_a_progress_bar_unless_quiet(quiet, capsys, monkeypatch):
    """`lowrank-vit profile` hands the profile a progress bar, and `--quiet` takes it away (the way round a user
    asked, not the other)."""
    from lowrank_vit import speed

    asked = {}

    def profile(model, **kwargs):
        asked.update(kwargs)
        raise ValueError("stop here")  # refused as the user's error: enough to see what was asked

    patch_everywhere(monkeypatch, speed, "cached_profile", profile)
    argv = ["profile", ARCH, "--model-kwargs", json.dumps(KWARGS)] + (["--quiet"] if quiet else [])
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "stop here" in err
    assert asked["progress"] is (not quiet)


@pytest.mark.usefixtures("offline")
def test_the_measured_latency_is_timed_where_the_table_was_profiled(monkeypatch, tmp_path, capsys):
    """compress's measured speedup stands beside the table's prediction, so both models are timed on the table's
    device, batch, runtime and precision (a table profiled on a GPU: timed on that GPU, not on the CPU), and the line
    printed says where."""
    from lowrank_vit import speed
    from lowrank_vit.cli.speed import measured_latency

    path = _fabricated(_latency_model(), batch=4, device="cuda").save(tmp_path / "t.json")
    asked = {}

    def time_models(models, **kwargs):
        asked.update(kwargs)
        return {"dense": Timing(6.0, 5.5, 6.5, 7), "compressed": Timing(4.0, 3.5, 4.5, 7)}

    patch_everywhere(monkeypatch, speed, "time_models", time_models)
    report = {"latency": {"batch": 4, "predicted_speedup": 1.4}, "config": {"latency_table": str(path)}}
    args = argparse.Namespace(no_timing=False, quiet=False)
    model = _latency_model()
    out = measured_latency(args, model, model, report)
    assert (asked["device"], asked["batch"], asked["runtime"], asked["dtype"]) == ("cuda", 4, "torch", "float32")
    assert out["measured_speedup"] == pytest.approx(1.5)
    assert "latency, batch 4, torch float32 on cuda: dense 6.00 ms" in capsys.readouterr().err


@pytest.mark.usefixtures("offline")
def test_profile_says_whether_it_measured_or_read_the_cache(capsys, monkeypatch, tmp_path):
    """Without --quiet, stderr tells the user whether the table was measured now or read back from the cache (a
    cached table may have been measured under another load on the machine), and where the table is."""
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    argv = ["profile", ARCH, "--model-kwargs", json.dumps(KWARGS), "--repeats", "1", "--json"]

    def said() -> tuple[str, Path]:
        code, out, err = cli(capsys, *argv)
        assert code == 0, err
        (entry,) = json.loads(out)
        (line,) = [line for line in err.splitlines() if line.startswith(("measured: ", "cached: "))]
        word, path = line.split(": ", 1)
        assert Path(path) == Path(entry["table"]) and Path(path).is_relative_to(tmp_path / "cache")
        return word

    assert said() == "measured"  # an empty cache: profiled now
    assert said() == "cached"  # the same profile again: read back
