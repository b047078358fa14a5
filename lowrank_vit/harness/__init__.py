"""The old home of the command line and of the reproduction machinery, now :mod:`lowrank_vit.cli` and
:mod:`lowrank_vit.repro`. The module paths the documentation named still import, for this release only: each one
warns (DeprecationWarning) and gives the module of its new home, the same object, so what is patched or read there is
the real thing."""

from __future__ import annotations

import importlib
import sys
import warnings

MOVED = {
    "cli": "lowrank_vit.cli.main",
    "demo": "lowrank_vit.repro.demo",
    "densecache": "lowrank_vit.cli.densecache",
    "devicespecs": "lowrank_vit.repro.estimate",
    "estimate": "lowrank_vit.repro.estimate",
    "estimateformat": "lowrank_vit.repro.estimate",
    "finetunecli": "lowrank_vit.cli.finetune",
    "flow": "lowrank_vit.repro.flow",
    "models": "lowrank_vit.repro.models",
    "modelshapes": "lowrank_vit.repro.modelshapes",
    "overrides": "lowrank_vit.repro.overrides",
    "registry": "lowrank_vit.repro.registry",
    "rehearse": "lowrank_vit.repro.rehearse",
    "runner": "lowrank_vit.repro.runner",
    "sources": "lowrank_vit.cli.sources",
    "speedcli": "lowrank_vit.cli.speed",
    "standins": "lowrank_vit.repro.standins",
    "standinspecs": "lowrank_vit.repro.standins",
    "userargs": "lowrank_vit.cli.args",
    "userbase": "lowrank_vit.cli.base",
    "usercli": "lowrank_vit.cli.compress",
    "userdata": "lowrank_vit.cli.data",
}
"""Old module name (``lowrank_vit.harness.NAME``) -> its new home."""


def forward(old: str) -> None:
    """Make the old module ``old`` (a ``__name__`` under this package) the module of its new home, with a warning."""
    new = MOVED[old.rpartition(".")[2]]
    warnings.warn(f"{old} moved to {new}; the old path goes away in the next release", DeprecationWarning,
                  stacklevel=3)
    sys.modules[old] = importlib.import_module(new)  # the import system hands out what sys.modules holds
