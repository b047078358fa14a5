"""``lowrank-vit compress / evaluate / finetune / export``: your own timm model and data, from the command line.

The registry commands (``run``, ``reproduce``) reproduce the paper's tables; these four shrink *your* model:

- ``compress MODEL --data DATA --reduction R --output DIR``: MODEL is a timm name (with a pretrained tag, or
  ``--no-pretrained``; ``--checkpoint FILE`` for your own weights, safetensors or a ``torch.save`` state dict read
  weights-only) or a model directory. DIR gets the
  weights and plan (:func:`lowrank_vit.io.surgery.save_compressed`), ``report.json``, ``ranks.png`` and a model card.
  The dense model's top-1 is reused from a cache when the same weights file was evaluated on the same data with the
  same preprocessing before (said on stderr; ``--no-cache``), or skipped with ``--no-dense-eval``.
- ``evaluate MODEL_OR_DIR --data DATA``: top-1/top-5 on the validation split, parameters, MiB, latency.
- ``finetune DIR --data DATA --epochs N --output NEWDIR``: the partial fine-tune, resumable, into a new directory.
- ``export DIR --format onnx --output FILE [--fold] [--quantized qdq]``: an ONNX file with a dynamic batch axis
  (:mod:`lowrank_vit.io.export`).

Preprocessing is part of the model: mean, std, crop fraction, interpolation and input size come from the user's
flags, else from what the weights carry (a model directory's plan, a checkpoint's safetensors metadata or a timm
``config.json`` beside it), else from timm's pretrained config; they are saved in DIR so that the other commands
feed the model the same images, and every command prints them first (on stderr, so ``--json`` stays clean).

Nothing is written half-way: every output is built in a hidden sibling directory (or temporary file) and renamed
into place; an existing output is replaced only with ``--force`` and only if it is a model directory.

This module holds the arguments and the compress, evaluate and export commands; the concerns they share live beside
it: :mod:`~lowrank_vit.harness.sources` (the model), :mod:`~lowrank_vit.harness.preprocessing`,
:mod:`~lowrank_vit.harness.userdata` (``--data``), :mod:`~lowrank_vit.harness.outputs` (what is written),
:mod:`~lowrank_vit.harness.densecache`, :mod:`~lowrank_vit.harness.finetunecli` (the fine-tune command) and
:mod:`~lowrank_vit.harness.userbase` (errors, ``--quiet``).
"""

from __future__ import annotations

import argparse
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

from lowrank_vit.core.files import strict_json
from lowrank_vit.harness.argtypes import fraction, positive_int
from lowrank_vit.harness.densecache import _dense_accuracy
from lowrank_vit.harness.finetunecli import cmd_finetune
from lowrank_vit.harness.outputs import (
    _check_apart,
    _check_parents,
    _layers,
    _size_mib,
    _staging,
    check_output_dir,
    publish,
    write_model_dir,
)
from lowrank_vit.harness.preprocessing import describe_preprocessing, resolve_model_preprocessing
from lowrank_vit.harness.sources import _directory_source, load_source
from lowrank_vit.harness.userbase import UserError, _say, resolve_device, user_command
from lowrank_vit.harness.userdata import _evaluate, _top5_text, build_data, check_data_path
from lowrank_vit.stages.finetune_config import PRECISIONS

LATENCY_BATCHES = (1, 32)


# ----------------------------------------------------------------------------------------------------- arguments


def _input_size(text: str) -> tuple[int | None, int, int]:
    """``--input-size``: ``H`` (square), ``HxW`` or ``C,H,W`` / ``CxHxW``."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H, HxW or C,H,W, got {text!r}") from None
    if not 1 <= len(values) <= 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H, HxW or C,H,W with positive sizes, got {text!r}")
    if len(values) == 1:
        return None, values[0], values[0]
    if len(values) == 2:
        return None, values[0], values[1]
    return values[0], values[1], values[2]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 32}}', got {text!r}")
    return value


def _add_model(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("model", metavar=what,
                   help="a timm model name (e.g. deit_small_patch16_224.fb_in1k) or a model directory")
    p.add_argument("--checkpoint", help="your own weights for a timm name, loaded strictly: a safetensors file or a "
                                        "torch.save state dict (.pth/.pt/.bin, read weights-only, never unpickled)")
    p.add_argument("--model-kwargs", type=_json_object, default={},
                   help="timm.create_model arguments as JSON, e.g. '{\"img_size\": 32, \"num_classes\": 10}'")
    p.add_argument("--no-pretrained", action="store_true", help="random weights instead of timm's pretrained ones")


def _add_preprocessing(p: argparse.ArgumentParser) -> None:
    from lowrank_vit.stages.data_config import INTERPOLATIONS

    g = p.add_argument_group("preprocessing (default: saved with the model, else timm's pretrained config; a "
                             "--checkpoint without it needs --mean/--std or --preprocessing timm)")
    g.add_argument("--mean", type=float, nargs="+", help="normalization mean, one value or one per channel")
    g.add_argument("--std", type=float, nargs="+", help="normalization std, one value or one per channel")
    g.add_argument("--crop-pct", type=float, help="evaluation center-crop fraction in (0, 1]; 1 = no crop")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize interpolation")
    g.add_argument("--input-size", type=_input_size, help="H, HxW or C,H,W; for a timm name it also builds the "
                                                          "model at that size")
    g.add_argument("--preprocessing", choices=("timm",),
                   help="timm: take timm's pretrained config of the architecture for what the flags do not give "
                        "(needed with a --checkpoint that carries no mean and std, so that they are never guessed)")


def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="an image folder (one subfolder per class, optionally under train/ and val/), parquet "
                        "file(s), or a Hugging Face dataset name")
    g.add_argument("--image-column", help="image column (default: image, img, pixel_values or the Image feature)")
    g.add_argument("--label-column", help="label column (default: label, labels, fine_label or the ClassLabel)")
    g.add_argument("--train-split", default="train", help="the training split (default train)")
    g.add_argument("--val-split", help="validation split (default: validation/val/test, else a 20%% hold-out)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: min(4, cores - 1); capped at the cores)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the first GPU if torch sees one, else the CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def add_user_commands(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Register the four commands on ``lowrank-vit``'s subparsers; returns their handlers by name."""
    for add in (_add_compress, _add_evaluate, _add_finetune, _add_export):  # the order --help lists them in
        add(sub)
    return {"compress": cmd_compress, "evaluate": cmd_evaluate, "finetune": cmd_finetune, "export": cmd_export}


def _add_compress(sub: Any) -> None:
    from lowrank_vit.config import RECIPES
    from lowrank_vit.core.loss_aware import COMPUTE_DTYPES
    from lowrank_vit.harness.speedcli import add_compress_latency_options
    from lowrank_vit.harness.vmeanbacli import RECIPE as VMEANBA
    from lowrank_vit.harness.vmeanbacli import add_vmeanba_options
    from lowrank_vit.methods.decompositions import METHODS

    p = sub.add_parser("compress", help="compress your timm model on your data into a model directory")
    _add_model(p, "MODEL")
    _add_data(p)
    budget = p.add_mutually_exclusive_group()  # one is required, but for --recipe vmeanba (compression_config)
    budget.add_argument("--reduction", type=fraction, help="fraction of the parameters removed, in (0, 1)")
    budget.add_argument("--target-params", type=positive_int, help="parameter count after compression")
    budget.add_argument("--target-speedup", type=float,
                        help="predicted end-to-end speedup (> 1) on the latency target (--latency-table, else the "
                             "model is profiled first); with --recipe vmeanba, VMeanba's")
    p.add_argument("--recipe", default="loss-aware", choices=[*RECIPES, *METHODS, VMEANBA],
                   help="a recipe (loss-aware: the default; loss-aware-refit: with the sequential refit, for a "
                        "model shipped without fine-tuning or -80%%; paper; vanilla; the peers flar-svd, svd-llm, "
                        "svd-llm-v2, kfac-lems; vmeanba for vision state-space models) or any registered "
                        "decomposition")
    p.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                   help="one of the recipe's own settings (docs/api.md lists every method's), e.g. --setting "
                        "grad_fraction=0.5 (loss-aware), --setting gamma=60 (paper); "
                        "VALUE is read as JSON where it parses (numbers, true, null), else as text; repeatable")
    p.add_argument("--calib-samples", type=positive_int, default=1024, help="calibration images (default 1024)")
    p.add_argument("--rank-multiple", type=positive_int, default=None,
                   help="round ranks to multiples (8: faster); default 1, or the table's rank step (8) with a latency "
                        "table")
    p.add_argument("--loss-pass-dtype", choices=COMPUTE_DTYPES, default=None,
                   help="loss-aware recipes: the precision of their forward and backward pass (bfloat16: statistics "
                        "1.7-2x as fast on CPUs with bfloat16 instructions, AMX or AVX512-BF16; see "
                        "docs/loss_aware_study.md, Cost)")
    p.add_argument("--no-eval", action="store_true", help="skip top-1 before and after on the validation split")
    p.add_argument("--no-dense-eval", action="store_true",
                   help="skip only the dense model's top-1 (the report then has no 'before' accuracy); the "
                        "compressed model is still evaluated")
    p.add_argument("--no-cache", action="store_true",
                   help="evaluate the dense model again rather than reuse its top-1 from the cache "
                        "($LOWRANK_VIT_CACHE/dense, else ~/.cache/lowrank_vit/dense; kept for weights read from a "
                        "file); the new figure replaces the cached one")
    p.add_argument("--output", required=True, help="the model directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing model directory")
    add_compress_latency_options(p)
    add_vmeanba_options(p)
    _add_preprocessing(p)
    _add_common(p)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5, parameters, MiB and latency of a model")
    _add_model(p, "MODEL_OR_DIR")
    _add_data(p)
    _add_preprocessing(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="only the first N validation images, in the split's order (a quick look; default: all)")
    p.add_argument("--latency-batches", type=positive_int, nargs="*", default=list(LATENCY_BATCHES),
                   help="batch sizes timed (default 1 32; none: no timing)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed samples per batch size (the median and quartiles are printed)")
    p.add_argument("--runtime", choices=("torch", "torch.compile", "onnxruntime"), default="torch",
                   help="time the model in eager PyTorch, compiled (torch.compile), or as its ONNX export in "
                        "onnxruntime (CPU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the precision timed (the accuracy is measured in float32)")
    _add_common(p)


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="partial fine-tune of a model directory into a new one (resumable)")
    p.add_argument("model", metavar="DIR", help="a model directory written by compress")
    _add_data(p)
    p.add_argument("--epochs", type=positive_int, required=True, help="epochs of fine-tuning")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the cosine schedule (default 1e-4)")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps (quick checks)")
    p.add_argument("--checkpoint-every", type=positive_int, default=100, metavar="N",
                   help="a checkpoint every N steps as well as at each epoch's end, for resuming after an "
                        "interruption (default 100)")
    p.add_argument("--precision", choices=PRECISIONS, default="32-true",
                   help="Lightning precision (default 32-true; bf16-mixed: bfloat16 autocast, weights stay float32, "
                        "1.5x per step for DeiT-B on an H100; 16-mixed: GPU only)")
    p.add_argument("--augment", action="store_true", help="timm's ImageNet training augmentation (default: none)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight in [0, 1] of distillation from the model before compression (rebuilt from what "
                        "compress recorded); 0 (default): cross-entropy on the labels alone, as the paper")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="temperature of the distillation term")
    p.add_argument("--train-factors", action="store_true",
                   help="also train the low-rank factors U, V (and Z): a full fine-tune, beyond the paper's ~2%%")
    p.add_argument("--teacher-checkpoint",
                   help="the dense weights (safetensors) if they moved since compress read them")
    p.add_argument("--devices", type=positive_int, default=1, help="processes; >1 runs DDP")
    p.add_argument("--output", required=True, help="the new model directory (never the input)")
    p.add_argument("--force", action="store_true", help="replace an existing model directory at --output")
    _add_common(p)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a model directory (ONNX, dynamic batch axis)")
    p.add_argument("model", metavar="DIR", help="a model directory")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="the file format (onnx, the only one yet)")
    p.add_argument("--fold", action="store_true", help="fold low-rank Z into the factors (faster inference)")
    p.add_argument("--quantized", choices=("dequantized", "qdq"), default="dequantized",
                   help="quantized weights as float values, or (qdq) as uint8 codes feeding DequantizeLinear")
    p.add_argument("--opset", type=positive_int, default=17, help="the ONNX opset version (default 17)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--no-check", action="store_true", help="skip running the file in onnxruntime against PyTorch")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


# ---------------------------------------------------------------------------------------------------- compress


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``--setting KEY=VALUE`` items as a dict: VALUE as JSON where it parses, else the text itself."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--setting takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


def compression_config(args: argparse.Namespace, device: torch.device) -> Any:
    """The CompressionConfig of ``--recipe``: a named recipe, or a decomposition inside its own recipe
    (``Method.home_recipe``: the loss-aware method's marginal ranks without Z) or else the paper's (greedy allocation
    on its own spectra, closed-form low-rank Z, as the comparison table runs them)."""
    from lowrank_vit.config import RECIPES, CompressionConfig
    from lowrank_vit.harness.vmeanbacli import RECIPE as VMEANBA
    from lowrank_vit.harness.vmeanbacli import low_rank_budget_given
    from lowrank_vit.methods.decompositions import get_method

    if getattr(args, "recipe", None) == VMEANBA:
        return None  # no low-rank step: vmeanba_config holds what there is to do
    if not low_rank_budget_given(args):
        raise UserError("one of --reduction, --target-params and --target-speedup is required (or --recipe vmeanba "
                        "with --vmeanba-blocks K or --target-speedup S)")
    if args.recipe in RECIPES:
        fields = dict(RECIPES[args.recipe])
    else:
        fields = {**RECIPES[get_method(args.recipe).home_recipe], "decomposition": args.recipe}
    if getattr(args, "loss_pass_dtype", None) is not None:
        fields["loss_pass_dtype"] = args.loss_pass_dtype
    if getattr(args, "setting", None):
        fields["settings"] = {**fields.get("settings", {}), **parse_settings(args.setting)}
    table = getattr(args, "latency_table", None)
    if table is None and getattr(args, "target_speedup", None) is not None:
        table = "auto"  # profiled by cmd_compress once the model is loaded (resolve_latency_table)
    latency = {} if table is None else {"latency_table": table, "latency_limit": not args.params_only,
                                        "target_speedup": args.target_speedup}
    multiple = args.rank_multiple or (8 if table is not None else 1)  # the profiled grid's step
    try:
        return CompressionConfig(reduction=args.reduction, target_params=args.target_params,
                                 calib_samples=args.calib_samples, rank_multiple=multiple,
                                 device=str(device), progress=not args.quiet, **latency, **fields)
    except ValueError as err:
        raise UserError(str(err)) from None


@user_command
def cmd_compress(args: argparse.Namespace) -> int:
    from lowrank_vit.harness.flow import compress_model
    from lowrank_vit.harness.speedcli import measured_latency
    from lowrank_vit.harness.vmeanbacli import vmeanba_config
    from lowrank_vit.nn.adapters import count_params

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
    _say(args, describe_preprocessing(pre, origin))
    model = source.model.to(device).eval()
    dm = build_data(args, model, pre, calib_samples=args.calib_samples)
    timings["load"] = time.perf_counter() - start
    params_before, mib_before = count_params(model), _size_mib(model)
    accuracy: dict[str, Any] = {}
    reused = None
    if not args.no_eval and not args.no_dense_eval:
        start = time.perf_counter()
        accuracy["before"], reused = _dense_accuracy(args, source, pre, model, dm, device)
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
    if not args.no_eval:
        start = time.perf_counter()
        accuracy["after"] = _evaluate(model, dm, device, args, "evaluate compressed")
        timings["evaluate_after"] = time.perf_counter() - start
    compression = report.to_dict() if report is not None else {}
    source_record = {**source.record, "description": source.description, "architecture": source.architecture}
    params_after = count_params(model)
    summary = {
        "name": out.name, "command": "compress", "source": source_record, "data": args.data,
        "recipe": args.recipe, "preprocessing": pre, "preprocessing_origin": origin,
        "params": {"before": params_before, "after": params_after},
        "size_mib": {"before": mib_before, "after": _size_mib(model)}, "reduction": 1 - params_after / params_before,
        "calib_images": min(available, max(c.calib_samples for c in (cfg, vmeanba) if c is not None)),
        "accuracy": accuracy, "timings_s": timings, "device": str(device), "layers": _layers(model, compression),
        "compression": compression, "latency": latency or compression.get("latency") or {},
    }
    if reused is not None:
        summary["dense_accuracy_cache"] = str(reused)
    metadata = {"preprocessing": pre, "source": source_record, "recipe": args.recipe, "num_classes": dm.num_classes}
    if cfg is not None:
        metadata["compression_config"] = cfg.to_dict()
    if vreport is not None:
        summary["vmeanba"] = vreport
        metadata["vmeanba_config"] = vreport["config"]
    stage = _staging(out, f"partial-{os.getpid()}")
    try:
        write_model_dir(stage, model, summary, metadata)
        publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(_compress_line(out, summary))
    return 0


def _compressible_source(args: argparse.Namespace, cfg: Any, vmeanba: Any, device: torch.device) -> tuple[Any, Any]:
    """The model ``compress`` starts from, with everything that can refuse it checked before any data is read: the
    VMeanba options against its blocks, the latency table (profiled now if asked for), the target's reach, an
    already compressed model, and whether its compressed form could be saved and loaded. Returns it and the config
    with the latency table's path filled in."""
    from lowrank_vit.harness.speedcli import resolve_latency_table
    from lowrank_vit.harness.vmeanbacli import check_vmeanba
    from lowrank_vit.io.surgery import check_rebuildable
    from lowrank_vit.pipeline import check_target

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
    try:  # before any calibration: a model that cannot be written and read back would cost the whole run
        check_rebuildable(source.model)
    except ValueError as err:
        raise UserError(f"cannot compress {args.model}: its compressed form could not be saved and loaded again "
                        f"({err})") from None
    return source, cfg


def _compress_line(out: Path, summary: dict[str, Any]) -> str:
    """The one line ``compress`` prints: sizes, the scans switched, top-1 before and after, the speedup."""
    from lowrank_vit.harness.vmeanbacli import summary_line

    params, accuracy, latency = summary["params"], summary["accuracy"], summary["latency"]
    line = (f"{out}: {params['before']:,} -> {params['after']:,} parameters "
            f"(-{100 * summary['reduction']:.1f}%), {summary['size_mib']['before']:.1f} -> "
            f"{summary['size_mib']['after']:.1f} MiB")
    if "vmeanba" in summary:
        line += summary_line(summary["vmeanba"])
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
    from lowrank_vit.speed import time_models

    out = {}
    for batch in batches:
        timing = time_models({"model": model}, batch=batch, input_size=tuple(input_size), device=device.type,
                             runtime=runtime, dtype=dtype, repeats=repeats, progress=progress)["model"]
        out[str(batch)] = {"median": timing.median, "q1": timing.low, "q3": timing.high, "repeats": timing.repeats}
    return out


@user_command
def cmd_evaluate(args: argparse.Namespace) -> int:
    from lowrank_vit.nn.adapters import count_params

    device = resolve_device(args.device)
    check_data_path(args.data)
    source = load_source(args)
    pre, origin = resolve_model_preprocessing(source, args)
    _say(args, describe_preprocessing(pre, origin))
    model = source.model.to(device).eval()
    dm = build_data(args, model, pre, calib_samples=1)  # no calibration here: do not draw (or warn about) a subset
    metrics = _evaluate(model, dm, device, args, "evaluate")
    try:
        timings = latency(model, pre["input_size"], args.latency_batches, device, args.repeats, args.runtime,
                          args.dtype, progress=not args.quiet)
    except ValueError as err:  # a runtime that is not installed, a precision it does not run
        raise UserError(str(err)) from None
    result: dict[str, Any] = {"model": source.description, "data": args.data, **metrics,
                              "params": count_params(model), "size_mib": _size_mib(model), "device": str(device),
                              "latency_ms": {batch: t["median"] for batch, t in timings.items()},
                              "latency": {"runtime": args.runtime, "dtype": args.dtype, "folded": True,
                                          "batches": timings},
                              "preprocessing": pre}
    if args.json:
        print(strict_json(result))
    else:
        print(f"{source.description} on {args.data}: top-1 {metrics['top1']:.2f}%{_top5_text(metrics, ', ')} "
              f"({metrics['images']:,} images)")
        print(f"parameters {result['params']:,}, {result['size_mib']:.2f} MiB")
        for batch, t in timings.items():
            print(f"latency batch {batch}: {t['median']:.2f} ms (IQR {t['q1']:.2f}-{t['q3']:.2f}, {t['repeats']} "
                  f"repeats) on {device}, {args.runtime} {args.dtype}, low-rank Z folded")
    return 0


# ------------------------------------------------------------------------------------------------------ export


@user_command
def cmd_export(args: argparse.Namespace) -> int:
    from lowrank_vit.io.export import export_onnx, onnx_logits

    directory = Path(args.model).expanduser()
    if not directory.is_dir():
        raise UserError(f"no model directory {args.model!r}: export takes a directory written by compress")
    out = Path(args.output).expanduser()
    if out.is_dir():
        raise UserError(f"--output {str(out)!r} is a directory: give the .onnx file to write")
    _check_parents(out)
    _check_apart(out, directory)
    if out.exists() and not args.force:
        raise UserError(f"--output {str(out)!r} exists: give --force to replace it")
    if out.exists() and out.suffix.lower() != ".onnx":
        raise UserError(f"--output {str(out)!r} exists and is not an .onnx file: --force replaces only an ONNX "
                        f"file; give another name")
    args.model_kwargs, args.checkpoint = {}, None
    source = _directory_source(args, directory)
    pre, origin = resolve_model_preprocessing(source, args)
    _say(args, describe_preprocessing(pre, origin))
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
