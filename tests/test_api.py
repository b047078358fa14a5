"""Tests of lowrank_vit/__init__.py, the package's face: its public names, the Lightning ones loaded on first use, and
the old module paths under lowrank_vit.harness kept for one release."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

import lowrank_vit
from lowrank_vit.harness import MOVED


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


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_harness_path_warns_and_gives_the_module_of_its_new_home(old):
    """Each module path the documentation named under lowrank_vit.harness still imports, for one release: a
    DeprecationWarning naming the new home, and the very module object there (so a patch through either name is seen
    by both)."""
    sys.modules.pop(f"lowrank_vit.harness.{old}", None)
    new = importlib.import_module(MOVED[old])
    with pytest.warns(DeprecationWarning, match=rf"lowrank_vit\.harness\.{old} moved to {MOVED[old]}"):
        forwarded = importlib.import_module(f"lowrank_vit.harness.{old}")
    assert forwarded is new
    assert new.__name__ == MOVED[old]  # the new module keeps its own name and spec
    assert new.__spec__.name == MOVED[old]


def test_the_forwarding_table_names_real_modules_and_no_new_ones():
    """The table holds the old paths only: none of them is a module of the new layout's name, and each target is."""
    for new in MOVED.values():
        assert new.startswith(("lowrank_vit.cli.", "lowrank_vit.repro.")), new
        assert importlib.util.find_spec(new) is not None, new
    assert "cli" in MOVED and MOVED["cli"] == "lowrank_vit.cli.main"  # the entry point's old home


def test_an_old_harness_path_the_docs_never_named_is_not_kept():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lowrank_vit.harness.rowlogger")
