"""The suite itself: the make targets that run it, its seeding, and where its tests live (tests/ mirrors the
package)."""

from __future__ import annotations

import ast
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_vit import count_params
from tests.helpers import REPO, TESTS, make_tiny_vit


def test_the_tiny_model_helper_stays_tiny():
    assert count_params(make_tiny_vit()) < 40_000


def make_recipe(target: str) -> str:
    """The command lines of a Makefile target."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, flags=re.MULTILINE)
    assert match, f"no target {target!r} in the Makefile"
    return match.group(1)


def test_make_test_runs_everything_and_test_fast_skips_slow():
    assert "-m pytest" in make_recipe("test") and "slow" not in make_recipe("test")
    assert '-m "not slow"' in make_recipe("test-fast")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_both_test_targets():
    out = subprocess.run(["make", "-s", "-C", str(REPO), "help"], capture_output=True, text=True, check=True).stdout
    targets = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"test", "test-fast", "check-plans"} <= targets


def test_slow_is_a_registered_marker(pytestconfig):
    """With --strict-markers (pyproject) a misspelt marker is an error instead of a test that never gets skipped."""
    assert any(m.startswith("slow:") for m in pytestconfig.getini("markers"))
    assert "--strict-markers" in pytestconfig.getini("addopts")


@pytest.mark.parametrize("draw", [0, 1])  # the second run sees the same numbers although the first one drew
def test_every_test_starts_from_the_same_seed(draw):
    expected_torch = torch.rand(3, generator=torch.Generator().manual_seed(0))
    expected_random = random.Random(0).random()
    expected_numpy = np.random.RandomState(0).rand()
    assert torch.equal(torch.rand(3), expected_torch)
    assert random.random() == expected_random
    assert np.random.rand() == expected_numpy


# --------------------------------------------------------------------------------------------------------------------
# Where tests live: tests/ mirrors the package

HOMES = {"lowrank_vit/__init__.py": "tests/test_api.py"}
"""Modules whose tests do not follow the rule, and the file that holds them: the package's face (its public names)."""
FEATURES = {
    # files of tests of a feature that spans modules, with no module of its own
    "tests/cli/test_snapshot.py": "the command line's reference outputs (every command's --help and refusals)",
    "tests/benchmarks/test_benchmarks.py": "what every benchmark script shares (bad arguments, JSON output)",
}
PROJECT = {"test_architecture.py", "test_docs.py", "test_packaging.py", "test_properties.py", "test_suite_hygiene.py",
           "test_api.py"}
"""Top-level test files besides those of the top-level modules (config, pipeline, reports): the package's face, the
project as a whole, and the property-based tests of the mathematics (one file: Hypothesis is an optional package, so
the file skips whole without it)."""


def _home(module: Path) -> str:
    """The test file of a module under the mirror rule: lowrank_vit/SUB/MOD.py -> tests/SUB/test_MOD.py (a leading
    underscore dropped), lowrank_vit/MOD.py -> tests/test_MOD.py; experiments/, benchmarks/ and tools/ alike."""
    rel = module.relative_to(REPO)
    parts = rel.parts[1:] if rel.parts[0] == "lowrank_vit" else rel.parts
    return "/".join(("tests", *parts[:-1], "test_" + parts[-1].lstrip("_")))


def _library_modules() -> list[Path]:
    return sorted(p for p in (REPO / "lowrank_vit").rglob("*.py")
                  if p.name != "__init__.py" or p.parent.name == "lowrank_vit")


def test_every_library_module_has_a_home_for_its_tests():
    missing = []
    for module in _library_modules():
        rel = module.relative_to(REPO).as_posix()
        home = HOMES.get(rel, _home(module))
        if not (REPO / home).is_file():
            missing.append(f"{rel}: {home}")
        elif rel in HOMES:  # a declared home must test the module: it names one of the module's own definitions
            names = {n.name for n in ast.parse(module.read_text()).body
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
            names |= {"lowrank_vit.__all__"} if module.name == "__init__.py" else set()
            if not any(re.search(rf"\b{re.escape(name)}\b", (REPO / home).read_text()) for name in names):
                missing.append(f"{rel}: {home} names none of its definitions")
    assert not missing, "\n".join(missing)
    assert all(_home(REPO / m) != h for m, h in HOMES.items()), "a HOMES entry repeats the rule"


def test_every_test_file_is_the_home_of_a_module_or_a_named_feature():
    """No file named after an audit round, an issue or a topic: each one's name says which module it tests."""
    stray = []
    for path in sorted(TESTS.rglob("test_*.py")):
        rel = path.relative_to(REPO).as_posix()
        if path.parent == TESTS:
            if path.name not in PROJECT and not (REPO / "lowrank_vit" / path.name.removeprefix("test_")).is_file():
                stray.append(rel)
            continue
        sub = path.parent.relative_to(TESTS)
        stem = path.stem.removeprefix("test_")
        root = REPO / "lowrank_vit" if sub.parts[0] not in ("experiments", "benchmarks", "tools") else REPO
        if not ((root / sub / f"{stem}.py").is_file() or (root / sub / f"_{stem}.py").is_file() or rel in FEATURES):
            stray.append(rel)
    assert not stray, "\n".join(stray)


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py, shared fixtures in conftest.py files."""
    found = []
    for path in TESTS.rglob("*.py"):
        if "fixtures" in path.relative_to(TESTS).parts:
            continue  # the scripts that wrote a fixture ran against the tests of the commit they name
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for module in modules:
                if module.split(".")[-1].startswith("test_") or module.split(".")[-1] == "conftest":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {module}")
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------------------------------------------------
# What the repository tracks: no results, models or run folders outside the places meant for them

RESULT_PLACES = ("experiments/models/", "experiments/results/", "benchmarks/results/", "docs/", "tests/fixtures/")
"""Where tracked results, models and figures belong: the published models and results, the benchmarks' records, the
documentation's figures, the tests' fixtures."""
RESULT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".onnx", ".bin", ".npy", ".npz", ".pkl", ".png", ".jpg",
                   ".jpeg", ".json", ".jsonl")
"""Weights, checkpoints, exported models, arrays, figures and results (a command's JSON records)."""
RUN_FOLDERS = ("lightning_logs", "wandb", "mlruns")
"""Folders of a training run's logs: tracked nowhere."""
OUTPUT_FOLDERS = ("results", "runs", "outputs")
"""Folders a run writes its outputs in: tracked only as the places above."""


def stray_results(paths: list[str]) -> list[str]:
    """The tracked paths (relative, ``/``-separated, as ``git ls-files`` gives them) that hold a result, a model or a
    run folder outside :data:`RESULT_PLACES`, each with the reason."""
    stray = []
    for path in paths:
        folders = path.split("/")[:-1]
        placed = path.startswith(RESULT_PLACES)
        if any(part in RUN_FOLDERS for part in folders):
            stray.append(f"{path} (a run's log folder)")
        elif placed:
            continue
        elif any(part in OUTPUT_FOLDERS for part in folders):
            stray.append(f"{path} (an output folder outside {', '.join(RESULT_PLACES)})")
        elif path.lower().endswith(RESULT_SUFFIXES):
            stray.append(f"{path} (a model, figure or result outside {', '.join(RESULT_PLACES)})")
    return stray


def test_the_judge_of_tracked_paths_finds_results_models_and_run_folders_out_of_place():
    fine = ["README.md", "pyproject.toml", "lowrank_vit/cli/main.py", "docs/figures/ranks.png",
            "docs/mutation_history.json", "experiments/results/loss_aware_study.json",
            "experiments/models/cifar10/model.safetensors", "benchmarks/results/latency_deit_small_cpu.json",
            "tests/fixtures/checkpoint_v1/model.safetensors", "tests/fixtures/cli_reference.json",
            "benchmarks/latency.py", "tests/stages/test_results.py", "lowrank_vit/reports.py"]
    assert stray_results(fine) == []
    stray = ["x/ablation/deit_s/vanilla-svd-ft-50/model/model.safetensors", "x/ablation/deit_s/result.json",
             "x/.dense/0c78474d91199d0c6115d538.json", "model.ckpt", "lowrank_vit/weights.pt", "tools/w.pth",
             "out/deit.onnx", "ranks.png", "photo.JPG", "results/rehearse.jsonl", "results/demo/table2.txt",
             "lightning_logs/version_0/hparams.yaml", "experiments/results/wandb/run-1/files/config.yaml",
             "runs/a/notes.txt", "outputs/log.txt", "benchmarks/runs/a.txt"]
    found = stray_results(stray)
    assert [line.split(" (")[0] for line in found] == stray
    assert "a run's log folder" in found[-5] and "an output folder" in found[-1]


def test_the_tracked_tree_holds_no_results_outside_their_places():
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("git is not installed")
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    paths = [p for p in listed.stdout.decode(errors="replace").split("\0") if p]
    stray = stray_results(paths)
    assert not stray, "tracked outside the places meant for them (git rm --cached them):\n" + "\n".join(stray)
