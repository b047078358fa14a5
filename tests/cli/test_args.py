"""Tests of lowrank_vit/cli/args.py."""

from __future__ import annotations

import argparse

import pytest
import torch

from lowrank_vit.cli import main as cli_main
from lowrank_vit.cli.main import build_parser
from lowrank_vit.methods.decompositions import METHODS, get_method
from tests.helpers import (
    ARCH,
    _cli,
    _model_argv,
    cli,
    one_line_error,
)


@pytest.mark.usefixtures('one_thread')
def test_output_key_reads_an_integer_as_a_tuple_index(place):
    from lowrank_vit.cli.args import compression_config

    base = ["compress", *_model_argv(place), "--data", "d", "--reduction", "0.5", "--output", "o"]
    args = build_parser().parse_args([*base, "--output-key", "1"])
    assert args.output_key == 1 and compression_config(args, torch.device("cpu")).output_key == 1
    args = build_parser().parse_args([*base, "--output-key", "pooler_output", "--likelihood", "bernoulli"])
    cfg = compression_config(args, torch.device("cpu"))
    assert (cfg.output_key, cfg.likelihood) == ("pooler_output", "bernoulli")
    assert cfg.to_dict()["output_key"] == "pooler_output"
    assert build_parser().parse_args(base).likelihood == "auto"


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_output_key_is_refused_in_words(key, capsys):
    """`--output-key ""`: the one-line refusal says what a key may be, word for word (no path reaches an empty key)."""
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "compress", "m", "--data", "d", "--reduction", "0.5", "--output", "o", "--output-key", key)
    line = one_line_error(capsys.readouterr().err)
    assert exit_.value.code == 2
    assert line.endswith("argument --output-key: expected a key, an attribute name or a tuple index, "
                         "got an empty string")


@pytest.mark.usefixtures("offline")
def test_a_model_kwargs_that_is_not_json_says_so_and_shows_it(capsys):
    """`--model-kwargs '{nope'`: argparse's one line names the flag, says it is not JSON and why, and quotes it."""
    with pytest.raises(SystemExit) as info:
        cli(capsys, "compress", ARCH, "--model-kwargs", "{nope", "--reduction", "0.3")
    assert info.value.code == 2
    assert capsys.readouterr().err == ("lowrank-vit compress: error: argument --model-kwargs: not JSON (Expecting "
                                       "property name enclosed in double quotes): '{nope'\n")


@pytest.mark.usefixtures("offline")
def test_compress_options_reach_the_compression_config_the_right_way_round():
    """A latency table caps each rank at its break-even unless --params-only; progress is shown unless --quiet."""
    from lowrank_vit.cli.args import compression_config

    base = dict(recipe="paper", reduction=0.5, target_params=None, target_speedup=None, calib_samples=8, quiet=False,
                loss_pass_dtype=None, setting=[], latency_table="auto", params_only=False, rank_multiple=None)
    cfg = compression_config(argparse.Namespace(**base), torch.device("cpu"))
    assert (cfg.latency_limit, cfg.progress) == (True, True)
    cfg = compression_config(argparse.Namespace(**{**base, "params_only": True, "quiet": True}), torch.device("cpu"))
    assert (cfg.latency_limit, cfg.progress) == (False, False)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_named_alone_gets_its_home_recipe(name):
    """``lowrank-vit compress --recipe NAME`` with a decomposition's name: that decomposition inside its own recipe."""
    import argparse

    from lowrank_vit.cli.args import compression_config
    from lowrank_vit.config import RECIPES

    home = RECIPES[get_method(name).home_recipe]
    args = argparse.Namespace(recipe=name, reduction=0.5, target_params=None, calib_samples=8, rank_multiple=1,
                              quiet=True)
    config = compression_config(args, torch.device("cpu"))
    assert config.decomposition == name
    assert (config.allocation, config.compensation) == (home["allocation"], home["compensation"])
    assert (config.allocation == "marginal") == (name == "loss_aware")  # only the loss-aware method leaves the paper's


@pytest.mark.parametrize("reduction", ["0", "1", "1.5", "-0.2", "half"])
def test_reduction_outside_the_open_interval(workdir, tmp_path, capsys, reduction):
    with pytest.raises(SystemExit) as exit_:
        cli_main.main(["compress", ARCH, "--data", str(workdir / "imgs"), "--reduction", reduction,
                  "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--reduction" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_and_missing_budget(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own error
        cli_main.main(
            [
                "compress",
                ARCH,
                "--data",
                str(workdir / "imgs"),
                "--output",
                str(tmp_path / "o"),
                "--reduction",
                "0.5",
                "--recipe",
                "magic",
            ]
        )
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # no budget: checked with the recipe (--recipe vmeanba needs none), before anything is loaded
    assert cli_main.main(["compress", ARCH, "--data", str(workdir / "imgs"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one of --reduction, --target-params and --target-speedup is required" in err[0]
    assert not (tmp_path / "o").exists()


def test_loss_pass_dtype_flag_reaches_the_config_and_is_refused_where_it_does_not_apply(workdir, tmp_path, capsys):
    import argparse

    from lowrank_vit.cli.args import compression_config

    args = argparse.Namespace(
        recipe="loss-aware-fast",
        reduction=0.5,
        target_params=None,
        calib_samples=8,
        rank_multiple=1,
        quiet=True,
        loss_pass_dtype="bfloat16",
    )
    config = compression_config(args, torch.device("cpu"))
    assert (config.settings["loss_pass_dtype"], config.settings["grad_fraction"]) == ("bfloat16", 0.5)
    out = tmp_path / "o"
    assert (
        cli_main.main(
            [
                "compress",
                ARCH,
                "--data",
                str(workdir / "imgs"),
                "--output",
                str(out),
                "--reduction",
                "0.5",
                "--recipe",
                "paper",
                "--loss-pass-dtype",
                "bfloat16",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "setting 'loss_pass_dtype'='bfloat16' belongs to decomposition 'loss_aware'" in err[0]
    assert not out.exists()


def test_setting_flags_reach_the_peer_recipes_and_bad_ones_are_one_line(workdir, tmp_path, capsys):
    import argparse

    from lowrank_vit.cli.args import compression_config

    args = argparse.Namespace(
        recipe="kfac-lems",
        reduction=0.5,
        target_params=None,
        calib_samples=8,
        rank_multiple=1,
        quiet=True,
        loss_pass_dtype=None,
        setting=["grad_shrinkage=0.3", "rank_step=4", "temperature=1"],
    )
    config = compression_config(args, torch.device("cpu"))
    assert (config.decomposition, config.allocation) == ("kfac", "lems")
    assert config.settings == {"grad_shrinkage": 0.3, "rank_step": 4, "temperature": 1}
    for setting, needle in (
        ("grad_shrinkage=1.5", "grad_shrinkage must lie in [0, 1)"),
        ("shrinkage=ledoit-wolf", "setting 'shrinkage'='ledoit-wolf' belongs to decomposition 'flar', not to "),
        ("rank_floor", "--setting takes KEY=VALUE"),
    ):
        out = tmp_path / "o"
        assert (
            cli_main.main(
                [
                    "compress",
                    ARCH,
                    "--data",
                    str(workdir / "imgs"),
                    "--output",
                    str(out),
                    "--reduction",
                    "0.5",
                    "--recipe",
                    "kfac-lems",
                    "--setting",
                    setting,
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not out.exists()


@pytest.mark.parametrize(
    "text, expected",
    [("1,28,28", (1, 28, 28)), ("3x32x48", (3, 32, 48)), ("24", (None, 24, 24)), ("16x1", (None, 16, 1))],
)
def test_input_size_accepts_every_positive_size_one_included(text, expected):
    from lowrank_vit.cli.args import _input_size

    assert _input_size(text) == expected


@pytest.mark.parametrize("text", ["0,28,28", "32x0", "1,2,3,4", "a"])
def test_input_size_refuses_what_is_not_a_size(text):
    import argparse

    from lowrank_vit.cli.args import _input_size

    with pytest.raises(argparse.ArgumentTypeError, match="expected H, HxW or C,H,W"):
        _input_size(text)


def test_rank_multiple_is_one_unless_asked_or_a_latency_table_is_used():
    import argparse

    from lowrank_vit.cli.args import compression_config

    base = dict(
        recipe="paper",
        reduction=0.5,
        target_params=None,
        target_speedup=None,
        calib_samples=8,
        quiet=True,
        loss_pass_dtype=None,
        setting=[],
        latency_table=None,
        params_only=False,
        rank_multiple=None,
    )
    assert compression_config(argparse.Namespace(**base), torch.device("cpu")).rank_multiple == 1
    assert (
        compression_config(argparse.Namespace(**{**base, "rank_multiple": 4}), torch.device("cpu")).rank_multiple == 4
    )
    with_table = compression_config(argparse.Namespace(**{**base, "latency_table": "auto"}), torch.device("cpu"))
    assert (with_table.rank_multiple, with_table.latency_table) == (8, "auto")
    # a speedup target without a table profiles the model: the table's grid step again
    speed = compression_config(
        argparse.Namespace(**{**base, "recipe": "loss-aware", "reduction": None, "target_speedup": 1.5}),
        torch.device("cpu"),
    )
    assert (speed.rank_multiple, speed.latency_table, speed.target_speedup) == (8, "auto", 1.5)


def _argparse_refusal(capsys, *argv) -> str:
    """The command line is refused by the parser itself (before any file is read): exit status 2 and one line."""
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, *map(str, argv))
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_export_refuses_a_format_it_does_not_write(model_dir, tmp_path, capsys):
    """``--format`` other than onnx is refused by the parser, naming the flag; no file is written (rather than an
    ONNX file under the name the user gave for another format)."""
    target = tmp_path / "model.tflite"
    line = _argparse_refusal(capsys, "export", model_dir, "--format", "tflite", "--output", target, "--no-check")
    assert "--format" in line and "tflite" in line
    assert not target.exists()


def test_max_steps_must_be_a_positive_integer(tmp_path, capsys):
    """``--max-steps 0`` (or text) is refused by the parser, naming the flag, before anything is read."""
    for bad in ("0", "two"):
        line = _argparse_refusal(
            capsys,
            "finetune",
            tmp_path / "nowhere",
            "--data",
            tmp_path,
            "--epochs",
            "1",
            "--max-steps",
            bad,
            "--output",
            tmp_path / "o",
        )
        assert "--max-steps" in line and repr(bad) in line


def test_an_interpolation_timm_does_not_have_is_refused_naming_the_choices(capsys):
    from lowrank_vit.stages.data_config import INTERPOLATIONS

    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "evaluate", ARCH, "--data", "x", "--interpolation", "lanczos5")
    line = one_line_error(capsys.readouterr().err)
    assert exit_.value.code == 2 and "--interpolation" in line and all(i in line for i in INTERPOLATIONS)


def test_finetune_needs_an_output_directory(capsys):
    """Without --output the fine-tuned model would have nowhere to go (the input is never written)."""
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "finetune", "somedir", "--data", "x", "--epochs", "1")
    assert exit_.value.code == 2 and "--output" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--recipe", "vmeanba", "--vmeanba-blocks", "4"], "num_blocks=4 but the model has 3 selective-scan block(s)"),
        (["--recipe", "vmeanba", "--reduction", "0.3"], "--recipe vmeanba removes no parameters"),
        (["--recipe", "vmeanba"], "--recipe vmeanba needs exactly one of --vmeanba-blocks K and --target-speedup S"),
        (["--recipe", "paper"], "one of --reduction, --target-params and --target-speedup is required"),
    ],
)
def test_cli_vmeanba_bad_input_is_one_line(ssm_workdir, tmp_path, capsys, extra, needle):
    code, out, err = _cli(capsys, ssm_workdir, *extra, "--output", tmp_path / "m")
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lowrank-vit: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flags, timing, progress", [
    ([], True, True),
    (["--no-timing"], False, True),
    (["--quiet"], True, False),
    (["--no-timing", "--quiet"], False, False),
])
def test_no_timing_and_quiet_reach_the_vmeanba_config(flags, timing, progress):
    """`compress --recipe vmeanba --no-timing`: VMeanba skips timing the dense and switched models (the report's
    measured speedup); without it they are timed. `--quiet` takes the progress bars away, independently."""
    from lowrank_vit.cli.args import vmeanba_config

    args = build_parser().parse_args(["compress", "vssm_micro", "--data", "d", "--recipe", "vmeanba",
                                      "--vmeanba-blocks", "2", "--output", "o", *flags])
    cfg = vmeanba_config(args)
    assert (cfg.num_blocks, cfg.timing, cfg.progress) == (2, timing, progress)
