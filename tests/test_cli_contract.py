"""The ``lowrank-vit`` command line as a user meets it: every command and option documented in ``--help``, options
that parse and reach their command, the text and JSON that scripts read (plan's per-layer table, profile's JSON
keys), exit statuses, and a reader that closes the pipe early. Each checked against what the docs promise or an
independent count, on tiny models (seconds)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_vit.cli.main import build_parser, main
from lowrank_vit.core.latency import LatencyTable

from conftest import cli, one_line_error


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


# ------------------------------------------------------------------------------------------------ --help


def _subcommands(parser: argparse.ArgumentParser,
                 prefix: str = "") -> list[tuple[str, str | None, argparse.ArgumentParser]]:
    """(name, its help line, its parser) of every subcommand, nested ones included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((prefix + name, helps.get(name), sub))
                found.extend(_subcommands(sub, prefix + name + " "))
    return found


def test_every_subcommand_and_every_option_has_a_help_line():
    """A user reading `lowrank-vit --help` or `lowrank-vit COMMAND --help` would find a command without a line in the
    list, or an option or argument shown bare, with nothing saying what it does."""
    commands = _subcommands(build_parser())
    names = {name for name, _, _ in commands}
    # the commands the README and docs/ describe
    assert names >= {"list", "show", "plan", "run", "reproduce", "demo", "compress", "evaluate", "finetune", "export",
                     "rehearse", "profile"}
    missing = []
    for name, help_line, sub in commands:
        if not (help_line or "").strip():
            missing.append(name)
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"without a help line: {missing}"


# ------------------------------------------------------------------------------------------------ plan


DEIT_S_SMOKE_DIMS = {"attn.qkv": (64, 192), "attn.proj": (64, 64), "mlp.fc1": (64, 256), "mlp.fc2": (256, 64)}
"""(in, out) of each linear layer of the DeiT-S smoke stand-in (width 64, MLP ratio 4)."""


def test_plan_prints_each_layers_rank_and_counts_and_no_progress(capsys):
    """`plan` without --json: a user would read "dense" against a factored layer (or a number against one left dense),
    a column of "None" lines instead of the layers, a stray marker where a row has no paper figure, or progress
    bars on stderr that plan promises not to draw."""
    name = "table2/deit_s/loss-aware-40"  # no paper parameter count; a 5% reduction leaves most layers dense
    code, out, err = cli(capsys, "plan", name, "--synthetic", "--scale", "smoke", "--calib-images", "2",
                         "--set", "compression.reduction=0.05")
    assert code == 0, err
    assert err == ""
    head, columns, *rows = out.splitlines()
    summary = re.fullmatch(re.escape(name) + r" \[smoke, synthetic weights and images, seed 0\]: ([\d,]+) -> "
                           r"([\d,]+) parameters \(-(\d+\.\d\d)%\), \d+\.\d MiB", head)
    assert summary, head
    before, after = (int(summary.group(i).replace(",", "")) for i in (1, 2))
    assert float(summary.group(3)) == pytest.approx(100 * (1 - after / before), abs=0.005)
    assert columns.split() == ["layer", "rank", "params", "dense"]
    assert len(rows) == 4 * 4  # 4 blocks of 4 linear layers
    kinds = set()
    removed = 0
    for row in rows:
        layer, rank, params, dense = row.split()
        params, dense = int(params.replace(",", "")), int(dense.replace(",", ""))
        n_in, n_out = DEIT_S_SMOKE_DIMS[layer.split(".", 2)[2]]
        assert dense == n_in * n_out + n_out, row
        if rank == "dense":
            assert params == dense, row
        else:  # U (out x r) and V (r x in) and the bias: loss-aware has no compensation term
            assert params == int(rank) * (n_in + n_out) + n_out and params < dense, row
        kinds.add(rank == "dense")
        removed += dense - params
    assert kinds == {True, False}  # both kinds of row were printed and checked
    assert before - after == removed


def test_plan_refuses_a_calibration_count_below_one(capsys):
    """--calib-images 0 must be refused at once, in a line naming the option the user typed (not an internal field
    after the model is built); --calib-images 2, a valid count, is read as the number 2 (the plan test above)."""
    code = _exit_code(["plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke", "--calib-images", "0"])
    assert code == 2
    assert "argument --calib-images: expected a positive integer, got '0'" in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ reproduce


def test_reproduce_with_failed_rows_names_them_and_exits_1(capsys, monkeypatch, tmp_path):
    """A user (or a CI job) relies on status 1 and the list of failed rows when some rows fail; a crash there would
    hide which rows to rerun. The rows' processes are faked to fail at once (a real row takes minutes)."""
    from lowrank_vit.repro import runner

    launched = []

    def failing_row(command, **kwargs):
        launched.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(runner.subprocess, "run", failing_row)
    rows = ["table4/deit_b/ours-50-fp16", "table4/deit_b/ours-50-int8"]
    code, out, err = cli(capsys, "reproduce", "table4", "--scale", "smoke", "--rows", "table4/deit_b/ours-50-*",
                         "--output", str(tmp_path / "r"), "--quiet", "--wandb", "disabled")
    assert [command[command.index("run") + 1] for command in launched] == rows
    assert code == 1
    assert err.splitlines()[-1] == f"lowrank-vit: 2 row(s) failed: {', '.join(rows)}"
    assert all(f"`{row}`" in out for row in rows)  # the table of the rows asked for, on stdout


# ------------------------------------------------------------------------------------------------ demo


def test_demo_options_reach_the_demo(monkeypatch):
    """`demo --wandb disabled --no-figures` (both in `demo --help`): refused by the parser, or lost before the demo
    runs, the user would get wandb runs and figures they turned off."""
    from lowrank_vit.repro import demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda output, **kwargs: calls.append(kwargs) or {})
    assert main(["demo", "--wandb", "disabled", "--no-figures", "--quiet", "--output", "x"]) == 0
    assert calls[-1]["wandb"] == "disabled" and calls[-1]["figures"] is False
    assert main(["demo", "--quiet", "--output", "x"]) == 0
    assert calls[-1]["wandb"] == "offline" and calls[-1]["figures"] is True
    assert calls[-1]["retrain"] is False
    assert main(["demo", "--retrain", "--quiet", "--output", "x"]) == 0  # train the stand-in anew
    assert calls[-1]["retrain"] is True


# ------------------------------------------------------------------------------------------------ a closed pipe


def test_a_reader_closing_the_pipe_ends_the_command_quietly():
    """`lowrank-vit list | head -1`: a reader that stops reading must not turn into a traceback and status 1 (the
    docstring of main promises status 0, as cat and ls). Here the pipe is closed before the command writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "lowrank_vit.cli.main", "list"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


# ------------------------------------------------------------------------------------------------ profile

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


def test_profile_times_five_repeats_by_default(profiled):
    """`--repeats` is documented as "default 5": without it a user would get another number of samples per form
    (or none at all)."""
    (entry,), _ = profiled
    assert {shape["dense_ms"]["repeats"] for shape in entry["shapes"]} == {5}


def test_profile_force_measures_again_instead_of_reading_the_cache():
    """`profile --force` must measure anew; a user would otherwise get the stale cached table back, here told apart
    by its repeat count."""
    assert {s["dense_ms"]["repeats"] for s in _profile("--repeats", "1")[0]["shapes"]} == {1}
    assert {s["dense_ms"]["repeats"] for s in _profile("--repeats", "2")[0]["shapes"]} == {1}  # the cached table
    assert {s["dense_ms"]["repeats"] for s in _profile("--repeats", "2", "--force")[0]["shapes"]} == {2}


def test_a_closed_pipe_points_stdout_at_dev_null_so_the_exit_flush_cannot_fail_again(tmp_path, monkeypatch):
    """In process, what the subprocess test above sees from outside: the handler returns 0 and leaves the stdout
    descriptor writing to /dev/null (Python flushes stdout once more at exit; a closed pipe there would print a
    traceback after all)."""
    import io

    from lowrank_vit.cli.main import main

    target = tmp_path / "stdout"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT)

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return fd

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert main(["list", "table2/deit_s/*"]) == 0
        os.write(fd, b"written after the pipe closed")  # goes where the handler pointed the descriptor
    finally:
        os.close(fd)
    assert target.read_bytes() == b""


# ------------------------------------------------------------------------------ the fourth run's open survivors


def test_plan_json_holds_the_fields_scripts_read(capsys):
    """`plan --json`: a script grouping plans by scale or comparing counts reads these keys."""
    code = main(["plan", "table2/deit_s/ours-50", "--scale", "smoke", "--calib-images", "2", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["name"] == "table2/deit_s/ours-50" and data["scale"] == "smoke"
    assert data["params_after"] < data["params_before"] and isinstance(data["seed"], int)


def test_demo_rows_takes_several_rows(monkeypatch):
    from lowrank_vit.repro import demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda output, **kwargs: calls.append(kwargs) or {})
    rows = ["table2/deit_s/baseline", "table2/deit_s/ours-50"]
    assert main(["demo", "--rows", *rows, "--quiet", "--output", "x"]) == 0
    assert list(calls[-1]["rows"]) == rows
