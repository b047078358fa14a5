"""Packaging: checks of the project as a whole."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO, has_module, optional_module

tomllib = optional_module("tomllib")  # Python 3.11 and later


ROOT = REPO


SETUP = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


@pytest.mark.skipif(not has_module("tomllib"), reason="needs tomllib")
def test_the_package_list_is_every_package_folder_and_the_experiments_under_their_own_name():
    folders = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lowrank_vit").rglob("__init__.py"))
    assert sorted(SETUP["packages"]) == sorted([*folders, "lowrank_vit_experiments"])
    assert SETUP["package-dir"] == {"lowrank_vit_experiments": "experiments"}
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lowrank_vit.experiments"]
    assert entry == {"paper": "lowrank_vit_experiments"}


@pytest.mark.skipif(not has_module("tomllib"), reason="needs tomllib")
def test_the_experiments_import_each_other_relatively():
    """Absolute imports of ``experiments.X`` would fail under the installed name."""
    offenders = [f"{p.name}: {line.strip()}" for p in (ROOT / "experiments").glob("*.py")
                 for line in p.read_text().splitlines() if re.match(r"\s*(from|import) experiments\b", line)]
    assert not offenders


@pytest.mark.skipif(not has_module("tomllib"), reason="needs tomllib")
def test_the_wheel_holds_no_top_level_experiments_package(tmp_path):
    """Built from a copy of the sources (a build writes build/ and egg-info beside them), offline."""
    source = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "models", "results", "*.egg-info")
    for folder in ("lowrank_vit", "experiments"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--no-index", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"lowrank_vit", "lowrank_vit_experiments"} <= tops and "experiments" not in tops
    assert "lowrank_vit_experiments/paper.py" in names
