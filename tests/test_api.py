"""Tests of lowrank_vit/__init__.py, the package's face: its public names, the Lightning ones loaded on first use; the
old module paths under lowrank_vit.harness are gone."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

import lowrank_vit


def test_every_public_name_resolves_and_is_listed():
    for name in lowrank_vit.__all__:
        assert getattr(lowrank_vit, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lowrank_vit.not_a_name  # noqa: B018


def test_importing_the_package_does_not_import_lightning():
    code = ("import sys, lowrank_vit; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_the_data_settings_of_the_face_load_without_lightning():
    """``lowrank_vit.DataConfig`` comes from its own module, which needs neither Lightning nor ``datasets``."""
    code = ("import sys, lowrank_vit; cfg = lowrank_vit.DataConfig(name='mnist-5k'); heavy = 'lightning', 'datasets'; "
            "print(type(cfg).__module__, sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "lowrank_vit.stages.data_config []"


def test_the_old_module_paths_are_gone():
    """The package was never released with its old layout: ``lowrank_vit.harness`` (the paths the docs once named
    before cli/ and repro/) is not kept."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lowrank_vit.harness")
    assert importlib.util.find_spec("lowrank_vit.cli.main") is not None  # the entry point's home
