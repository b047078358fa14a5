"""``lowrank-vit rehearse``: a full-scale row run on a CPU before anyone spends GPU hours on it.

Each row runs its full-scale config through ``lowrank-vit run`` in its own process, as ``reproduce`` runs it, with
only these changes: the weights are random (the same timm architecture, written to a safetensors file and loaded
through ``model.checkpoint``, so timm's pretrained config of the tagged name still decides the preprocessing), the
data is generated in one of the three ImageNet layouts at the model's input size, and calibration, fine-tuning and
evaluation are cut to a few images and steps (``data.calib_samples``, ``finetune.max_steps`` and
``finetune.batch_size``, and ``compression.sgd_iterations`` for the rows whose Z is fitted by SGD: 2,000 steps of a
sparse Z take hours on a CPU; ``run.skip_baseline_guard``, since random weights score nothing). Then every hand-over is
checked: the data module's preprocessing against timm's pretrained config, the input shape against the model, the
class count and order against the pretrained head's (timm's ImageNet synsets), the run's result.json, the saved
model loaded back and scoring what the run recorded, and the results table rendering the row.

Generated data: ``images_per_class`` training images for every one of the head's classes, and ``val_images``
validation images whose labels span the first to the last class (a validation image per class would make each
evaluation of a full-size model cost minutes on a CPU).

Here: a row's rehearsal, the record of outcomes and the command. The settings and the generated data are in
:mod:`lowrank_vit.harness.rehearsaldata`, the hand-over checks in :mod:`lowrank_vit.harness.rehearsalchecks`; their
names are importable from here too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# re-exported as well as used: the tests import these names from here
from lowrank_vit.harness.rehearsalchecks import (  # noqa: F401
    check_data,
    check_handover,
    check_preprocessing,
    check_result,
    check_saved_model,
    check_table,
)
from lowrank_vit.harness.rehearsaldata import LAYOUTS, RehearsalError, RehearsalSettings, register_layout  # noqa: F401
from lowrank_vit.nn.adapters import TimmViTAdapter

# ---------------------------------------------------------------------------------------------------------- rows


def _run_command(exp: Any, out: Path, overrides: dict[str, Any], settings: RehearsalSettings) -> list[str]:
    command = [sys.executable, "-m", "lowrank_vit.harness.cli", "run", exp.name, "--scale", "full",
               "--output", str(out), "--accelerator", settings.accelerator, "--devices", str(settings.devices),
               "--wandb", "disabled", "--quiet"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return command


def rehearse_row(exp: Any, work: Path, settings: RehearsalSettings) -> str:
    """Rehearse one row in ``work``; returns a note on what was cut. Raises on the first broken hand-over."""
    from lowrank_vit.nn.adapters import timm_with_our_models

    timm = timm_with_our_models()
    from safetensors.torch import save_file

    from lowrank_vit.harness.models import input_shape
    from lowrank_vit.harness.registry import RunConfig
    from lowrank_vit.harness.rowresults import read_result
    from lowrank_vit.stages.data import build_datamodule

    cfg = exp.full
    kwargs = dict(cfg.model.kwargs)
    note = "full size"
    torch.manual_seed(0)
    model = timm.create_model(cfg.model.name, pretrained=False, **kwargs)
    if settings.depth is not None:
        kwargs.update(TimmViTAdapter().shrunk_kwargs(model, settings.depth))
        note = f"SHRUNK to {kwargs} (not the full architecture)"
        model = timm.create_model(cfg.model.name, pretrained=False, **kwargs)
    weights = work / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    shape = input_shape(model)
    data = LAYOUTS[settings.layout](work / "data", int(model.num_classes), shape[1:], settings)
    overrides: dict[str, Any] = {"model.checkpoint": str(weights), **data, "data.calib_samples": settings.calib_samples,
                                 "data.num_workers": 0, "data.cache_dir": str(work / "hf_cache"),
                                 "run.skip_baseline_guard": True}
    if kwargs != cfg.model.kwargs:
        overrides["model.kwargs"] = kwargs
    if cfg.compression is not None:
        overrides["compression.calib_samples"] = settings.calib_samples
        if cfg.compression.fits_z_by_sgd:
            overrides["compression.sgd_iterations"] = settings.sgd_steps
        if settings.depth is not None and cfg.compression.target_params is not None:
            fraction = 1.0 - cfg.compression.target_params / sum(p.numel() for p in timm.create_model(
                cfg.model.name, pretrained=False, **cfg.model.kwargs).parameters())
            overrides.update({"compression.target_params": None, "compression.reduction": round(fraction, 6)})
            note += f"; target {cfg.compression.target_params:,} parameters as the fraction {fraction:.4f}"
    if cfg.finetune is not None:
        overrides.update({"finetune.max_steps": settings.finetune_steps, "finetune.batch_size": settings.batch_size})
    if cfg.vmeanba is not None:  # the impact scores over a few images, one timing repeat at the rehearsal's batch
        overrides.update({"vmeanba.calib_samples": settings.calib_samples, "vmeanba.repeats": 1,
                          "vmeanba.latency_batch": settings.batch_size})
        from lowrank_vit.methods.vmeanba import scan_blocks

        blocks = len(scan_blocks(model))
        if cfg.vmeanba.num_blocks is not None and cfg.vmeanba.num_blocks > blocks:  # only a shrunk model has fewer
            overrides["vmeanba.num_blocks"] = blocks
            note += f"; VMeanba in all {blocks} blocks of the shrunk model, not {cfg.vmeanba.num_blocks}"
    run_cfg: RunConfig = cfg.override(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                      for k, v in overrides.items())
    dm = build_datamodule(run_cfg.data, model)
    check_data(model, dm)

    out = work / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # a rehearsal needs no network
    proc = subprocess.run(_run_command(exp, out, overrides, settings), check=False, capture_output=True, text=True,
                          env=env)
    if proc.returncode < 0:  # a signal: no traceback to quote; SIGKILL is most often the out-of-memory killer
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else "?"
        hint = " (on Linux most often the out-of-memory killer: try --devices 1 or more memory)" if (
            name == "SIGKILL") else ""
        raise RehearsalError(f"`lowrank-vit run` was killed by {name}{hint}")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise RehearsalError(f"`lowrank-vit run` exited with {proc.returncode}: {lines[-1] if lines else '?'}")
    result = read_result(out / exp.name)
    check_handover(result is not None, "the run wrote no readable result.json")
    assert result is not None
    check_result(exp, result, settings, model)
    check_saved_model(exp, out, result, dm, "cuda" if settings.accelerator == "gpu" else "cpu")
    check_table(exp, out, result)
    return note


def _same_settings(line: dict[str, Any], settings: RehearsalSettings) -> bool:
    # records written before the accelerator was an option ran on the CPU
    return (line.get("layout"), line.get("devices"), line.get("depth"), line.get("accelerator", "cpu")) == (
        settings.layout, settings.devices, settings.depth, settings.accelerator)


def read_record(record: str | os.PathLike, settings: RehearsalSettings) -> dict[str, dict[str, Any]]:
    """The last recorded outcome of each row rehearsed with the same layout, devices, accelerator and depth as
    ``settings``.

    Raises:
        ValueError: a line of ``record`` is not a JSON object (the file is not a rehearsal record).
    """
    path = Path(record)
    last: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return last
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            line = None
        if not isinstance(line, dict) or "name" not in line:
            raise ValueError(f"{path}:{number} is not a rehearsal record line (a JSON object with a name)")
        if _same_settings(line, settings):
            last[line["name"]] = line
    return last


def _append_record(record: Path, outcome: dict[str, Any], settings: RehearsalSettings) -> None:
    from lowrank_vit import __version__

    record.parent.mkdir(parents=True, exist_ok=True)
    line = {**outcome, "layout": settings.layout, "devices": settings.devices, "accelerator": settings.accelerator,
            "depth": settings.depth, "version": __version__,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with record.open("a") as f:  # appended, never rewritten: the record of earlier runs stays
        f.write(json.dumps(line) + "\n")


def _check_paths(keep: str | os.PathLike | None, record: str | os.PathLike | None) -> None:
    """Refuse a ``keep`` that is not a directory and a ``record`` that could not be appended to, before any row
    runs: the first row's temporary folder, and the record once the row has ended, would otherwise fail with a bare
    OSError, the latter after the row's minutes of work."""
    if keep is not None and not Path(keep).is_dir():
        raise ValueError(f"--workdir {keep}: {'not a directory' if Path(keep).exists() else 'no such directory'}")
    if record is None:
        return
    path = Path(record)
    if path.is_dir():
        raise ValueError(f"--record {record} is a directory; it must name a file (e.g. {path / 'rehearse.jsonl'})")
    parent = next(a for a in path.absolute().parents if a.exists())  # _append_record creates the missing ones
    if not parent.is_dir():
        raise ValueError(f"--record {record}: {parent} is a file, not a directory")


def rehearse(patterns: str | list[str], settings: RehearsalSettings, *, keep: str | os.PathLike | None = None,
             echo: Callable[[str], None] = print, record: str | os.PathLike | None = None,
             resume: bool = False) -> list[dict[str, Any]]:
    """Rehearse every row matching one of ``patterns`` (each row once); one line per row through ``echo``. Returns
    each row's outcome (``name``, ``ok``, ``message``, ``seconds``, and ``recorded`` for a row taken from the
    record).

    ``record``: a JSON-lines file each row's outcome is appended to as soon as the row ends (with the layout,
    devices, depth, package version and time), so a run of hours that stops keeps what it found. ``resume``: rows
    whose last outcome in ``record`` (same layout, devices and depth) is ok are not run again.

    Raises:
        ValueError: a pattern matches no row, an unknown layout, ``resume`` without ``record``, a record that
            is not one or cannot be written, or a ``keep`` that is not a directory.
    """
    if resume and record is None:
        raise ValueError("--resume needs --record FILE (the outcomes of the run to resume)")
    _check_paths(keep, record)
    prior = read_record(record, settings) if record is not None else {}  # checked first: never append to a non-record
    done = {name: line for name, line in prior.items() if line.get("ok")} if resume else {}
    from lowrank_vit.harness.registry import list_experiments

    if settings.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {settings.layout!r}; layouts: {', '.join(LAYOUTS)}")
    import datasets

    datasets.disable_progress_bars()  # the rows' lines are the output
    exps: dict[str, Any] = {}
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = list_experiments(pattern)
        if not matched:
            raise ValueError(f"no experiment matches {pattern!r}")
        exps.update((e.name, e) for e in matched)
    outcomes = []
    for exp in exps.values():
        if exp.name in done:
            line = done[exp.name]
            echo(f"{exp.name}: ok, recorded {line.get('finished', '?')} ({line.get('seconds', '?')} s, version "
                 f"{line.get('version', '?')}); not run again (--resume)")
            outcomes.append({"name": exp.name, "ok": True, "message": line.get("message", "ok"),
                             "seconds": float(line.get("seconds", 0.0)), "recorded": True})
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rehearse-", dir=keep) as tmp:
            try:
                note = rehearse_row(exp, Path(tmp), settings)
                ok, message = True, f"ok ({note})"
            except Exception as err:  # noqa: BLE001 - every failure is a finding, reported on the row's line
                ok, message = False, f"BROKEN: {type(err).__name__}: {' '.join(str(err).split())[:400]}"
        seconds = time.perf_counter() - started
        echo(f"{exp.name}: {message} [{seconds:.0f} s, layout {settings.layout}]")
        outcomes.append({"name": exp.name, "ok": ok, "message": message, "seconds": round(seconds, 1)})
        if record is not None:
            _append_record(Path(record), outcomes[-1], settings)
    return outcomes


def add_rehearse_command(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Register ``rehearse`` on ``lowrank-vit``'s subparsers; returns its handler by name."""
    from lowrank_vit.harness.argtypes import positive_int

    p = sub.add_parser("rehearse", help="run rows' full-scale configs on a CPU (or GPUs) with random weights and "
                                        "generated data, cut to a few steps; one line per row, ok or what broke")
    p.add_argument("patterns", nargs="+", metavar="NAME_OR_PATTERN",
                   help="row names, shell patterns or prefixes, e.g. 'table2/deit_s/*' or table4")
    p.add_argument("--layout", choices=list(LAYOUTS), default="hub-parquet", help="the generated ImageNet layout")
    p.add_argument("--devices", type=positive_int, default=1, help="processes per row (>1: DDP), one per CPU or GPU")
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                   help="where the rows run (default cpu; gpu: one CUDA device per process)")
    p.add_argument("--depth", type=positive_int,
                   help="shrink every model to at most this many blocks per stage (said on every line; default: "
                        "the full architecture)")
    p.add_argument("--workdir", help="where the rows' temporary files go (default: the system's temporary folder)")
    p.add_argument("--record", metavar="FILE",
                   help="append each row's outcome to this JSON-lines file as soon as the row ends")
    p.add_argument("--resume", action="store_true",
                   help="skip the rows already ok in --record FILE with the same layout, devices, accelerator and "
                        "depth")
    return {"rehearse": _cmd_rehearse}


def _cmd_rehearse(args: argparse.Namespace) -> int:
    settings = RehearsalSettings(layout=args.layout, devices=args.devices, accelerator=args.accelerator,
                                 depth=args.depth)  # a ValueError is the CLI's one-line error
    outcomes = rehearse(args.patterns, settings, keep=args.workdir, echo=lambda line: print(line, flush=True),
                        record=args.record, resume=args.resume)
    failed = [o["name"] for o in outcomes if not o["ok"]]
    ran = [o for o in outcomes if not o.get("recorded")]
    recorded = len(outcomes) - len(ran)
    summary = (f"rehearse: {len(outcomes) - len(failed)} of {len(outcomes)} row(s) ok in "
               f"{sum(o['seconds'] for o in ran):.0f} s")
    if recorded:
        summary += (f" ({len(ran)} run now, {recorded} ok in the record; all rows together "
                    f"{sum(o['seconds'] for o in outcomes):.0f} s summed over the runs)")
    print(summary + (f"; broken: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


__all__ = ["LAYOUTS", "RehearsalError", "RehearsalSettings", "add_rehearse_command", "check_data",
           "check_preprocessing", "check_result", "read_record", "rehearse", "rehearse_row", "register_layout"]
