"""A registry row's wandb run (one per row, all stages): the modes ``--wandb`` takes, the project
(``WANDB_PROJECT`` or "lowrank_vit") and the logger, grouped by table and scale and tagged with the method,
architecture, scale and ratio, which are also top-level config keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lowrank_vit.harness.registry import Experiment, RunConfig

WANDB_MODES = ("online", "offline", "disabled")


def make_row_logger(exp: Experiment, cfg: RunConfig, wandb: str, out_dir: Path, group: str | None = None) -> Any:
    from lowrank_vit.stages.logging_utils import make_logger

    ratio = round(100 * exp.reduction) if exp.reduction else None
    tags = [exp.method, exp.arch, cfg.scale] + ([f"-{ratio}%"] if ratio else [])
    # method, arch and ratio also as top-level config keys: a dashboard groups and filters runs by config keys
    keys = {"experiment": exp.name, "table": exp.table, "method": exp.method, "arch": exp.arch,
            "model_name": cfg.model.name, "ratio": ratio, "reduction": exp.reduction}
    return make_logger(wandb, project=wandb_project(), group=group or f"{exp.table}-{cfg.scale}", tags=tags,
                       config={**keys, **cfg.to_dict(), "paper": exp.to_dict()["paper"]},
                       save_dir=out_dir, name=exp.name, job_type="run")


def wandb_project() -> str:
    """The wandb project of every run: ``WANDB_PROJECT`` when set, else "lowrank_vit"."""
    return os.environ.get("WANDB_PROJECT") or "lowrank_vit"
