"""Tests of lowrank_vit/cli/main.py."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_vit.cli.main import build_parser, main
from lowrank_vit.repro.registry import list_experiments
from tests.helpers import (
    QUICK_SETS,
    ROOT,
    ROWS,
    cli,
    one_line_error,
    patch_everywhere,
)


@pytest.mark.usefixtures("offline_no_token")
def test_list_and_show(capsys):
    code, out, _ = cli(capsys, "list", "table2/deit_s/*")
    assert code == 0 and out.split() == [
        "table2/deit_s/baseline", "table2/deit_s/ours-40", "table2/deit_s/loss-aware-40", "table2/deit_s/ours-50",
        "table2/deit_s/loss-aware-50", "table2/deit_s/ours-60", "table2/deit_s/loss-aware-60",
        "table2/deit_s/vanilla-svd-ft-40"]
    code, out, _ = cli(capsys, "list", "table4", "--json")
    entries = json.loads(out)
    assert code == 0 and len(entries) == 4
    assert {e["paper"]["size_mib"] for e in entries} == {165.2, 82.6, 41.7, 42.2}
    code, out, _ = cli(capsys, "show", "table3/vit_l/ours", "--scale", "full")
    shown = json.loads(out)
    assert code == 0 and shown["config"]["compression"]["target_params"] == 86_000_000
    assert shown["config"]["model"]["name"].startswith("vit_large_patch16_224")
    code, out, _ = cli(capsys, "show", "table3/vit_l/ours")
    assert set(json.loads(out)) >= {"full", "smoke", "paper"}


@pytest.mark.usefixtures("offline_no_token")
@pytest.mark.parametrize("argv, message", [
    (["show", "table2/deit_b/ours-5"], "did you mean table2/deit_b/ours-50"),
    (["list", "tabel2/*"], "no experiment matches"),
    (["run", "table2/deit_s/ours-50", "--devices", "0"], "positive integer"),
    (["run", "table2/deit_s/ours-50", "--scale", "huge"], "invalid choice"),
    (["run", "table2/deit_s/ours-50", "--set", "finetune.epochs=0"], "epochs must be a positive integer"),
    (["run", "table2/deit_s/ours-50", "--set", "finetune.epoch=3"], "no field 'epoch'"),
    (["run", "table2/deit_s/ours-50", "--set", "finetune.precision=bf16"], "precision must be one of"),
    (["run", "table2/deit_s/ours-50", "--scale", "smoke", "--accelerator", "cpu", "--set",
      "finetune.precision=16-mixed", "--output", "/nonexistent/never-written"], "16-mixed needs a GPU"),
    (["reproduce", "table9"], "unknown table 'table9'"),
    (["reproduce", "table2", "--rows", "table3/*"], "matches no row"),
    (["plan", "table2/deit_s/ours-51"], "unknown experiment"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert message in one_line_error(capsys.readouterr().err)


@pytest.mark.usefixtures("offline_no_token")
@pytest.mark.slow
def test_console_script_error_in_a_new_process():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lowrank_vit.cli.main", "show", "table2/nope/ours-50"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown experiment" in one_line_error(proc.stderr)


@pytest.mark.usefixtures("offline_no_token")
def test_plan_needs_no_flag_for_its_only_mode_and_the_version_is_the_installed_one(capsys):
    """`plan NAME` as the README writes it (synthetic is its only mode), and `--version` from the package metadata."""
    from importlib.metadata import version

    code, out, _ = cli(capsys, "plan", "table2/swin_b/ours-60", "--scale", "smoke", "--json")
    assert code == 0 and json.loads(out)["params_after"] < json.loads(out)["params_before"]
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"lowrank-vit {version('lowrank_vit')}"


@pytest.mark.usefixtures("offline_no_token")
def test_json_without_an_estimate_is_refused_on_reproduce_and_an_interrupt_ends_quietly(capsys, monkeypatch):
    code, _, err = cli(capsys, "reproduce", "table2", "--json")
    assert code == 2 and "--json prints an estimate: add --dry-run --estimate" in one_line_error(err)
    from lowrank_vit.cli import main as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli_module.COMMANDS, "list", interrupted)
    assert main(["list"]) == 130
    assert capsys.readouterr().err.strip() == "lowrank-vit: interrupted"


@pytest.mark.usefixtures("offline_no_token")
@pytest.mark.parametrize("accelerator", ["cpu", "gpu", "auto"])
def test_every_accelerator_choice_parses(accelerator):
    from lowrank_vit.cli.main import build_parser

    args = build_parser().parse_args(["run", "table2/deit_s/baseline", "--accelerator", accelerator])
    assert args.accelerator == accelerator


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


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


@pytest.mark.usefixtures("offline")
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


DEIT_S_SMOKE_DIMS = {"attn.qkv": (64, 192), "attn.proj": (64, 64), "mlp.fc1": (64, 256), "mlp.fc2": (256, 64)}
"""(in, out) of each linear layer of the DeiT-S smoke stand-in (width 64, MLP ratio 4)."""


@pytest.mark.usefixtures("offline")
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


@pytest.mark.usefixtures("offline")
def test_plan_refuses_a_calibration_count_below_one(capsys):
    """--calib-images 0 must be refused at once, in a line naming the option the user typed (not an internal field
    after the model is built); --calib-images 2, a valid count, is read as the number 2 (the plan test above)."""
    code = _exit_code(["plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke", "--calib-images", "0"])
    assert code == 2
    assert "argument --calib-images: expected a positive integer, got '0'" in one_line_error(capsys.readouterr().err)


@pytest.mark.usefixtures("offline")
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


@pytest.mark.usefixtures("offline")
def test_demo_options_reach_the_demo(monkeypatch):
    """`demo --wandb disabled --no-figures` (both in `demo --help`): refused by the parser, or lost before the demo
    runs, the user would get wandb runs and figures they turned off."""
    from lowrank_vit.repro import demo

    calls = []
    patch_everywhere(monkeypatch, demo, "run_demo", lambda output, **kwargs: calls.append(kwargs) or {})
    assert main(["demo", "--wandb", "disabled", "--no-figures", "--quiet", "--output", "x"]) == 0
    assert calls[-1]["wandb"] == "disabled" and calls[-1]["figures"] is False
    assert main(["demo", "--quiet", "--output", "x"]) == 0
    assert calls[-1]["wandb"] == "offline" and calls[-1]["figures"] is True
    assert calls[-1]["retrain"] is False
    assert main(["demo", "--retrain", "--quiet", "--output", "x"]) == 0  # train the stand-in anew
    assert calls[-1]["retrain"] is True


@pytest.mark.usefixtures("offline")
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


@pytest.mark.usefixtures("offline")
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


@pytest.mark.usefixtures("offline")
def test_plan_json_holds_the_fields_scripts_read(capsys):
    """`plan --json`: a script grouping plans by scale or comparing counts reads these keys."""
    code = main(["plan", "table2/deit_s/ours-50", "--scale", "smoke", "--calib-images", "2", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["name"] == "table2/deit_s/ours-50" and data["scale"] == "smoke"
    assert data["params_after"] < data["params_before"] and isinstance(data["seed"], int)


@pytest.mark.usefixtures("offline")
def test_demo_rows_takes_several_rows(monkeypatch):
    from lowrank_vit.repro import demo

    calls = []
    patch_everywhere(monkeypatch, demo, "run_demo", lambda output, **kwargs: calls.append(kwargs) or {})
    rows = ["table2/deit_s/baseline", "table2/deit_s/ours-50"]
    assert main(["demo", "--rows", *rows, "--quiet", "--output", "x"]) == 0
    assert list(calls[-1]["rows"]) == rows


@pytest.mark.usefixtures("offline")
def test_list_json_rows_leave_out_both_run_configurations(capsys):
    """`list --json` is the registry's index: each row without its full and smoke configurations (`show NAME`
    prints those), so neither key appears."""
    code, out, _ = cli(capsys, "list", "table2", "--json")
    rows = json.loads(out)
    assert code == 0 and rows
    assert all("full" not in row and "smoke" not in row for row in rows)
    assert {"name", "table", "arch", "method"} <= set(rows[0])


@pytest.mark.usefixtures("offline")
def test_a_dry_run_estimate_prices_one_gpu_unless_told(capsys):
    """`reproduce --dry-run --estimate` without --devices: one GPU, as with --devices 1 (not two)."""
    argv = ["reproduce", "table2", "--rows", "table2/deit_s/ours-50", "--dry-run", "--estimate"]
    code, default, _ = cli(capsys, *argv)
    assert code == 0 and default.splitlines()[0].startswith("estimated cost on 1 x ")
    assert cli(capsys, *argv, "--devices", "1")[1] == default
    assert cli(capsys, *argv, "--devices", "2")[1] != default  # the count matters: the check above can fail


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("scale, folder", [("full", "results"), ("smoke", "results/smoke")])
def test_run_prints_where_the_result_is_by_default(scale, folder, capsys, monkeypatch):
    """`run --output`'s default (its help): results/, or results/smoke/ for --scale smoke."""
    from lowrank_vit.repro import runner

    name = "table2/deit_s/ours-50"
    patch_everywhere(monkeypatch, runner, "run_row", lambda exp, scale, **kwargs: {"name": exp.name, "top1": 79.456,
                                                                          "params": 12345, "size_mib": 4.25})
    code, out, err = cli(capsys, "run", name, "--scale", scale)
    assert code == 0, err
    assert out == f"{name}: top-1 79.46% with 12,345 parameters (4.2 MiB) -> {folder}/{name}/result.json\n"


@pytest.mark.usefixtures("offline")
def test_a_long_error_is_cut_to_one_line_of_500_characters(capsys):
    pattern = "x" * 600
    code, _, err = cli(capsys, "list", pattern)
    assert code == 2
    line = one_line_error(err)
    prefix = "lowrank-vit: error: "
    assert line.startswith(f"{prefix}no experiment matches 'xxx") and line.endswith("x...")
    assert len(line) == len(prefix) + 500


@pytest.mark.usefixtures("offline")
def test_version_without_the_package_installed(capsys, monkeypatch):
    """From a source tree never installed, --version says so rather than failing."""
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(SystemExit) as info:
        cli(capsys, "--version")
    assert info.value.code == 0
    assert capsys.readouterr().out == "lowrank-vit (not installed)\n"


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("quiet", [False, True])
def test_run_draws_progress_bars_unless_quiet(quiet, capsys, monkeypatch):
    """`run --quiet` asks the row for no progress bars; without it, it asks for them."""
    from lowrank_vit.repro import runner

    asked = {}

    def run_row(exp, scale, **kwargs):
        asked.update(kwargs)
        return {"name": exp.name, "top1": 50.0, "params": 1, "size_mib": 1.0}

    patch_everywhere(monkeypatch, runner, "run_row", run_row)
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "smoke", *(["--quiet"] if quiet else []))
    assert code == 0, err
    assert asked["progress"] is (not quiet)


@pytest.mark.usefixtures("offline")
def test_demo_writes_where_output_says(capsys, monkeypatch, tmp_path):
    """`demo --output DIR`: the demo's table, figures and runs go to DIR (its help); results/demo by default."""
    from lowrank_vit.repro import demo

    outputs = []
    patch_everywhere(monkeypatch, demo, "run_demo", lambda output, **kwargs: outputs.append(output) or {})
    assert cli(capsys, "demo", "--output", str(tmp_path / "mine"), "--quiet")[0] == 0
    assert cli(capsys, "demo", "--quiet")[0] == 0
    assert [str(o) for o in outputs] == [str(tmp_path / "mine"), os.path.join("results", "demo")]


@pytest.mark.usefixtures("offline")
def test_a_dry_run_checks_each_row_against_its_own_configuration(capsys, monkeypatch, tmp_path):
    """`reproduce --dry-run`: a row is "finished, skipped" when its result was made with the very config the row
    would run now (runner.finished is given that config, the one row_config builds)."""
    from lowrank_vit.repro import runner

    seen = []

    def finished(exp, cfg, output):
        seen.append((exp, cfg))
        return {"name": exp.name}

    patch_everywhere(monkeypatch, runner, "finished", finished)
    code, out, err = cli(capsys, "reproduce", "table2", "--rows", "table2/deit_s/ours-50", "--scale", "smoke",
                         "--dry-run", "--output", str(tmp_path))
    assert code == 0, err
    assert out == "table2/deit_s/ours-50: finished, skipped\n"
    ((exp, cfg),) = seen
    assert cfg is not None and cfg.to_dict() == runner.row_config(exp, "smoke", []).to_dict()


@pytest.mark.usefixtures("offline")
def test_the_hardware_flags_reach_the_row_that_runs(capsys, monkeypatch, tmp_path):
    """`lowrank-vit run NAME --devices 2 --num-nodes 3 --accelerator cpu`: the row runs with those, as typed."""
    from lowrank_vit.repro import runner

    seen = {}
    patch_everywhere(monkeypatch, runner, "run_row",
                     lambda exp, scale, **kw: seen.update(kw, name=exp.name, scale=scale))
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "smoke", "--devices", "2", "--num-nodes",
                       "3", "--accelerator", "cpu", "--output", str(tmp_path), "--quiet")
    assert code == 0, err
    assert (seen["name"], seen["scale"]) == ("table2/deit_s/ours-50", "smoke")
    assert (seen["devices"], seen["num_nodes"], seen["accelerator"]) == (2, 3, "cpu")
    assert seen["progress"] is False and seen["output"] == str(tmp_path)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("scale", ["full", "smoke"])
def test_a_dry_run_without_output_looks_where_the_scales_results_go(scale, capsys, monkeypatch, tmp_path):
    """`reproduce --dry-run` without --output checks the directory the run itself would write: results/ for the
    full scale, results/smoke/ for the smoke one (docs: the two never overwrite each other)."""
    from lowrank_vit.repro import runner

    seen = []
    patch_everywhere(monkeypatch, runner, "finished", lambda exp, cfg, output: seen.append(output))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "reproduce", "table2", "--rows", "table2/deit_s/ours-50", "--scale", scale,
                         "--dry-run")
    assert code == 0, err
    assert out == "table2/deit_s/ours-50: would run\n"
    assert seen == [Path("results") if scale == "full" else Path("results", "smoke")]


@pytest.mark.usefixtures("offline")
def test_demo_publish_says_each_file_it_wrote(capsys, monkeypatch, tmp_path):
    from lowrank_vit.repro import demo

    patch_everywhere(monkeypatch, demo, "run_demo", lambda output, **kwargs: {})
    patch_everywhere(monkeypatch, demo, "publish",
                     lambda summary: [Path("docs/demo.md"), Path("docs/figures/demo.png")])
    code, out, err = cli(capsys, "demo", "--publish", "--quiet", "--output", str(tmp_path))
    assert code == 0 and out == ""
    assert err == "demo: wrote docs/demo.md\ndemo: wrote docs/figures/demo.png\n"


def test_dry_run_lists_rows_without_running(capsys, tmp_path):
    code, out, _ = cli(capsys, "reproduce", "table2", "--rows", "table2/deit_s/*", "--dry-run", "--output",
                       str(tmp_path))
    assert code == 0 and out.count("would run") == len(list_experiments("table2/deit_s/*"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, words", [
    (("plan", ROWS["paper"], "--estimate", "--gpu", "v100"), "unknown --gpu"),
    (("plan", "table9/*", "--estimate"), "no experiment matches"),
    (("plan", ROWS["paper"], "--estimate", "--devices", "0"), "positive integer"),
    (("reproduce", "table2", "--estimate"), "--dry-run"),
    (("reproduce", "table2", "--rows", "table9/*", "--dry-run", "--estimate"), "matches no row"),
    (("plan", ROWS["paper"], "--estimate", "--set", "data.name=my-folder"), "size of the data"),
    (("plan", ROWS["paper"], "--synthetic", "--gpu", "h100"), "add --estimate"),
    (("plan", ROWS["paper"], "--synthetic", "--devices", "2"), "add --estimate"),
    (("reproduce", "table2", "--dry-run", "--gpu", "h100"), "add --estimate"),
])
def test_estimate_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    try:
        code, _, err = cli(capsys, *argv)
    except SystemExit as exit_:  # argparse's own errors (--devices 0)
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2
    assert words in one_line_error(err)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _with_closed_stdout(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the CLI with a stdout whose reader has already gone (`... | head -0`): every write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "lowrank_vit.cli.main", *argv], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd, timeout=300)
    finally:
        os.close(write)


def _finished_baseline(out: Path, overrides: list[str]) -> None:
    """A finished result of the DeiT-S baseline with these overrides, so `reproduce` only writes its table."""
    from lowrank_vit.repro.registry import get_experiment

    cfg = get_experiment("table2/deit_s/baseline").config("smoke").override(overrides)
    result = {"name": "table2/deit_s/baseline", "params": 204_938, "params_before": 204_938, "top1": 95.8,
              "top5": 99.5, "size_mib": 0.4, "dense": {"top1": 95.8}, "config": cfg.to_dict()}
    (out / "table2/deit_s/baseline").mkdir(parents=True)
    (out / "table2/deit_s/baseline/result.json").write_text(json.dumps(result))


SLOW = pytest.mark.slow  # a new process each: 6-14 s on the shared 2-core machine


@pytest.mark.usefixtures("_offline")
@pytest.mark.parametrize("argv", [
    ["list", "--json"],  # the one kept in the fast suite
    pytest.param(["list"], marks=SLOW),
    pytest.param(["show", "table2/deit_s/ours-50"], marks=SLOW),
    pytest.param(["plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke"], marks=SLOW),
    pytest.param(["plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke", "--json"], marks=SLOW),
])
def test_closed_pipe_ends_quietly_with_status_0(argv):
    proc = _with_closed_stdout(argv)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.usefixtures("_offline")
@SLOW
def test_reproduce_into_a_closed_pipe_and_its_rows_only(tmp_path, capsys):
    out = tmp_path / "results"
    _finished_baseline(out, ["model.pretrained=false"])
    argv = ["reproduce", "table2", "--scale", "smoke", "--rows", "table2/deit_s/baseline", "--output", str(out),
            "--set", "model.pretrained=false", "--quiet", "--wandb", "disabled"]
    proc = _with_closed_stdout(argv)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # what is printed lists the rows asked for; the file keeps the whole table
    code, stdout, err = cli(capsys, *argv)
    assert code == 0 and err == ""
    printed = [line for line in stdout.splitlines() if line.startswith("| `")]
    assert len(printed) == 1 and "`table2/deit_s/baseline`" in printed[0]
    assert (out / "table2.md").read_text().count("| `table2/") == len(json.loads((out / "table2.json").read_text())
                                                                       ["rows"]) > 1


@pytest.mark.usefixtures("_offline")
def test_plan_text_has_a_header(capsys):
    code, out, _ = cli(capsys, "plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke")
    lines = out.splitlines()
    assert code == 0 and "seed 0" in lines[0] and lines[1].split() == ["layer", "rank", "params", "dense"]


@pytest.mark.usefixtures("_offline")
def test_plan_help_says_synthetic_is_its_only_mode(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert re.search(r"--synthetic\s+the only mode, also without the flag", capsys.readouterr().out)


@pytest.mark.usefixtures("_offline")
@pytest.mark.slow
def test_quiet_prints_only_the_result_and_progress_has_no_banners(tmp_path):
    argv = [sys.executable, "-m", "lowrank_vit.cli.main", "run", "table2/deit_s/ours-50", "--scale", "smoke",
            "--output", str(tmp_path / "r"), *QUICK_SETS[:-2], "--wandb", "offline"]
    env = {**_env(), "LOWRANK_VIT_CACHE": str(tmp_path / "cache")}
    env.pop("WANDB_SILENT", None)
    quiet = subprocess.run([*argv, "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert quiet.stdout.startswith("table2/deit_s/ours-50: top-1 ") and len(quiet.stdout.splitlines()) == 1
    loud = subprocess.run([*argv, "--force"], capture_output=True, text=True, env=env, timeout=600)
    assert loud.returncode == 0, loud.stderr
    lines = [line for line in re.split(r"[\r\n]", loud.stderr) if line.strip()]
    stages = [line for line in lines if line.startswith("table2/deit_s/ours-50")]
    assert len(stages) >= 6 and any("fine-tuning" in line for line in stages)
    for chatter in ("GPU available", "Tip:", "| Name", "wandb:", "ckpt_path", "Warning", "LeafSpec"):
        assert not any(chatter in line for line in lines), (chatter, loud.stderr)


@pytest.mark.parametrize("typo", ["table2/deit_s/ours-50X", "TABLE2/deit_s/ours-50", "table2/deit_s/ours_50"])
def test_a_mistyped_row_name_to_estimate_suggests_the_closest_rows(capsys, typo):
    """`plan NAME --estimate` with a name that is no row and no shell pattern (no `*`, `?` or `[`): the refusal
    says the name is unknown and suggests the row meant, whatever letters the typo has."""
    code, _, err = cli(capsys, "plan", typo, "--estimate")
    assert code == 2
    assert f"unknown experiment {typo!r}; did you mean {ROWS['paper']} or " in one_line_error(err)


@pytest.mark.usefixtures("offline")
def test_devices_without_an_estimate_is_refused_with_a_line_naming_the_flag_to_add(capsys):
    """`plan ROW --devices 2` alone: --devices only prices an estimate's fine-tune, so the user is told, in the one
    line they read, which flag is missing."""
    code, out, err = cli(capsys, "plan", "table2/deit_s/ours-50", "--devices", "2")
    assert code == 2 and out == ""
    assert one_line_error(err) == "lowrank-vit: error: --devices prices the fine-tune of an estimate: add --estimate"


@pytest.mark.usefixtures("offline")
def test_reproduce_without_rows_prints_exactly_the_table_file_it_wrote(capsys, monkeypatch, tmp_path):
    """`reproduce TABLE > table.md` gives the same markdown as OUTPUT/TABLE.md: nothing before or after it. The rows'
    processes are faked to fail at once (a real row takes minutes); the table still lists every row."""
    from lowrank_vit.repro import runner

    monkeypatch.setattr(runner.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1))
    out_dir = tmp_path / "r"
    code, out, _ = cli(capsys, "reproduce", "table4", "--scale", "smoke", "--output", str(out_dir), "--quiet",
                       "--wandb", "disabled")
    assert code == 1
    written = (out_dir / "table4.md").read_text()
    assert written.count("| `table4/") == 4 and written.endswith("\n")
    assert out == written


@pytest.mark.usefixtures("offline")
def test_demo_standins_reach_the_demo(monkeypatch, tmp_path):
    """`demo --standins DIR` (in `demo --help`) starts from the stand-in weights in DIR, and without it from the
    committed ones; lost on the way, the demo would ignore both and train or reuse a cached stand-in instead."""
    from lowrank_vit.repro import demo
    from lowrank_vit.repro.standins import COMMITTED_STANDINS

    calls = []
    patch_everywhere(monkeypatch, demo, "run_demo", lambda output, **kwargs: calls.append(kwargs) or {})
    mine = tmp_path / "my-standins"
    assert main(["demo", "--standins", str(mine), "--quiet", "--output", "x"]) == 0
    assert Path(calls[-1]["standins"]) == mine
    assert main(["demo", "--quiet", "--output", "x"]) == 0
    assert Path(calls[-1]["standins"]) == Path(COMMITTED_STANDINS)
