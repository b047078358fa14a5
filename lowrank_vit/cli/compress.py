"""``lowrank-vit compress / evaluate / finetune / export``: your own timm model and data, from the command line.

The registry commands (``run``, ``reproduce``) reproduce the paper's tables; these four shrink *your* model:

- ``compress MODEL --data DATA --reduction R --output DIR``: MODEL is a timm name (with a pretrained tag, or
  ``--no-pretrained``; ``--checkpoint FILE`` for your own weights, safetensors or a ``torch.save`` state dict read
  weights-only) or a model directory. DIR gets the
  weights and plan (:func:`lowrank_vit.io.surgery.save_compressed`), ``report.json``, ``ranks.png`` and a model card.
  The dense model's top-1 is reused from a cache when the same weights file was evaluated on the same data with the
  same preprocessing before (said on stderr; ``--no-cache``), or skipped with ``--no-dense-eval``.
- ``evaluate MODEL_OR_DIR --data DATA``: top-1/top-5 on the validation split (where the data has none, on every
  image: evaluate learns from none, so it holds none out as compress and finetune do), parameters, MiB, latency; for
  a model directory also its fidelity to the dense model it was compressed from (rebuilt from what compress
  recorded; :mod:`~lowrank_vit.cli.fidelity`), the only figure for a model that is not a classifier or data without
  labels.
- ``finetune DIR --data DATA --epochs N --output NEWDIR``: the partial fine-tune, resumable, into a new directory.
- ``export DIR --format onnx --output FILE [--fold] [--quantized qdq]``: an ONNX file with a dynamic batch axis
  (:mod:`lowrank_vit.io.export`).

Preprocessing is part of the model: mean, std, crop fraction, interpolation and input size come from the user's
flags, else from what the weights carry (a model directory's plan, a checkpoint's safetensors metadata or a timm
``config.json`` beside it), else from timm's pretrained config; they are saved in DIR so that the other commands
feed the model the same images, and every command prints them first (on stderr, so ``--json`` stays clean).

Nothing is written half-way: every output is built in a hidden sibling directory (or temporary file) and renamed
into place; an existing output is replaced only with ``--force`` and only if it is a model directory.

This module holds the compress, evaluate and export commands; their arguments are in
:mod:`~lowrank_vit.cli.args`, and the concerns they share live beside it:
:mod:`~lowrank_vit.cli.sources` (the model), :mod:`~lowrank_vit.cli.preprocessing`,
:mod:`~lowrank_vit.cli.data` (``--data``), :mod:`~lowrank_vit.cli.outputs` (what is written),
:mod:`~lowrank_vit.cli.densecache`, :mod:`~lowrank_vit.cli.finetune` (the fine-tune command) and
:mod:`~lowrank_vit.cli.base` (errors, ``--quiet``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.cli.args import (
    add_compress,
    add_evaluate,
    add_export,
    add_finetune,
    check_vmeanba,
    compression_config,
    parse_settings,
    summary_line,
    vmeanba_config,
)
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
from lowrank_vit.cli.densecache import cached_dense_accuracy
from lowrank_vit.cli.fidelity import fidelity_text
from lowrank_vit.cli.finetune import cmd_finetune
from lowrank_vit.cli.outputs import (
    check_apart,
    check_output_dir,
    check_parents,
    publish,
    report_layers,
    staging_dir,
    weights_size_mib,
    write_model_dir,
)
from lowrank_vit.cli.preprocessing import describe_preprocessing, resolve_model_preprocessing
from lowrank_vit.cli.sources import directory_source, load_source, load_teacher
from lowrank_vit.cli.speed import measured_latency, resolve_latency_table
from lowrank_vit.core.files import strict_json
from lowrank_vit.core.likelihood import AUTO, LIKELIHOODS, resolve_likelihood
from lowrank_vit.io.export import export_onnx, onnx_logits
from lowrank_vit.io.surgery import check_rebuildable
from lowrank_vit.nn.adapters import count_params
from lowrank_vit.pipeline import check_target
from lowrank_vit.repro.flow import compress_model
from lowrank_vit.speed import time_models


def add_user_commands(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Register the four commands on ``lowrank-vit``'s subparsers; returns their handlers by name."""
    for add in (add_compress, add_evaluate, add_finetune, add_export):  # the order --help lists them in
        add(sub)
    return {"compress": cmd_compress, "evaluate": cmd_evaluate, "finetune": cmd_finetune, "export": cmd_export}


@user_command
def cmd_compress(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    vmeanba = vmeanba_config(args)  # bad options fail before anything is loaded
    cfg = compression_config(args, device)
    out = Path(args.output).expanduser()
    check_output_dir(out, args.force)
    check_data_path(args.data)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    source, cfg = _compressible_source(args, cfg, vmeanba, device)
    pre, origin = resolve_model_preprocessing(source, args)
    say_to_user(args, describe_preprocessing(pre, origin))
    likelihood = _output_likelihood(source.model, cfg, pre)  # what the output is, refused now if it cannot be
    model = source.model.eval()
    dm = build_data(args, model, pre, calib_samples=args.calib_samples)
    top1 = measures_top1(model, dm)
    # no top-1 to measure: the compressed model's outputs are compared with the dense model's (a copy kept aside)
    dense = copy.deepcopy(model) if not top1 and not args.no_eval and not args.no_dense_eval else None
    if not top1 and not args.no_eval:
        say_to_user(args, f"{no_top1_reason(model, dm)}: the compressed model is evaluated by its fidelity to the "
                          f"dense model instead of top-1" + (" (not with --no-dense-eval)" if dense is None else ""))
    model.to(device)
    timings["load"] = time.perf_counter() - start
    params_before, mib_before = count_params(model), weights_size_mib(model)
    accuracy: dict[str, Any] = {}
    fidelity: dict[str, Any] = {}
    reused = None
    if top1 and not args.no_eval and not args.no_dense_eval:
        start = time.perf_counter()
        accuracy["before"], reused = cached_dense_accuracy(args, source, pre, model, dm, device)
        timings["evaluate_before"] = time.perf_counter() - start
    available = len(dm.calibration_indices)  # the images there are (already warned about): the steps read no more
    if cfg is not None and available < cfg.calib_samples:  # and the saved config says so
        cfg = dataclasses.replace(cfg, calib_samples=available)
    done = compress_model(model, dm.calibration_dataloader, cfg, vmeanba, device=device, progress=not args.quiet,
                          available=available,
                          keep_before_lowrank=cfg is not None and cfg.latency_table is not None and not args.no_timing)
    timings.update(done.seconds)
    report, vreport, latency = done.report, done.vmeanba, {}
    if done.before_lowrank is not None:
        latency = measured_latency(args, done.before_lowrank, model, report.to_dict())
        done.before_lowrank = None
    compression = report.to_dict() if report is not None else {}
    recorded = compression.get("config", {}).get("likelihood")
    if isinstance(recorded, str) and recorded != AUTO:
        likelihood = recorded  # the one the compression used (the same as decided above)
    if top1 and not args.no_eval:
        start = time.perf_counter()
        accuracy["after"] = evaluate_on_user_data(model, dm, device, args, "evaluate compressed")
        timings["evaluate_after"] = time.perf_counter() - start
    elif dense is not None:
        start = time.perf_counter()
        fidelity["after"] = fidelity_on_data(model, dense, dm, device, args, "fidelity to the dense model",
                                      likelihood or AUTO, cfg.output_key if cfg is not None else None)
        dense = None
        timings["evaluate_after"] = time.perf_counter() - start
    source_record = {**source.record, "description": source.description, "architecture": source.architecture}
    params_after = count_params(model)
    summary = {
        "name": out.name, "command": "compress", "source": source_record, "data": args.data,
        "recipe": args.recipe, "preprocessing": pre, "preprocessing_origin": origin,
        "params": {"before": params_before, "after": params_after},
        "size_mib": {"before": mib_before, "after": weights_size_mib(model)},
        "reduction": 1 - params_after / params_before,
        "calib_images": min(available, max(c.calib_samples for c in (cfg, vmeanba) if c is not None)),
        "accuracy": accuracy, "timings_s": timings, "device": str(device), "layers": report_layers(model, compression),
        "compression": compression, "latency": latency or compression.get("latency") or {},
    }
    output = None
    if likelihood is not None:
        output = {"likelihood": likelihood, "output_key": cfg.output_key}
        summary["output"] = output
    if fidelity:
        summary["fidelity"] = fidelity
    if reused is not None:
        summary["dense_accuracy_cache"] = str(reused)
    metadata = {"preprocessing": pre, "source": source_record, "recipe": args.recipe,
                "num_classes": dm.num_classes if dm.labelled else getattr(model, "num_classes", None)}
    if output is not None:
        metadata["output"] = output
    if cfg is not None:
        metadata["compression_config"] = cfg.to_dict()
    if vreport is not None:
        summary["vmeanba"] = vreport
        metadata["vmeanba_config"] = vreport["config"]
    stage = staging_dir(out, f"partial-{os.getpid()}")
    try:
        write_model_dir(stage, model, summary, metadata, source.rebuild)
        publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(_compress_line(out, summary))
    # the reduction as printed (-60.0%): a target of 0.6 that lands a few parameters short still counts
    if args.recipe == "loss-aware" and round(summary["reduction"], 3) >= REFIT_HINT_REDUCTION:
        say_to_user(args, f"shipping it without a fine-tune? --recipe loss-aware-anchored keeps more of the dense "
                          f"model at this reduction, for about three times the time, --recipe loss-aware-distill "
                          f"more still, for far more (a GPU's work; docs/loss_aware.md); to "
                          f"fine-tune it: lowrank-vit finetune {out} --data DATA --output NEWDIR")
    return 0


REFIT_HINT_REDUCTION = 0.5
"""From this reduction ``compress`` with the default recipe points to the refit (anchored to each block's output):
paired per image it is never significantly worse than the default without a fine-tune, better at -70% to -80% on the
models trained here, and on real pretrained weights from -50% on (a DINOv2-S classifier: 4.2 points at -50%;
docs/loss_aware.md, "A classifier with real pretrained weights")."""


def _output_likelihood(model: nn.Module, cfg: Any, pre: dict[str, Any]) -> str | None:
    """The likelihood the compression will use (``--likelihood``, "auto" decided), the part of the output it sees
    (``--output-key``) checked, on the model's output for two blank images: before any data is read, a likelihood
    that cannot fit the output (categorical for a backbone) or a key that names no tensor is one line. None without
    a low-rank step (``--recipe vmeanba``)."""

    if cfg is None:
        return None
    images = torch.zeros(2, *(int(v) for v in pre["input_size"]))
    try:
        resolved = resolve_likelihood(model, images, cfg.likelihood, cfg.output_key)
    except ValueError as err:
        flags = str(err).replace("likelihood='gaussian'", "--likelihood gaussian").replace(
            "output_key (a key, an attribute, an index or a callable; CLI --output-key)", "--output-key")
        raise UserError(flags) from None
    return str(resolved)


def _compressible_source(args: argparse.Namespace, cfg: Any, vmeanba: Any, device: torch.device) -> tuple[Any, Any]:
    """The model ``compress`` starts from, with everything that can refuse it checked before any data is read: the
    VMeanba options against its blocks, the latency table (profiled now if asked for), the target's reach, an
    already compressed model, and whether its compressed form could be saved and loaded. Returns it and the config
    with the latency table's path filled in."""

    source = load_source(args)
    if vmeanba is not None:
        check_vmeanba(source.model, vmeanba)
    if cfg is not None and cfg.latency_table is not None:
        cfg = dataclasses.replace(cfg, latency_table=resolve_latency_table(args, source.model, source.architecture,
                                                                           device.type))
    try:  # an unreachable target or an already compressed model, before the data and the dense evaluation
        if cfg is not None:
            check_target(source.model, cfg)
    except ValueError as err:
        raise UserError(str(err)) from None
    # before any calibration: a model that cannot be written and read back would cost the whole run. The arguments
    # that built it where they rebuild it (not where loading its weights changed it), else the adapter's reading
    if source.rebuild is not None:
        try:
            check_rebuildable(source.model, *source.rebuild)
        except ValueError:
            source = dataclasses.replace(source, rebuild=None)
    if source.rebuild is None:
        try:
            check_rebuildable(source.model)
        except ValueError as err:
            raise UserError(f"cannot compress {args.model}: its compressed form could not be saved and loaded "
                            f"again ({err})") from None
    return source, cfg


def _compress_line(out: Path, summary: dict[str, Any]) -> str:
    """The one line ``compress`` prints: sizes, the scans switched, top-1 before and after, the speedup."""

    params, accuracy, latency = summary["params"], summary["accuracy"], summary["latency"]
    line = (f"{out}: {params['before']:,} -> {params['after']:,} parameters "
            f"(-{100 * summary['reduction']:.1f}%), {summary['size_mib']['before']:.1f} -> "
            f"{summary['size_mib']['after']:.1f} MiB")
    if "vmeanba" in summary:
        line += summary_line(summary["vmeanba"])
    if "output" in summary:
        line += f", likelihood {summary['output']['likelihood']}"
    if "after" in summary.get("fidelity", {}):
        line += f", fidelity to the dense model: {fidelity_text(summary['fidelity']['after'])}"
    if "before" in accuracy:
        line += f", top-1 {accuracy['before']['top1']:.2f} -> {accuracy['after']['top1']:.2f}%"
    elif "after" in accuracy:
        line += f", top-1 {accuracy['after']['top1']:.2f}% compressed (dense not evaluated)"
    if latency:
        line += f", {latency['predicted_speedup']:.2f}x predicted"
        if "measured_speedup" in latency:
            line += f" / {latency['measured_speedup']:.2f}x measured"
        line += f" at batch {latency['batch']}"
    return line


# ---------------------------------------------------------------------------------------------------- evaluate


def latency(model: nn.Module, input_size: Any, batches: list[int], device: torch.device, repeats: int = 10,
            runtime: str = "torch", dtype: str = "float32", progress: bool = False) -> dict[str, dict[str, Any]]:
    """Per batch size: the model's forward time in its deploy form (low-rank Z folded, in ``dtype`` under
    ``runtime``), the median of ``repeats`` samples with its quartiles (:func:`lowrank_vit.speed.time_models`)."""

    out = {}
    for batch in batches:
        timing = time_models({"model": model}, batch=batch, input_size=tuple(input_size), device=device.type,
                             runtime=runtime, dtype=dtype, repeats=repeats, progress=progress)["model"]
        out[str(batch)] = timing.record()
    return out


@user_command
def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_data_path(args.data)
    source = load_source(args)
    pre, origin = resolve_model_preprocessing(source, args)
    say_to_user(args, describe_preprocessing(pre, origin))
    model = source.model.to(device).eval()
    # no calibration here: no subset drawn (or warned about); nothing learnt: no hold-out, every image where the data
    # has no validation split
    dm = build_data(args, model, pre, calib_samples=1, holdout=False)
    if dm.val_origin == "all":
        say_to_user(args, f"{args.data} has no validation split: every one of its {len(dm.val_dataset):,} images is "
                          f"evaluated (--val-split names one)")
    top1 = measures_top1(model, dm)
    metrics = evaluate_on_user_data(model, dm, device, args, "evaluate") if top1 else {}
    fidelity, dense_note = _evaluate_fidelity(args, source, model, dm, device)
    if not top1 and fidelity:
        say_to_user(args, f"{no_top1_reason(model, dm)}: fidelity to the dense model instead of top-1")
    try:
        timings = latency(model, pre["input_size"], args.latency_batches, device, args.repeats, args.runtime,
                          args.dtype, progress=not args.quiet)
    except ValueError as err:  # a runtime that is not installed, a precision it does not run
        raise UserError(str(err)) from None
    result: dict[str, Any] = {"model": source.description, "data": args.data, **metrics,
                              "params": count_params(model), "size_mib": weights_size_mib(model), "device": str(device),
                              "latency_ms": {batch: t["median"] for batch, t in timings.items()},
                              "latency": {"runtime": args.runtime, "dtype": args.dtype, "folded": True,
                                          "batches": timings},
                              "preprocessing": pre}
    if fidelity:
        result["fidelity"] = fidelity
        result.setdefault("images", fidelity["images"])
    if args.json:
        print(strict_json(result))
    else:
        if top1:
            print(f"{source.description} on {args.data}: top-1 {metrics['top1']:.2f}%{top5_text(metrics, ', ')} "
                  f"({metrics['images']:,} images)")
        if fidelity:
            what = "" if top1 else f"{source.description} on {args.data}: "
            shape = "x".join(map(str, fidelity["output_shape"])) or "scalar"
            print(f"{what}fidelity to the dense model ({fidelity['likelihood']} likelihood, outputs of {shape} per "
                  f"image, {fidelity['images']:,} images): {fidelity_text(fidelity)}")
        elif not top1:
            print(f"{source.description} on {args.data}: no top-1 ({no_top1_reason(model, dm)}) and no fidelity "
                  f"({dense_note})")
        print(f"parameters {result['params']:,}, {result['size_mib']:.2f} MiB")
        for batch, t in timings.items():
            print(f"latency batch {batch}: {t['median']:.2f} ms (IQR {t['q1']:.2f}-{t['q3']:.2f}, {t['repeats']} "
                  f"repeats) on {device}, {args.runtime} {args.dtype}, low-rank Z folded")
    return 0


def _evaluate_fidelity(args: argparse.Namespace, source: Any, model: nn.Module, dm: Any,
                       device: torch.device) -> tuple[dict[str, Any], str]:
    """The fidelity of a model directory to the dense model it was compressed from (rebuilt from what compress
    recorded), on the evaluation images; empty, with the reason, where there is none: not a compressed directory,
    ``--no-fidelity``, or a dense model that cannot be rebuilt (a note on stderr says why)."""

    if args.no_fidelity:
        return {}, "--no-fidelity"
    if not source.record.get("directory") or not source.metadata.get("source"):
        return {}, ("not a compressed model directory" if not source.record.get("directory") else
                    f"{source.description} does not record the model it was compressed from")
    recorded, key = recorded_output(source.metadata)
    if recorded not in LIKELIHOODS:  # a callable's label, or a likelihood registered by code not loaded here
        recorded = AUTO
    likelihood = args.likelihood or recorded
    output_key = args.output_key if args.output_key is not None else key
    namespace = argparse.Namespace(teacher_checkpoint=args.dense_checkpoint, quiet=args.quiet)
    try:
        dense = load_teacher(namespace, source, flag="the fidelity to the dense model",
                             otherwise="evaluate measures none", override="--dense-checkpoint")
    except UserError as err:  # no dense model to compare with: a note, not a failed evaluation
        note = str(err) if str(err).startswith("the fidelity") else f"the dense model could not be rebuilt: {err}"
        say_to_user(args, note)
        return {}, note
    try:
        return fidelity_on_data(model, dense, dm, device, args, "fidelity to the dense model", likelihood,
                                output_key), ""
    finally:
        del dense


# ------------------------------------------------------------------------------------------------------ export


@user_command
def cmd_export(args: argparse.Namespace) -> int:
    directory = Path(args.model).expanduser()
    if not directory.is_dir():
        raise UserError(f"no model directory {args.model!r}: export takes a directory written by compress")
    out = Path(args.output).expanduser()
    if out.is_dir():
        raise UserError(f"--output {str(out)!r} is a directory: give the .onnx file to write")
    check_parents(out)
    check_apart(out, directory)
    if out.exists() and not args.force:
        raise UserError(f"--output {str(out)!r} exists: give --force to replace it")
    if out.exists() and out.suffix.lower() != ".onnx":
        raise UserError(f"--output {str(out)!r} exists and is not an .onnx file: --force replaces only an ONNX "
                        f"file; give another name")
    args.model_kwargs, args.checkpoint = {}, None
    source = directory_source(args, directory)
    pre, origin = resolve_model_preprocessing(source, args)
    say_to_user(args, describe_preprocessing(pre, origin))
    input_size = tuple(int(v) for v in pre["input_size"])
    try:
        export_onnx(source.model, out, input_size, fold=args.fold, opset=args.opset, quantized=args.quantized,
                    metadata={"lowrank_vit.preprocessing": json.dumps(pre)})
    except RuntimeError as err:
        raise UserError(str(err)) from None
    line = f"{out}: {out.stat().st_size / 2**20:.2f} MiB, input images (N, {', '.join(map(str, input_size))})"
    if not args.no_check:
        images = torch.randn(3, *input_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = source.model.float().eval()(images)
        error = float((onnx_logits(out, images) - expected).norm() / expected.norm().clamp_min(1e-12))
        line += f", onnxruntime vs PyTorch relative error {error:.2e} at batch 3"
    print(line)
    return 0


__all__ = ["add_user_commands", "cmd_compress", "cmd_evaluate", "cmd_export", "compression_config", "latency",
           "parse_settings"]
