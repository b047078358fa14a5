"""``lowrank-vit finetune DIR --data DATA --epochs N --output NEWDIR``: the partial fine-tune of a compressed
directory into a new one, checkpointed every N steps and on Ctrl-C, resumed by the same command.

A model that is not a classifier, or a classifier given images without labels, fine-tunes by distillation alone
(``--distill 1``): the dense model's outputs matched under the likelihood ``compress`` recorded
(:func:`lowrank_vit.stages.finetune.output_distillation_loss`), and is evaluated by its fidelity to it."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lowrank_vit.cli.base import UserError, resolve_device, say_to_user, user_command
from lowrank_vit.cli.data import (
    build_data,
    check_data_path,
    evaluate_on_user_data,
    fidelity_on_data,
    measures_top1,
    no_top1_reason,
    recorded_output,
    top5_text,
)
from lowrank_vit.cli.fidelity import fidelity_text
from lowrank_vit.cli.outputs import check_output_dir, publish, report_layers, staging_dir, write_model_dir
from lowrank_vit.cli.preprocessing import describe_preprocessing, resolve_model_preprocessing
from lowrank_vit.cli.sources import directory_source, load_teacher
from lowrank_vit.core.files import write_json
from lowrank_vit.core.likelihood import is_classifier
from lowrank_vit.io.modelcard import REPORT_FILE
from lowrank_vit.io.surgery import WEIGHTS_FILE
from lowrank_vit.nn.adapters import count_params
from lowrank_vit.repro.models import checkpoint_digest
from lowrank_vit.stages.finetune_config import FinetuneConfig, check_precision_on


@user_command
def cmd_finetune(args: argparse.Namespace) -> int:
    from lowrank_vit.stages.finetune import finetune, resolve_finetune_likelihood

    directory = Path(args.model).expanduser()
    if not directory.is_dir():
        raise UserError(f"no model directory {args.model!r}: finetune takes a directory written by compress")
    out = Path(args.output).expanduser()
    check_output_dir(out, args.force, protect=directory)
    check_data_path(args.data)
    try:
        config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps,
                                precision=args.precision, distill=args.distill,
                                distill_temperature=args.distill_temperature, train_factors=args.train_factors,
                                checkpoint_every_n_steps=args.checkpoint_every)
    except ValueError as err:
        raise UserError(str(err)) from None
    device = resolve_device(args.device)
    check_precision_on(args.precision, device.type)  # before any model is read
    args.model_kwargs, args.checkpoint = {}, None
    source = directory_source(args, directory)
    pre, origin = resolve_model_preprocessing(source, args)
    say_to_user(args, describe_preprocessing(pre, origin))
    model = source.model
    recorded, output_key = recorded_output(source.metadata)
    try:
        likelihood = resolve_finetune_likelihood(model, recorded)
    except ValueError as err:
        raise UserError(f"{args.model!r}: {err}") from None
    if likelihood != "categorical" and config.distill != 1:
        what = (f"a model that is not a classifier (num_classes={getattr(model, 'num_classes', None)!r})"
                if not is_classifier(model) else f"a model compressed with the {likelihood!r} likelihood")
        raise UserError(f"{args.model!r} holds {what}: it fine-tunes toward the dense model's outputs alone, give "
                        f"--distill 1 (got {args.distill:g})")
    if likelihood != "categorical" and config.distill_temperature != 1:
        raise UserError(f"--distill-temperature softens class logits only; the {likelihood!r} likelihood "
                        f"{args.model!r} was compressed with has none: leave it at 1")
    teacher = load_teacher(args, source) if config.distill > 0 else None
    previous = _read_report(directory / REPORT_FILE)  # before the fine-tune: a bad report must not cost one
    dm = build_data(args, model, pre, augment=args.augment, calib_samples=1)  # no calibration in a fine-tune
    top1 = measures_top1(model, dm)
    if not top1 and config.distill != 1:
        raise UserError(f"--data {args.data!r} has no labels: a fine-tune without labels learns from the dense "
                        f"model's outputs alone, give --distill 1 (got {args.distill:g})")
    stage = staging_dir(out, "partial")  # a fixed name: a second run resumes from its checkpoints
    checkpoints = stage / "checkpoints"
    _resume_or_start(args, stage, _finetune_run(args, directory, config))
    start = time.perf_counter()
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    strategy = "ddp" if args.devices > 1 else "auto"
    try:
        module, trainer = finetune(model, datamodule=dm, config=config, teacher=teacher, accelerator=accelerator,
                                   devices=args.devices, strategy=strategy, checkpoint_dir=str(checkpoints),
                                   ckpt_path="last", progress=not args.quiet, likelihood=likelihood,
                                   output_key=output_key)
    except ValueError as err:  # PartialFinetune refuses a checkpoint of another model
        if not checkpoints.is_dir():
            raise
        raise UserError(f"{checkpoints} holds checkpoints of another model: remove {stage} to start over "
                        f"({err})") from None
    except SystemExit as exc:  # Lightning ends a run stopped by Ctrl-C with exit(1), after its last checkpoint
        if exc.code not in (1, None):
            raise
        print(f"lowrank-vit: the fine-tune was stopped; {_resume_note(checkpoints, args.checkpoint_every)}",
              file=sys.stderr)
        raise KeyboardInterrupt from None
    if trainer.global_rank != 0:
        return 0
    seconds = time.perf_counter() - start
    model = module.model.to(device).eval()
    if top1:
        final = evaluate_on_user_data(model, dm, device, args, "evaluate fine-tuned")
        accuracy = {**previous.get("accuracy", {}), "final": final}
        fidelity = previous.get("fidelity", {})
    else:
        say_to_user(args, f"{no_top1_reason(model, dm)}: the fine-tuned model is evaluated by its fidelity to the "
                          f"dense model instead of top-1")
        assert teacher is not None  # --distill 1 (checked above)
        final = fidelity_on_data(model, teacher, dm, device, args, "fidelity to the dense model", likelihood,
                                 output_key)
        accuracy = previous.get("accuracy", {})
        fidelity = {**(previous.get("fidelity") if isinstance(previous.get("fidelity"), dict) else {}),
                    "final": final}
    report = {**previous, "name": out.name, "command": "finetune", "input": str(directory), "data": args.data,
              "preprocessing": pre, "preprocessing_origin": origin, "accuracy": accuracy,
              "params": {**previous.get("params", {}), "after": count_params(model)},
              "finetune": {**config.to_dict(), "steps": int(trainer.global_step), "seconds": seconds,
                           "augment": args.augment}}
    if fidelity:
        report["fidelity"] = fidelity
    report.setdefault("layers", report_layers(model, None))
    report.setdefault("source", {"description": source.description, "architecture": source.architecture})
    metadata = {**source.metadata, "preprocessing": pre, "finetune": report["finetune"]}
    write_model_dir(stage, model, report, metadata, source.rebuild)
    shutil.rmtree(checkpoints, ignore_errors=True)  # Lightning checkpoints are pickles: none left in a model dir
    (stage / RESUME_FILE).unlink(missing_ok=True)
    publish(stage, out)
    if top1:
        print(f"{out}: fine-tuned {trainer.global_step} steps, top-1 {final['top1']:.2f}% "
              f"({top5_text(final, '', ', ')}{final['images']:,} images)")
    else:
        print(f"{out}: fine-tuned {trainer.global_step} steps, fidelity to the dense model: {fidelity_text(final)} "
              f"({final['images']:,} images)")
    return 0


RESUME_FILE = "resume.json"
"""In a fine-tune's staging directory: what the interrupted run was, so that only the same run resumes there."""


def _resume_note(checkpoints: Path, every: int) -> str:
    """What the same command will do after an interruption, read from the checkpoints' names (never unpickled)."""

    def numbered(kind: str) -> list[int]:  # finetune's file names: step00000100.ckpt, epoch002.ckpt
        return [int(m.group(1)) for f in checkpoints.glob(f"{kind}*.ckpt")
                if (m := re.fullmatch(rf"{kind}(\d+)\.ckpt", f.name))]

    steps, epochs = numbered("step"), numbered("epoch")
    if not (checkpoints / "last.ckpt").is_file() or not (steps or epochs):
        return (f"no checkpoint had been written yet (one every {every} steps and at each epoch's end): the same "
                f"command starts over")
    where = f"step {max(steps)}" if steps else f"the end of epoch {max(epochs) + 1}"
    return f"the same command resumes it from its last checkpoint ({where}) in {checkpoints}"


def _finetune_run(args: argparse.Namespace, directory: Path, config: Any) -> dict[str, Any]:
    """What makes two fine-tune commands the same run: the input's weights, the data and the settings, but not
    where it stops (``--epochs``, ``--max-steps``: a run may be resumed to go further, as Lightning allows)."""

    data = Path(str(args.data)).expanduser()
    return {"input": str(directory.resolve()), "input_sha256": checkpoint_digest(directory / WEIGHTS_FILE),
            "data": str(data.resolve()) if data.exists() else str(args.data), "augment": bool(args.augment),
            "finetune": {k: v for k, v in config.to_dict().items()
                         if k not in ("epochs", "max_steps", "checkpoint_every_n_steps")}}


def _resume_or_start(args: argparse.Namespace, stage: Path, run: dict[str, Any]) -> None:
    """Resume from the staging directory's checkpoints only if they belong to this very run; else refuse, naming
    what differs (Lightning would otherwise continue another model's or another schedule's weights)."""
    last = stage / "checkpoints" / "last.ckpt"
    record = stage / RESUME_FILE
    if last.is_file():
        try:
            before = json.loads(record.read_text())
        except (OSError, ValueError):
            before = None
        if not isinstance(before, dict):
            raise UserError(f"{stage} holds checkpoints of an interrupted fine-tune that does not say what it was: "
                            f"remove {stage} to start over")
        differ = [key for key in run if before.get(key) != run[key]]
        if differ:
            raise UserError(f"{stage} holds an interrupted fine-tune with another {', '.join(differ)}: rerun that "
                            f"command to resume it, or remove {stage} to start over")
        say_to_user(args, f"resuming from {last}")
        return
    stage.mkdir(parents=True, exist_ok=True)
    write_json(record, run)


def _read_report(path: Path) -> dict[str, Any]:
    """The input's report.json, which the fine-tune's report extends; its sections that are not what compress
    writes (hand-edited, or from another tool) are dropped rather than carried into the new report."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items()
            if key not in ("accuracy", "params") or isinstance(value, dict)}
