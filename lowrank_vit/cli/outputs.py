"""What the user commands write: a model directory (weights, plan, report, card, figure), built in a hidden sibling
and renamed into place; an output that would overwrite anything but a model directory is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_vit.cli.base import UserError
from lowrank_vit.core.files import strict_json, write_json
from lowrank_vit.io.modelcard import CARD_FILE, RANKS_FIGURE, REPORT_FILE, plot_ranks, render_card
from lowrank_vit.io.surgery import PLAN_FILE, WEIGHTS_FILE, read_plan, save_compressed, stored_bytes
from lowrank_vit.nn.factorized import FactorizedLinear


def weights_size_mib(model: nn.Module) -> float:
    """The MiB the saved weights take: every tensor as stored (float32; quantized parameters as their codes, scales
    and zero points; a sparse Z's index lists), so the figure is the file's, whatever the Z kind or bit width."""

    return stored_bytes(model) / 2**20


def model_dir_files() -> tuple[str, ...]:
    """What :func:`write_model_dir` puts in a model directory: all that ``--force`` may replace."""

    return WEIGHTS_FILE, PLAN_FILE, REPORT_FILE, CARD_FILE, RANKS_FIGURE


def check_parents(out: Path) -> None:
    """An output below a regular file can never be written: say so before any work (not as an OSError after it)."""
    for parent in out.expanduser().absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--output {str(out)!r} cannot be written: {str(parent)!r} is a file")
            return


def check_apart(out: Path, protect: Path) -> None:
    """The input is never written: neither the output itself, nor inside it, nor holding it (a replaced output
    directory would take the input with it)."""
    o, p = out.resolve(), protect.resolve()
    if o == p:
        raise UserError(f"--output {str(out)!r} is the input directory: give a new one (the input is never "
                        f"overwritten)")
    if p in o.parents:
        raise UserError(f"--output {str(out)!r} lies inside the input directory {str(protect)!r}: give an output "
                        f"outside it (the input is never written)")
    if o in p.parents:
        raise UserError(f"--output {str(out)!r} holds the input directory {str(protect)!r}: give another one (the "
                        f"input is never overwritten)")


def check_output_dir(out: Path, force: bool, protect: Path | None = None) -> None:
    """Refuse an output that would overwrite something: any non-empty directory unless ``--force``, and even then
    anything but a model directory holding only what a model directory holds (a user's other files are never
    replaced); ``protect`` (the input) never, nor anything inside it or around it."""

    check_parents(out)
    if protect is not None:
        check_apart(out, protect)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {str(out)!r} is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / PLAN_FILE).is_file():
        raise UserError(f"--output {str(out)!r} holds other files and no model: choose another directory")
    if not force:
        raise UserError(f"--output {str(out)!r} already holds a model ({_describe_dir(out)}): give --force to "
                        f"replace it, or another directory")
    others = sorted(entry.name for entry in out.iterdir() if entry.name not in model_dir_files())
    if others:
        raise UserError(f"--output {str(out)!r} holds a model and other files ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}), which --force would delete: move them, or choose "
                        f"another directory")


def _describe_dir(directory: Path) -> str:
    try:
        plan = read_plan(directory)
    except (OSError, ValueError):
        return "unreadable"
    source = (plan.get("metadata") or {}).get("source")
    described = source.get("description") if isinstance(source, dict) else None
    return f"{plan['architecture']}" + (f" from {described}" if described else "")


def staging_dir(out: Path, suffix: str) -> Path:
    stage = out.parent / f".{out.name}.{suffix}"
    stage.parent.mkdir(parents=True, exist_ok=True)
    return stage


def publish(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` directory to ``out``; a previous model there is removed only once the new one is
    in place (checked by :func:`check_output_dir`)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_model_dir(stage: Path, model: nn.Module, report: dict[str, Any], metadata: dict[str, Any],
                    rebuild: tuple[str, dict[str, Any]] | None = None) -> None:
    """Weights and plan, report.json, the ranks figure and the model card, into ``stage``; the plan rebuilds the
    model from ``rebuild`` (timm name, arguments) where given, else from what the adapter reads of its modules."""

    name, kwargs = rebuild if rebuild is not None else (None, None)
    save_compressed(model.cpu(), stage, model_name=name, model_kwargs=kwargs,
                    metadata=json.loads(strict_json(metadata)))
    write_json(stage / REPORT_FILE, report)
    plot_ranks(report, stage / RANKS_FIGURE)
    (stage / CARD_FILE).write_text(render_card(report, report.get("name") or stage.name))


def report_layers(model: nn.Module, compression: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per-layer rows of the report: the compression's own where there is one."""
    if compression and compression.get("layers"):
        keys = ("name", "in_features", "out_features", "rank", "dense_params", "factored_params", "output_error")
        return [{k: layer.get(k) for k in keys} for layer in compression["layers"]]

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLinear):
            rows.append({"name": name, "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                         "dense_params": m.in_features * m.out_features,
                         "factored_params": sum(p.numel() for n, p in m.named_parameters() if n != "bias")})
    return rows
