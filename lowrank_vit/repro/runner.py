"""Running registry rows: ``plan`` (ranks and sizes only), ``run`` (the whole pipeline of one row) and
``reproduce`` (a table's rows, then the table of paper vs measured numbers).

A row's run: load the model (timm pretrained weights, or the cached smoke stand-in) -> evaluate it -> compress on
the calibration subset -> partial fine-tune (Lightning; DDP when several devices) -> optional PTQ -> evaluate ->
``DIR/NAME/result.json`` and the compressed model (``save_compressed``) in ``DIR/NAME/model``. Under DDP rank zero
compresses, saves the compressed model in ``DIR/NAME/.compressed-for-ranks`` and the processes Lightning starts for
the fine-tune load it instead of compressing again (processes started otherwise, e.g. by torchrun, compress the
same way themselves: everything is seeded); only rank zero evaluates and writes.

Here: a row's stages (:class:`_Row`), :func:`run_row` and :func:`reproduce`. Its evaluations, the dense accuracy a
table's rows share, its finished result and its wandb logger are in :mod:`lowrank_vit.repro.rows`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import fnmatch
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.files import write_json
from lowrank_vit.io.surgery import load_compressed, save_compressed
from lowrank_vit.methods.vmeanba import check_blocks
from lowrank_vit.nn.adapters import count_params
from lowrank_vit.nn.quantize import model_size_mib, quantize_
from lowrank_vit.repro.ddp import is_rank_zero, share_compressed, shared_compressed
from lowrank_vit.repro.flow import compress_model
from lowrank_vit.repro.models import (
    SetupError,
    build_model,
    check_classes,
    checkpoint_digest,
    resolve_device,
)
from lowrank_vit.repro.overrides import check_overrides
from lowrank_vit.repro.registry import (
    Experiment,
    RunConfig,
    list_experiments,
)
from lowrank_vit.repro.rows import (
    RESULT_FILE,
    WANDB_MODES,
    check_dense_baseline,
    evaluate,
    finished,
    installed_version,
    make_row_logger,
    row_dense_accuracy,
    standin_weights_fingerprint,
)
from lowrank_vit.repro.tables import (
    render_table,
    write_table,
)
from lowrank_vit.stages.finetune_config import check_precision_on
from lowrank_vit.stages.logging_utils import finish as finish_wandb_run
from lowrank_vit.stages.logging_utils import log_ranks_table, silence_third_party

MODEL_DIR = "model"


def row_config(exp: Experiment, scale: str, overrides: Iterable[str] = ()) -> RunConfig:
    """``exp``'s config at ``scale`` with the ``--set`` assignments applied, each checked against its field's type
    first (:func:`lowrank_vit.repro.overrides.check_overrides`), so malformed input fails before anything runs."""

    overrides = list(overrides)
    check_overrides(overrides)
    return exp.config(scale).override(overrides)


def default_output(scale: str) -> Path:
    """Where results go unless told: ``results/`` for the full scale, ``results/smoke/`` for the smoke one, so the
    two never overwrite each other."""
    return Path("results") if scale == "full" else Path("results") / "smoke"


# --------------------------------------------------------------------------------------------- models and inputs


# --------------------------------------------------------------------------------------------------------- plan


# ---------------------------------------------------------------------------------------------------------- run


def _check_writable(exp: Experiment, out_dir: Path) -> None:
    """Fail now with one line, not with a traceback after the compression and the fine-tune, when the row's
    directory cannot be created: its nearest existing ancestor (or itself) is a file or not writable. Creates
    nothing, so a run refused later (no data, no weights) leaves no directory behind."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
                raise SetupError(f"cannot write the results of {exp.name} to {out_dir}: {path} is "
                                 f"{'not a directory' if not path.is_dir() else 'not writable'}; choose another "
                                 f"--output")
            return


def run_row(exp: Experiment, scale: str = "smoke", *, output: str | os.PathLike | None = None,
            accelerator: str | None = None, devices: int | None = None, num_nodes: int | None = None,
            overrides: Iterable[str] = (), wandb: str = "offline", force: bool = False, group: str | None = None,
            progress: bool = True) -> dict[str, Any] | None:
    """Run one row end to end and write ``OUTPUT/NAME/result.json`` and ``OUTPUT/NAME/model``.

    The wandb run (one per row, all stages) is grouped by ``group`` (default ``TABLE-SCALE``) and tagged with the
    method, architecture, scale and ratio, which are also top-level config keys (``method``, ``arch``, ``ratio``),
    so a dashboard grouped by any of them compares the methods side by side.

    Returns:
        The result (also when it was already there with the same config and ``force`` is False), or None on a
        non-zero DDP rank.

    Raises:
        SetupError: missing weights, data or device, or a different finished run in the way.
    """

    if wandb not in WANDB_MODES:
        raise ValueError(f"wandb mode {wandb!r} is not one of {', '.join(WANDB_MODES)}")
    silence_third_party()
    cfg = row_config(exp, scale, overrides).with_hardware(accelerator, devices, num_nodes)
    output = Path(output) if output is not None else default_output(scale)
    if not force:
        done = finished(exp, cfg, output)
        if done is not None:
            _say(progress, f"{exp.name}: already finished in {output / exp.name} (use --force to run it again)")
            return done
    _check_writable(exp, output / exp.name)
    row = _Row(exp, cfg, scale, output, progress)
    row.load()
    row.begin(wandb, group)
    if row.rank_zero:
        row.evaluate_dense()
    # the fine-tune's distillation target: the model as built, before compression (every DDP rank built it the same)
    teacher = copy.deepcopy(row.model).eval() if cfg.finetune is not None and cfg.finetune.distill > 0 else None
    row.compress()
    if cfg.finetune is not None and not row.finetune(teacher):
        return None  # a DDP process other than rank zero: its share of the fine-tune is done
    return row.finish()


class _Row:
    """One run of a registry row, stage by stage (:func:`run_row` says the order): what the stages share, and each
    stage's wall time in ``seconds``."""

    def __init__(self, exp: Experiment, cfg: RunConfig, scale: str, output: Path, progress: bool) -> None:
        self.exp, self.cfg, self.scale, self.output, self.progress = exp, cfg, scale, output, progress
        self.out_dir = output / exp.name
        self.started, self.seconds = time.perf_counter(), {}
        self.compresses = cfg.compression is not None or cfg.vmeanba is not None or cfg.pruning is not None
        self.rank_zero = is_rank_zero()  # under DDP the other ranks only compress and fine-tune
        self.report = None
        self.logger = None

    def _say(self, message: str) -> None:
        _say(self.progress, f"{self.exp.name}: {message}")

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - begin, 3)

    def load(self) -> None:
        """The data checked first (before any weight is downloaded), then the model, its checkpoint's digest, the
        data module with the model's preprocessing, and the class count checked against the head."""
        from lowrank_vit.stages.data import build_datamodule

        cfg = self.cfg
        with self._stage("load"):
            data_cfg = cfg.data
            if cfg.finetune is not None:
                data_cfg = replace(data_cfg, batch_size=cfg.finetune.batch_size)
            build_datamodule(data_cfg)  # checks that the data exists before any weight is downloaded
            self.device = resolve_device(cfg.hardware.accelerator)
            if cfg.finetune is not None:
                check_precision_on(cfg.finetune.precision, self.device.type)  # before the model is built
            self.model = build_model(cfg.model, progress=self.progress)
            if cfg.vmeanba is not None:
                check_blocks(self.model, cfg.vmeanba)  # a model without scans, or K above its blocks: before the data
            self.digest = None if cfg.model.checkpoint is None else checkpoint_digest(cfg.model.checkpoint)
            self.dm = build_datamodule(data_cfg, self.model)
            self.dm.setup("fit")
            check_classes(self.model, self.dm.num_classes, f"the data {data_cfg.path or data_cfg.name!r}")
        # inference needs no activations kept: larger batches than training's make the evaluations cheaper
        self.eval_loader = self.dm.val_dataloader(batch_size=max(256, 2 * data_cfg.batch_size))

    def begin(self, wandb: str, group: str | None) -> None:
        exp = self.exp
        _say(self.progress, f"{exp.name} [{self.scale}]: {exp.description}")
        self.params_before = count_params(self.model)
        self.result: dict[str, Any] = {
            "name": exp.name, "table": exp.table, "arch": exp.arch, "method": exp.method, "scale": self.scale,
            "reduction": exp.reduction or 0.0, "params_before": self.params_before,
            "preprocessing": _preprocessing_record(self.dm.preprocessing)}
        self.logger = make_row_logger(exp, self.cfg, wandb, self.out_dir, group) if self.rank_zero else None

    def _evaluate(self, what: str) -> dict[str, Any]:
        return evaluate(self.model, self.eval_loader, self.device, self.progress, f"evaluate {what}")

    def evaluate_dense(self) -> None:
        """The starting model's accuracy (shared by the rows of one output directory), and at full scale the
        baseline guard."""
        self._say("evaluating the starting model")
        with self._stage("evaluate_dense"):
            self.result["dense"] = row_dense_accuracy(self.cfg, self.digest, self.output,
                                                      lambda: self._evaluate("dense"))
        if self.scale == "full" and self.compresses and not self.cfg.run.skip_baseline_guard:
            note = check_dense_baseline(self.exp, self.cfg, self.result["dense"]["top1"])
            if note:
                _say(True, note)

    def compress(self) -> None:
        """VMeanba's scans, then the low-rank compression (:func:`~lowrank_vit.repro.flow.compress_model`, the
        step ``lowrank-vit compress`` runs too). A DDP process of the fine-tune loads what rank zero compressed."""

        cfg = self.cfg
        shared = shared_compressed(self.exp.name) if self.compresses else None
        if shared is not None:  # a DDP process of the fine-tune: rank zero has compressed the model already
            self.model = load_compressed(shared).to(self.device)
            return
        done = compress_model(self.model, self.dm.calibration_dataloader, cfg.compression, cfg.vmeanba,
                              device=self.device, progress=self.progress, say=self._say, pruning=cfg.pruning)
        self.seconds.update(done.seconds)
        if done.vmeanba is not None:
            self.result["vmeanba"] = done.vmeanba
        if done.pruning is not None:
            self.result["pruning"] = done.pruning
        if done.report is None:
            return
        self.report = done.report
        layers = [layer for layer in self.report.layers if layer.rank is not None]
        self.result.update(report=self.report.to_dict(),
                           residual_error=_mean([layer.output_error for layer in layers]),
                           residual_error_lowrank=_mean([layer.output_error_lowrank for layer in layers]))
        log_ranks_table(self.logger, self.report)
        if cfg.finetune is not None and self.rank_zero:
            self._say("evaluating the compressed model before fine-tuning")
            with self._stage("evaluate_compressed"):
                self.result["compressed"] = self._evaluate("compressed")

    def finetune(self, teacher: nn.Module | None) -> bool:
        """The partial fine-tune (Lightning; DDP over several devices, the other processes loading the model rank
        zero compressed). Returns whether this process goes on (rank zero) or is done."""
        from lowrank_vit.stages.finetune import finetune

        ft, hw = self.cfg.finetune, self.cfg.hardware
        self._say(f"fine-tuning ({ft.epochs} epoch(s)" + (f", at most {ft.max_steps} steps)" if ft.max_steps else ")"))
        begin = time.perf_counter()
        share = self.rank_zero and hw.distributed and (self.report is not None or "vmeanba" in self.result)
        with share_compressed(self.model, self.exp.name, self.out_dir, share):
            module, trainer = finetune(self.model, datamodule=self.dm, config=ft, teacher=teacher,
                                       logger=self.logger, checkpoint_dir=str(self.out_dir / "checkpoints"),
                                       ckpt_path="last", accelerator=hw.accelerator, devices=hw.devices,
                                       num_nodes=hw.num_nodes, strategy="ddp" if hw.distributed else "auto",
                                       progress=self.progress)
        if trainer.global_rank != 0:
            return False
        self.seconds["finetune"] = round(time.perf_counter() - begin, 3)
        self.result["finetune"] = {"world_size": trainer.world_size, "steps": trainer.global_step,
                                   "epochs": trainer.current_epoch, "trainable_params": module.trainable["trainable"],
                                   "trainable_fraction": module.trainable["fraction"]}
        return True

    def finish(self) -> dict[str, Any]:
        """PTQ where the row has it, the final evaluation, the compressed model saved, ``result.json`` written."""

        cfg, exp, result, model = self.cfg, self.exp, self.result, self.model
        if cfg.quantization is not None:
            self._say(f"quantizing to {cfg.quantization.bits} bits")
            with self._stage("quantize"):
                quantize_(model, cfg.quantization.bits, cfg.quantization.include_dense)
        self._say("evaluating the final model")
        with self._stage("evaluate"):
            final = self._evaluate("final")
        result.update(params=count_params(model), size_mib=model_size_mib(model, bits=cfg.size_bits),
                      top1=final["top1"], top5=final["top5"], val_images=final["images"])
        result["measured_reduction"] = 1.0 - result["params"] / self.params_before
        if self.compresses:
            with self._stage("save"):
                save_compressed(model.cpu(), self.out_dir / MODEL_DIR,
                                metadata={"experiment": exp.name, "scale": self.scale,
                                          **({"pruning": result["pruning"]} if "pruning" in result else {})})
        self.seconds["total"] = round(time.perf_counter() - self.started, 3)
        self._record(result)
        write_json(self.out_dir / RESULT_FILE, result)
        shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)  # the run is done; the model is saved
        self._say(f"done in {self.seconds['total']:.0f} s -> {self.out_dir / RESULT_FILE}")
        return result

    def _record(self, result: dict[str, Any]) -> None:
        """What the result records beside the figures (weights, config, versions, times), and the wandb run's last
        metrics."""

        cfg = self.cfg
        if cfg.model.source == "standin" and cfg.model.pretrained:
            result["standin_fingerprint"] = standin_weights_fingerprint(cfg.model.name)
        if self.digest is not None:
            result["checkpoint_sha256"] = self.digest
        result.update(stage_seconds=self.seconds, paper=self.exp.to_dict()["paper"], notes=list(self.exp.notes),
                      config=cfg.to_dict(),
                      finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      versions={"torch": torch.__version__, "timm": installed_version("timm"),
                                "lowrank_vit": installed_version("lowrank_vit")})
        if self.logger is not None:
            self.logger.log_metrics({f"result/{k}": result[k] for k in ("top1", "top5", "params", "size_mib")} |
                                    {f"result/seconds_{k}": v for k, v in self.seconds.items()})
            finish_wandb_run(self.logger)


def _preprocessing_record(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The images the row's model was fed (size, normalization, resize and crop), recorded with its result: what
    wrong preprocessing would show first."""
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in preprocessing.items() if k in keys}


def _mean(values: list[float]) -> float | None:
    """The mean, or None when there is nothing to average or a value is undefined (NaN: COMCAT's attention units
    have no per-layer eq. 5 error, so a mean over the other layers would not compare with other methods')."""
    if not values or any(math.isnan(v) for v in values):
        return None
    return sum(values) / len(values)


def _say(enabled: bool, message: str) -> None:
    if enabled and is_rank_zero():
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- reproduce


def select_rows(table: str, rows: str | None = None) -> list[Experiment]:
    """The rows of ``table`` (optionally only those matching the shell pattern ``rows``).

    Raises:
        ValueError: no such table, or the pattern matches none of its rows.
    """
    exps = [e for e in list_experiments() if e.table == table]
    if not exps:
        known = sorted({e.table for e in list_experiments()})
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(known)}")
    if rows:
        exps = [e for e in exps if fnmatch.fnmatchcase(e.name, rows)]
        if not exps:
            raise ValueError(f"--rows {rows!r} matches no row of {table}")
    return exps


def reproduce(table: str, scale: str = "smoke", *, rows: str | None = None, output: str | os.PathLike | None = None,
              accelerator: str | None = None, devices: int | None = None, num_nodes: int | None = None,
              overrides: Iterable[str] = (), wandb: str = "offline", force: bool = False,
              progress: bool = True, group: str | None = None) -> dict[str, Any]:
    """Run the table's rows that are not finished yet, each in its own process (so a multi-process Lightning run
    launches cleanly per row and one row's memory is freed before the next), then write ``OUTPUT/TABLE.md`` and
    ``OUTPUT/TABLE.json``. Failed rows are reported and the table is written with what finished. ``group`` names
    the wandb group of every row's run (default ``TABLE-SCALE``).

    Returns:
        The table's JSON data (``rows`` and ``failed``).
    """
    exps = select_rows(table, rows)
    output = Path(output) if output is not None else default_output(scale)
    overrides = list(overrides)
    configs = [row_config(exp, scale, overrides).with_hardware(accelerator, devices, num_nodes) for exp in exps]
    failed = []
    for i, (exp, cfg) in enumerate(zip(exps, configs, strict=True), 1):
        if not force and finished(exp, cfg, output) is not None:
            _say(progress, f"[{i}/{len(exps)}] {exp.name}: already finished, skipped")
            continue
        _say(progress, f"[{i}/{len(exps)}] {exp.name}")
        command = [sys.executable, "-m", "lowrank_vit.cli.main", "run", exp.name, "--scale", scale, "--output",
                   str(output), "--wandb", wandb]
        for flag, value in (("--accelerator", accelerator), ("--devices", devices), ("--num-nodes", num_nodes)):
            if value is not None:
                command += [flag, str(value)]
        for assignment in overrides:
            command += ["--set", assignment]
        if group is not None:
            command += ["--wandb-group", group]
        if force:
            command.append("--force")
        if not progress:
            command.append("--quiet")
        # the row's own output is progress, never the table: to the process's stderr (file descriptor 2, which the
        # row's stderr shares; sys.stderr may be an object without one, as under pytest or in a notebook), or
        # nowhere under --quiet, so stdout stays the table's and a reader closing it early cannot break a row
        child_out = 2 if progress else subprocess.DEVNULL
        if subprocess.run(command, check=False, stdout=child_out).returncode != 0:
            failed.append(exp.name)
            _say(True, f"[{i}/{len(exps)}] {exp.name}: FAILED (see the messages above); going on")
    data = write_table(table, select_rows(table), scale, output)  # every row of the table, finished or not
    data["failed"] = failed
    data["selected_markdown"] = render_table(table, exps, scale, output) if rows else \
        (output / f"{table}.md").read_text()
    return data


# ------------------------------------------------------------------------------------------ the comparison table


__all__ = [
    "default_output",
    "evaluate",
    "reproduce",
    "row_config",
    "run_row",
    "select_rows",
]
