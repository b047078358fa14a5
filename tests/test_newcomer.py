"""What a new user hits in the first hour (issue 20): closed pipes, reproducible plans, checked --set values, the
class-count check, reachable reductions, quiet output, smoke tables, wandb keys, and the README's demo excerpt
against the committed demo result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_vit.cli.main import main

from conftest import cli, one_line_error

ROOT = Path(__file__).resolve().parents[1]
# a timm model small enough for a plan in a second: its random weights come from torch's global generator
TINY_TIMM = ["--set", "model.source=timm", "--set", "model.name=deit_tiny_patch16_224", "--set",
             'model.kwargs={"img_size": 28, "in_chans": 1, "patch_size": 7, "embed_dim": 32, "depth": 2, '
             '"num_heads": 2, "num_classes": 10}']
QUICK = ["--set", "model.pretrained=false", "--set", "compression.calib_samples=32", "--set",
         "data.calib_samples=32", "--set", "finetune.max_steps=2", "--wandb", "disabled"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------- closed pipes


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


# ------------------------------------------------------------------------------------------------------ plan


def _plan(capsys, *extra: str) -> dict:
    code, out, err = cli(capsys, "plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("model", [[], TINY_TIMM], ids=["standin", "timm"])
def test_plan_is_seeded_and_its_json_carries_the_layers(capsys, model):
    torch.manual_seed(1)  # whatever state the caller's generator is in, the plan is the same
    first = _plan(capsys, *model)
    torch.manual_seed(2)
    second = _plan(capsys, *model)
    assert first == second
    assert first["seed"] == 0 and first["size_mib"] > 0
    layers = first["layers"]
    assert layers and {tuple(sorted(layer)) for layer in layers} == {("dense_params", "name", "params", "rank")}
    factored = [layer for layer in layers if layer["rank"] is not None]
    assert factored and all(layer["params"] < layer["dense_params"] for layer in factored)
    assert first["params_before"] - first["params_after"] == sum(
        layer["dense_params"] - layer["params"] for layer in layers)


def test_plan_leaves_the_callers_random_state_alone(capsys):
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    _plan(capsys, *TINY_TIMM)
    assert torch.equal(torch.rand(1), expected)


def test_plan_text_has_a_header(capsys):
    code, out, _ = cli(capsys, "plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke")
    lines = out.splitlines()
    assert code == 0 and "seed 0" in lines[0] and lines[1].split() == ["layer", "rank", "params", "dense"]


def test_plan_help_says_synthetic_is_its_only_mode(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert re.search(r"--synthetic\s+the only mode, also without the flag", capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ reachable reduction


def test_unreachable_reduction_names_the_largest_reachable_one(capsys):
    code, _, err = cli(capsys, "plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke",
                       "--set", "compression.reduction=0.99")
    line = one_line_error(err)
    assert code == 2 and not re.search(r"-\d", line.replace("--", "")), line
    match = re.search(r"largest reachable reduction is [\d.]+% \(reduction=([\d.]+)", line)
    assert match, line
    # and it is reachable: planning at that reduction works
    plan = _plan(capsys, "--set", f"compression.reduction={match.group(1)}")
    assert plan["reduction"] == pytest.approx(float(match.group(1)), abs=2e-3)


# --------------------------------------------------------------------------------------------- --set values


@pytest.mark.parametrize("value, message", [
    ("model.kwargs={img_size: 32}", "not valid JSON"),
    ("model.kwargs={bad", "expected a JSON object"),
    ("finetune.epochs=two", "expected an integer"),
    ("finetune.epochs=1.5", "expected an integer, got float"),
    ("model.pretrained=yes", "expected true or false"),
    ("compression.reduction=[0.5]", "expected a number or null, got list"),
    ("nosuch.field=1", "with a section among"),
])
def test_set_values_are_checked_before_anything_runs(capsys, tmp_path, value, message):
    out = tmp_path / "r"
    for argv in (["run", "table2/deit_s/ours-50", "--scale", "smoke", "--output", str(out)],
                 ["plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke"],
                 ["reproduce", "table2", "--scale", "smoke", "--output", str(out)]):
        code, stdout, err = cli(capsys, *argv, "--set", value)
        assert code == 2 and stdout == "" and message in one_line_error(err)
    assert not out.exists()


def test_set_values_of_the_right_type_pass():
    from lowrank_vit.repro.overrides import check_overrides

    check_overrides(["finetune.epochs=3", "compression.decomposition=plain", 'model.kwargs={"img_size": 32}',
                     "model.pretrained=false", "data.path=/data/x", "compression.reduction=0.5",
                     "compression.target_params=null", "finetune.lr=1e-2", "size_bits=16",
                     "model.kwargs.img_size=32", "model.kwargs.global_pool=avg"])  # one key of a mapping
    with pytest.raises(ValueError, match="finetune.epochs is not a mapping"):
        check_overrides(["finetune.epochs.first=3"])


# ------------------------------------------------------------------------------------------------ class count


def test_more_classes_than_the_head_fails_before_calibration(capsys, tmp_path, monkeypatch):
    import lowrank_vit.pipeline

    def never(*args, **kwargs):
        raise AssertionError("compress ran before the class check")

    monkeypatch.setattr(lowrank_vit.pipeline, "compress", never)
    two = [a.replace('"num_classes": 10', '"num_classes": 2') for a in TINY_TIMM]
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "smoke", "--output", str(tmp_path / "r"),
                       *QUICK, *two, "--quiet")
    line = one_line_error(err)
    assert code == 2 and "10 classes" in line and "predicts 2" in line


# ------------------------------------------------------------------------------------------- quiet and chatter


@pytest.mark.slow
def test_quiet_prints_only_the_result_and_progress_has_no_banners(tmp_path):
    argv = [sys.executable, "-m", "lowrank_vit.cli.main", "run", "table2/deit_s/ours-50", "--scale", "smoke",
            "--output", str(tmp_path / "r"), *QUICK[:-2], "--wandb", "offline"]
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


# ------------------------------------------------------------------------------------------------ smoke tables


def _row(**fields) -> dict:
    row = dict(name="table2/deit_s/ours-50", paper_params_m=11.1, params_m=0.102, diff_params_m=-11.0,
               paper_top1=79.34, top1=95.6, diff_top1=16.26, top1_compressed=95.5, top1_dense=95.8,
               diff_top1_dense=-0.2, top5=99.0, paper_size_mib=None, size_mib=0.2, diff_size_mib=None,
               paper_residual=None, residual=4e-05, diff_residual=None, notes=[], finished=True)
    return {**row, **fields}


def test_smoke_table_compares_with_its_own_baseline():
    from lowrank_vit.repro.tables import markdown_table

    text = markdown_table("table2", "smoke", [_row(), _row(name="table2/deit_s/vanilla-svd-ft-40", residual=2e-3)])
    header = next(line for line in text.splitlines() if line.startswith("| row"))
    assert "Δ vs dense" in header and header.count("Δ") == 1
    assert "-0.20" in text and "+16.26" not in text and "79.34" in text
    assert "4.00e-05" in text and "2.00e-03" in text and "0.000" not in text
    full = markdown_table("table2", "full", [_row()])
    assert "+16.26" in full and "4.00e-05" in full  # the full scale is a reproduction: Δ against the paper


# ----------------------------------------------------------------------------------------------------- wandb


def test_wandb_runs_carry_project_and_groupable_keys(monkeypatch, tmp_path):
    import lowrank_vit.stages.logging_utils
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.runner import make_row_logger

    seen = {}
    monkeypatch.setattr(lowrank_vit.stages.logging_utils, "make_logger", lambda mode, **kw: seen.update(kw))
    exp = get_experiment("table2/deit_s/ours-50")
    make_row_logger(exp, exp.config("smoke"), "offline", tmp_path)
    assert seen["project"] == "lowrank_vit" and seen["group"] == "table2-smoke"
    assert {k: seen["config"][k] for k in ("method", "arch", "ratio")} == {"method": "ours", "arch": "deit_s",
                                                                          "ratio": 50}
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    make_row_logger(exp, exp.config("smoke"), "offline", tmp_path)
    assert seen["project"] == "mine"


def test_documented_sync_command_fits_any_output_directory():
    assert "-name 'offline-run-*' -exec wandb sync {} +" in (ROOT / "docs/reproducing.md").read_text()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "results/demo/*/*/*/wandb" not in doc.read_text(), doc


# ------------------------------------------------------------------------------------------------------ demo


def test_readme_demo_excerpt_is_the_committed_demo_result():
    """`make demo-refresh` writes both; neither may be edited by hand."""
    from lowrank_vit.repro.demo import PUBLISHED, format_table, readme_excerpt

    record = json.loads((ROOT / PUBLISHED).with_suffix(".json").read_text())
    committed = (ROOT / PUBLISHED).with_suffix(".txt").read_text().rstrip("\n")
    assert record["command"] == "make demo-refresh" and len(record["rows"]) == 13
    assert format_table(record["rows"]) == committed  # the text is the JSON's rows, formatted
    assert readme_excerpt((ROOT / "README.md").read_text()) == committed


def test_publish_rewrites_only_the_excerpt(tmp_path):
    from lowrank_vit.repro.demo import README_MARKERS, format_table, publish, readme_excerpt

    rows = [dict(name="b", method="baseline", reduction=0.0, params=100, top1=90.0, top1_noft=None, residual=None,
                 paper_params=22_100_000, paper_top1=79.8)]
    readme = tmp_path / "README.md"
    start, end = README_MARKERS
    readme.write_text(f"before\n{start}\n```\nold\n```\n{end}\nafter\n")
    publish({"rows": rows, "table": format_table(rows), "seconds": 1.0}, tmp_path / "res" / "demo_table2", readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old" not in text
    assert readme_excerpt(text) == format_table(rows) == (tmp_path / "res/demo_table2.txt").read_text().rstrip()
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no demo excerpt"):
        publish({"rows": rows, "table": "t", "seconds": 1.0}, tmp_path / "res2" / "demo_table2", readme)
    assert not (tmp_path / "res2").exists()


def test_imagenet_error_names_the_cli_override(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "full", "--output", str(tmp_path / "r"))
    assert code == 2 and "--set data.path=" in one_line_error(err)


def test_the_readmes_first_example_runs_as_written(tmp_path, monkeypatch):
    """The first Python a visitor reads must run: the README's first code block, with only the pretrained DeiT-S
    (not reachable offline) swapped for a random one of the same family at a tiny size, the images shrunk to match
    and the output under a temporary folder. It must compress to half the parameters and save a directory that
    loads back to the same logits."""
    from lowrank_vit import count_params, load_compressed

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    small = 'pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10'
    for old, new in (("pretrained=True", small), ("224, 224", "32, 32"), ("range(32)", "range(2)")):
        assert old in block, f"the README's first example changed ({old!r} not in it): update this test"
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    import timm

    dense = count_params(timm.create_model("deit_small_patch16_224", **eval(f"dict({small})")))  # noqa: S307
    model = namespace["model"]
    assert abs(count_params(model) / dense - 0.5) < 0.02
    loaded = load_compressed(tmp_path / "out" / "deit_s-50")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
