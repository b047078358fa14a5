"""Running registry rows: ``plan`` (ranks and sizes only), ``run`` (the whole pipeline of one row) and
``reproduce`` (a table's rows, then the table of paper vs measured numbers).

A row's run: load the model (timm pretrained weights, or the cached smoke stand-in) -> evaluate it -> compress on
the calibration subset -> partial fine-tune (Lightning; DDP when several devices) -> optional PTQ -> evaluate ->
``DIR/NAME/result.json`` and the compressed model (``save_compressed``) in ``DIR/NAME/model``. Under DDP rank zero
compresses, saves the compressed model in ``DIR/NAME/.compressed-for-ranks`` and the processes Lightning starts for
the fine-tune load it instead of compressing again (processes started otherwise, e.g. by torchrun, compress the
same way themselves: everything is seeded); only rank zero evaluates and writes.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import fnmatch
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.config import resolve_gram_precision
from lowrank_vit.core.files import write_json
from lowrank_vit.harness.baseline import check_dense_baseline
from lowrank_vit.harness.ddp import _is_rank_zero, share_compressed, shared_compressed
from lowrank_vit.harness.models import (
    SetupError,
    build_model,
    check_classes,
    checkpoint_digest,
    resolve_device,
)
from lowrank_vit.harness.registry import (
    Experiment,
    ModelConfig,
    RunConfig,
    list_experiments,
)
from lowrank_vit.harness.tables import (
    render_table,
    write_table,
)
from lowrank_vit.nn.adapters import count_params
from lowrank_vit.stages.finetune_config import check_precision_on

RESULT_FILE = "result.json"
MODEL_DIR = "model"
WANDB_MODES = ("online", "offline", "disabled")
DENSE_DIR = ".dense"
"""Under the output directory: the starting models' accuracies, shared by the rows (see ``_dense_accuracy``)."""


def row_config(exp: Experiment, scale: str, overrides: Iterable[str] = ()) -> RunConfig:
    """``exp``'s config at ``scale`` with the ``--set`` assignments applied, each checked against its field's type
    first (:func:`lowrank_vit.harness.overrides.check_overrides`), so malformed input fails before anything runs."""
    from lowrank_vit.harness.overrides import check_overrides

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


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, progress: bool = True,
             desc: str = "evaluate") -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-k capped at the number of classes), the image count and the number
    of classes (with 5 or fewer, every image is in the top 5: printers leave that figure out)."""
    from lowrank_vit.core.progress import progress_bar
    from lowrank_vit.stages.finetune import split_batch

    model.eval().to(device)
    correct1 = correct5 = total = classes = 0
    with progress_bar(len(loader) if hasattr(loader, "__len__") else 0, desc, "batch", progress) as bar:
        for batch in loader:
            images, labels = split_batch(batch)
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            logits = (logits[0] + logits[1]) / 2 if isinstance(logits, tuple) else logits
            if not torch.isfinite(logits).all():
                raise FloatingPointError("the model produced NaN or inf logits")
            classes = logits.shape[1]
            top = logits.topk(min(5, classes), dim=1).indices
            hits = top == labels[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            total += labels.numel()
            bar.update(1)
    if total == 0:
        raise ValueError("the evaluation split is empty")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "images": total, "classes": classes}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without what does not change its result (hardware, run switches), with the fields a newer
    version added filled in with their defaults (so that a new option does not orphan every finished result)."""
    try:
        run = RunConfig.from_dict(config)
        config = run.to_dict()
        if run.compression is not None:  # "auto" (None) and the value earlier versions resolved it to compare equal
            config["compression"]["gram_precision"] = resolve_gram_precision(run.compression, "cpu",
                                                                             float32_exact=True)
    except (TypeError, ValueError, KeyError, AttributeError):
        pass  # unreadable: compared as it is (and found different)
    return {k: v for k, v in config.items() if k not in ("hardware", "run")}


def read_result(out_dir: Path) -> dict[str, Any] | None:
    """A finished row's result, or None when there is none (or it is unreadable)."""
    path = out_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(exp: Experiment, cfg: RunConfig, output: Path) -> dict[str, Any] | None:
    """The result of ``exp`` in ``output`` if it finished with this very config.

    Raises:
        SetupError: a result is there but from another config (it is never overwritten silently).
    """
    result = read_result(output / exp.name)
    if result is None:
        return None
    if cfg.model.source == "standin" and cfg.model.pretrained and \
            result.get("standin_fingerprint") != _standin_fingerprint(cfg.model.name):
        return None  # computed from an older stand-in recipe: stale, run again
    if cfg.model.checkpoint is not None and Path(cfg.model.checkpoint).expanduser().is_file() and \
            result.get("checkpoint_sha256") != checkpoint_digest(cfg.model.checkpoint):
        return None  # computed from other weights under the same path: stale, run again
    if _comparable(result.get("config", {})) != _comparable(cfg.to_dict()):
        raise SetupError(f"{output / exp.name / RESULT_FILE} holds a run of {exp.name} with another config; "
                         f"pass --force to replace it or choose another --output")
    return result


def _standin_fingerprint(arch: str) -> str | None:
    from lowrank_vit.harness.standins import STANDINS

    spec = STANDINS.get(arch)
    return None if spec is None else spec.fingerprint()


def _weights_identity(cfg: ModelConfig, digest: str | None) -> str | None:
    """What names the starting weights for good, or None when nothing does (a random initialization)."""
    if cfg.checkpoint is not None:
        return f"sha256:{digest}"
    if not cfg.pretrained:
        return None
    return f"standin:{_standin_fingerprint(cfg.name)}" if cfg.source == "standin" else f"timm:{cfg.name}"


def _dense_accuracy(cfg: RunConfig, digest: str | None, output: Path,
                    evaluate_dense: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The starting model's accuracy, evaluated once per output directory: every row of a table that starts from
    the same weights and evaluates on the same data reuses it (``OUTPUT/.dense/KEY.json``), which saves one full
    pass over the validation set per row. Random initializations are never reused."""
    weights = _weights_identity(cfg.model, digest)
    if weights is None:
        return evaluate_dense()
    config = cfg.to_dict()
    data = {k: v for k, v in config["data"].items() if k not in ("calib_samples", "augment", "num_workers")}
    payload = {"model": config["model"], "weights": weights, "data": data, "versions": [
        torch.__version__, _version("timm")]}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = output / DENSE_DIR / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and isinstance(cached.get("top1"), (int, float)):
            return cached
    except (OSError, ValueError):
        pass  # not there yet, or damaged: evaluate again
    value = evaluate_dense()
    write_json(path, value)
    return value


def _make_logger(exp: Experiment, cfg: RunConfig, wandb: str, out_dir: Path, group: str | None = None) -> Any:
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
    from lowrank_vit.stages.logging_utils import silence_third_party

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
        self.compresses = cfg.compression is not None or cfg.vmeanba is not None
        self.rank_zero = _is_rank_zero()  # under DDP the other ranks only compress and fine-tune
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
                from lowrank_vit.methods.vmeanba import check_blocks

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
        self.logger = _make_logger(exp, self.cfg, wandb, self.out_dir, group) if self.rank_zero else None

    def _evaluate(self, what: str) -> dict[str, Any]:
        return evaluate(self.model, self.eval_loader, self.device, self.progress, f"evaluate {what}")

    def evaluate_dense(self) -> None:
        """The starting model's accuracy (shared by the rows of one output directory), and at full scale the
        baseline guard."""
        self._say("evaluating the starting model")
        with self._stage("evaluate_dense"):
            self.result["dense"] = _dense_accuracy(self.cfg, self.digest, self.output, lambda: self._evaluate("dense"))
        if self.scale == "full" and self.compresses and not self.cfg.run.skip_baseline_guard:
            note = check_dense_baseline(self.exp, self.cfg, self.result["dense"]["top1"])
            if note:
                _say(True, note)

    def compress(self) -> None:
        """VMeanba's scans, then the low-rank compression (:func:`~lowrank_vit.harness.flow.compress_model`, the
        step ``lowrank-vit compress`` runs too). A DDP process of the fine-tune loads what rank zero compressed."""
        from lowrank_vit.harness.flow import compress_model
        from lowrank_vit.io.surgery import load_compressed
        from lowrank_vit.stages.logging_utils import log_ranks_table

        cfg = self.cfg
        shared = shared_compressed(self.exp.name) if self.compresses else None
        if shared is not None:  # a DDP process of the fine-tune: rank zero has compressed the model already
            self.model = load_compressed(shared).to(self.device)
            return
        done = compress_model(self.model, self.dm.calibration_dataloader, cfg.compression, cfg.vmeanba,
                              device=self.device, progress=self.progress, say=self._say)
        self.seconds.update(done.seconds)
        if done.vmeanba is not None:
            self.result["vmeanba"] = done.vmeanba
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
        from lowrank_vit.io.surgery import save_compressed
        from lowrank_vit.nn.quantize import model_size_mib, quantize_

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
                                metadata={"experiment": exp.name, "scale": self.scale})
        self.seconds["total"] = round(time.perf_counter() - self.started, 3)
        self._record(result)
        write_json(self.out_dir / RESULT_FILE, result)
        shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)  # the run is done; the model is saved
        self._say(f"done in {self.seconds['total']:.0f} s -> {self.out_dir / RESULT_FILE}")
        return result

    def _record(self, result: dict[str, Any]) -> None:
        """What the result records beside the figures (weights, config, versions, times), and the wandb run's last
        metrics."""
        from lowrank_vit.stages.logging_utils import finish

        cfg = self.cfg
        if cfg.model.source == "standin" and cfg.model.pretrained:
            result["standin_fingerprint"] = _standin_fingerprint(cfg.model.name)
        if self.digest is not None:
            result["checkpoint_sha256"] = self.digest
        result.update(stage_seconds=self.seconds, paper=self.exp.to_dict()["paper"], notes=list(self.exp.notes),
                      config=cfg.to_dict(),
                      finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      versions={"torch": torch.__version__, "timm": _version("timm"),
                                "lowrank_vit": _version("lowrank_vit")})
        if self.logger is not None:
            self.logger.log_metrics({f"result/{k}": result[k] for k in ("top1", "top5", "params", "size_mib")} |
                                    {f"result/seconds_{k}": v for k, v in self.seconds.items()})
            finish(self.logger)


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


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _say(enabled: bool, message: str) -> None:
    if enabled and _is_rank_zero():
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
        command = [sys.executable, "-m", "lowrank_vit.harness.cli", "run", exp.name, "--scale", scale, "--output",
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
