"""The arguments of ``lowrank-vit compress / evaluate / finetune / export / profile``: their parsers, the checked
argparse types (shared with the benchmark scripts), VMeanba's options and their checks, and the compression config
``compress`` builds from them. The commands themselves are in :mod:`lowrank_vit.cli.compress`,
:mod:`lowrank_vit.cli.finetune` and :mod:`lowrank_vit.cli.speed`.

``--recipe vmeanba``, and ``--vmeanba-blocks K`` beside a low-rank recipe, are checked before any data is read;
``cmd_compress`` runs VMeanba first, so that a low-rank recipe after it calibrates on the scans the model will run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

from lowrank_vit.cli.base import UserError
from lowrank_vit.config import RECIPES, CompressionConfig
from lowrank_vit.core.loss_aware import COMPUTE_DTYPES
from lowrank_vit.methods.decompositions import METHODS, get_method
from lowrank_vit.methods.vmeanba import VMeanbaConfig, check_blocks
from lowrank_vit.stages.data_config import INTERPOLATIONS
from lowrank_vit.stages.finetune_config import PRECISIONS


def _integer_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type, for the CLI and the benchmark scripts: an integer >= 1."""
    return _integer_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (0 turns a stage off)."""
    return _integer_at_least(text, 0, "an integer >= 0")


def fraction(text: str) -> float:
    """An argparse type, for the CLI and the benchmark scripts: a reduction, strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (0.5 removes half the parameters), "
                                         f"got {text}")
    return value


VMEANBA = "vmeanba"  # the recipe name of VMeanba alone (no low-rank step)


def add_vmeanba_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VMeanba (vision state-space models: the channel-mean scan in the blocks of least "
                             "impact)")
    g.add_argument("--vmeanba-blocks", type=positive_int, metavar="K",
                   help="switch K blocks: with --recipe vmeanba alone, or beside a low-rank recipe (VMeanba first)")


def low_rank_budget_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, key, None) is not None for key in ("reduction", "target_params", "target_speedup"))


def vmeanba_config(args: argparse.Namespace) -> Any:
    """The VMeanbaConfig the options ask for, or None; a UserError for a combination that cannot be meant."""

    blocks = getattr(args, "vmeanba_blocks", None)
    if args.recipe == VMEANBA:
        if args.reduction is not None or args.target_params is not None:
            raise UserError("--recipe vmeanba removes no parameters: give --vmeanba-blocks K or --target-speedup S "
                            "(or a low-rank --recipe with --reduction and --vmeanba-blocks K to combine them)")
        if (blocks is None) == (args.target_speedup is None):
            raise UserError("--recipe vmeanba needs exactly one of --vmeanba-blocks K and --target-speedup S")
        speedup = args.target_speedup
    elif blocks is None:
        return None
    else:
        speedup = None  # beside a low-rank recipe, --target-speedup is the low-rank allocation's
    try:
        return VMeanbaConfig(num_blocks=blocks, target_speedup=speedup, calib_samples=args.calib_samples,
                             latency_batch=args.latency_batch, timing=not args.no_timing, progress=not args.quiet)
    except ValueError as err:
        raise UserError(str(err)) from None


def check_vmeanba(model: nn.Module, cfg: Any) -> None:
    """A model without selective scans, or a K above its count: one line, before the data is read."""

    try:
        check_blocks(model, cfg)
    except ValueError as err:
        raise UserError(str(err)) from None


def summary_line(report: dict[str, Any]) -> str:
    text = f", VMeanba on {len(report['chosen'])} block(s) (KL {report['kl']:.4f})"
    if report.get("measured_speedup") is not None:
        text += (f", {report['predicted_speedup']:.2f}x predicted / {report['measured_speedup']:.2f}x measured "
                 f"(scans {report['scan_speedup']:.1f}x)")
    return text


LATENCY_BATCHES = (1, 32)
"""The batch sizes ``evaluate`` times by default."""
LIKELIHOOD_CHOICES = ("auto", "categorical", "gaussian", "gaussian-direction", "bernoulli", "bernoulli-probabilities")
"""``--likelihood``: what the model's output is (:mod:`lowrank_vit.core.likelihood`)."""


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


def _output_key(text: str) -> str | int:
    """``--output-key``: a key or attribute name of the model's output, or (an integer) a tuple index."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("expected a key, an attribute name or a tuple index, got an empty string")
    try:
        return int(text)
    except ValueError:
        return text


def _add_output(p: argparse.ArgumentParser, evaluate: bool = False) -> None:
    g = p.add_argument_group("the model's output (models that are not classifiers: backbones, embeddings, maps)")
    if evaluate:
        g.add_argument("--likelihood", choices=LIKELIHOOD_CHOICES,
                       help="what the output is, for the fidelity figures (default: what compress recorded, else "
                            "auto): bernoulli/bernoulli-probabilities add the IoU of the >0.5 masks and Pearson r "
                            "of sigmoid maps (given as logits or probabilities)")
        g.add_argument("--output-key", type=_output_key, metavar="KEY",
                       help="the part of a tuple, dict or model-output object compared (default: what compress "
                            "recorded); an integer is a tuple index")
        g.add_argument("--no-fidelity", action="store_true",
                       help="skip rebuilding the dense model a directory was compressed from and comparing outputs "
                            "with it")
        g.add_argument("--dense-checkpoint", metavar="FILE",
                       help="the dense weights (safetensors) if they moved since compress read them")
        return
    g.add_argument("--likelihood", choices=LIKELIHOOD_CHOICES, default="auto",
                   help="the output's likelihood the loss-aware pass weighs errors by: categorical (class logits), "
                        "gaussian (features, embeddings, maps: their squared error), gaussian-direction (an "
                        "embedding's direction), bernoulli (sigmoid maps as logits), bernoulli-probabilities (as "
                        "probabilities); auto (default): categorical for a classifier, else gaussian. Recorded in "
                        "DIR: evaluate and finetune --distill use it")
    g.add_argument("--output-key", type=_output_key, metavar="KEY",
                   help="which part of a tuple, dict or model-output object the loss sees (default: the tensor, a "
                        "dict's logits or its only tensor); an integer is a tuple index")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 32}}', got {text!r}")
    return value


def add_model(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("model", metavar=what,
                   help="a timm model name (e.g. deit_small_patch16_224.fb_in1k) or a model directory")
    p.add_argument("--checkpoint", help="your own weights for a timm name, loaded strictly: a safetensors file or a "
                                        "torch.save state dict (.pth/.pt/.bin, read weights-only, never unpickled)")
    p.add_argument("--model-kwargs", type=_json_object, default={},
                   help="timm.create_model arguments as JSON, e.g. '{\"img_size\": 32, \"num_classes\": 10}'")
    p.add_argument("--no-pretrained", action="store_true", help="random weights instead of timm's pretrained ones")


def _add_preprocessing(p: argparse.ArgumentParser) -> None:
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


def _add_data(p: argparse.ArgumentParser, required: bool = True, holdout: bool = True) -> None:
    """The data options; ``holdout``: without a validation split the command holds out 20% of the images (compress,
    finetune), or evaluates every image (evaluate: it learns from none)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="an image folder (one subfolder per class, optionally under train/ and val/; for a model "
                        "that is not a classifier, or without labels, images anywhere below it), parquet "
                        "file(s), or a Hugging Face dataset name")
    g.add_argument("--image-column", help="image column (default: image, img, pixel_values or the Image feature)")
    g.add_argument("--label-column", help="label column (default: label, labels, fine_label or the ClassLabel)")
    g.add_argument("--train-split", default="train", help="the training split (default train)")
    otherwise = "a 20%% hold-out" if holdout else "every image"
    g.add_argument("--val-split", help=f"validation split (default: validation/val/test, else {otherwise})")
    g.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: min(4, cores - 1); capped at the cores)")


RUNTIME_CHOICES = ("torch", "torch.compile", "onnxruntime")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_latency_target(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The options naming a latency target: device, runtime, precision."""
    dest = prefix.replace("-", "_")
    p.add_argument(f"--{prefix}runtime", dest=f"{dest}runtime", choices=RUNTIME_CHOICES, default="torch",
                   help="what runs the model: eager PyTorch, torch.compile (each form compiled once: slow to profile), "
                        "or its ONNX export in onnxruntime (CPU)")
    p.add_argument(f"--{prefix}dtype", dest=f"{dest}dtype", choices=DTYPE_CHOICES, default="float32",
                   help="the precision timed (bfloat16/float16: torch only)")


def add_compress_latency_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency (a layer is never made slower than dense on the profiled target)")
    g.add_argument("--latency-table", metavar="PATH|auto",
                   help="a table from `lowrank-vit profile`, or auto: profile the model now (cached); with a table "
                        "no layer gets a rank slower than dense there, and predicted and measured latency are reported")
    g.add_argument("--latency-device", choices=("cpu", "cuda"), help="auto's target (default: --device)")
    add_latency_target(g, "latency-")
    g.add_argument("--latency-batch", type=positive_int, default=1, help="auto's batch size (default 1)")
    g.add_argument("--params-only", action="store_true",
                   help="with a table: do not cap ranks where they are slower than dense (predict only)")
    g.add_argument("--no-timing", action="store_true", help="skip timing the dense and compressed models afterwards")


def add_input_size(p: Any, help_text: str) -> None:
    """``--input-size`` (H, HxW or C,H,W), as every command that builds or times a model reads it."""
    p.add_argument("--input-size", type=_input_size, help=help_text)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the first GPU if torch sees one, else the CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def add_compress(sub: Any) -> None:
    p = sub.add_parser("compress", help="compress your timm model on your data into a model directory")
    add_model(p, "MODEL")
    _add_data(p)
    budget = p.add_mutually_exclusive_group()  # one is required, but for --recipe vmeanba (compression_config)
    budget.add_argument("--reduction", type=fraction, help="fraction of the parameters removed, in (0, 1)")
    budget.add_argument("--target-params", type=positive_int, help="parameter count after compression")
    budget.add_argument("--target-speedup", type=float,
                        help="predicted end-to-end speedup (> 1) on the latency target (--latency-table, else the "
                             "model is profiled first); with --recipe vmeanba, VMeanba's")
    p.add_argument("--recipe", default="loss-aware", choices=[*RECIPES, *METHODS, VMEANBA],
                   help="a recipe (loss-aware: the default, for a model that is fine-tuned next; "
                        "loss-aware-refit: with the sequential refit, for a model shipped without fine-tuning "
                        "(paired per image, never significantly worse than the default there, +1 to +4 points of "
                        "top-1 at -80%%; about three times its compress time; docs/loss_aware.md); "
                        "loss-aware-anchored: the refit with each block's fc2 aimed at the dense block's output, the "
                        "one to use for a model shipped without fine-tuning (closer to the dense model than the "
                        "refit in every cell measured, never significantly worse, at about its time; on a real "
                        "pretrained DINOv2-S classifier 4 to 17 points of top-1 above the default at -50%% to -80%%); "
                        "loss-aware-block: block-wise reconstruction in the dense model's Fisher metric, closer "
                        "than the refit on real pretrained weights (by much less when both get a few hundred "
                        "calibration images), level with it on small classifiers, at 4-6 times the refit's time; "
                        "loss-aware-distill: the refit, then a distillation on augmented calibration images, the most "
                        "top-1 without fine-tuning (better than the refit in 7 of 12 cells at -70%% and -80%% with "
                        "256 calibration images, in 4 of 12 with 1,024 and in 8 of 12 with --distill-steps 1024, "
                        "worse in none), at many times the refit's time: for a GPU; paper; "
                        "vanilla; the peers flar-svd, svd-llm, svd-llm-update, svd-llm-v2, kfac-lems; vmeanba for "
                        "vision state-space models) or any registered decomposition")
    p.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                   help="one of the recipe's own settings (docs/api.md lists every method's), e.g. --setting "
                        "grad_fraction=0.5 (loss-aware), --setting gamma=60 (paper); "
                        "VALUE is read as JSON where it parses (numbers, true, null), else as text; repeatable")
    p.add_argument("--calib-samples", type=positive_int, default=1024, help="calibration images (default 1024)")
    p.add_argument("--distill-steps", type=non_negative_int, default=None,
                   help="steps of the end-to-end distillation on augmented calibration images after the compression "
                        "(default: the recipe's, 128 for loss-aware-distill, else 0: none). Longer keeps more: with "
                        "the default 1,024 images, 1,024 steps were better than the refit in 8 of 12 "
                        "cells of six small classifiers at -70%% and -80%% (128 steps: 4), worse in none, at about 23 "
                        "times the refit's time; 4,096 steps kept 0.7-1.4 points more than 1,024 at -80%% on four of "
                        "the six, at about 4 times their time: for a GPU (docs/loss_aware.md, \"A longer "
                        "distillation\")")
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
    _add_output(p)
    add_compress_latency_options(p)
    add_vmeanba_options(p)
    _add_preprocessing(p)
    _add_common(p)


def add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5 and the fidelity to the dense model, parameters, MiB and "
                                        "latency of a model")
    add_model(p, "MODEL_OR_DIR")
    _add_data(p, holdout=False)
    _add_preprocessing(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="only the first N evaluation images, in the split's order (a quick look; default: all)")
    p.add_argument("--latency-batches", type=positive_int, nargs="*", default=list(LATENCY_BATCHES),
                   help="batch sizes timed (default 1 32; none: no timing)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed samples per batch size (the median and quartiles are printed)")
    p.add_argument("--runtime", choices=("torch", "torch.compile", "onnxruntime"), default="torch",
                   help="time the model in eager PyTorch, compiled (torch.compile), or as its ONNX export in "
                        "onnxruntime (CPU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the precision timed (the accuracy is measured in float32)")
    _add_output(p, evaluate=True)
    _add_common(p)


def add_finetune(sub: Any) -> None:
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
                        "compress recorded); 0 (default): cross-entropy on the labels alone, as the paper; 1: the "
                        "dense model's outputs alone, under the likelihood compress recorded (the only choice for a "
                        "model that is not a classifier, or data without labels)")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="temperature of the distillation term")
    p.add_argument("--train-factors", action="store_true",
                   help="also train the low-rank factors U, V (and Z): a full fine-tune, beyond the paper's ~2%%")
    p.add_argument("--teacher-checkpoint",
                   help="the dense weights (safetensors) if they moved since compress read them")
    p.add_argument("--devices", type=positive_int, default=1, help="processes; >1 runs DDP")
    p.add_argument("--output", required=True, help="the new model directory (never the input)")
    p.add_argument("--force", action="store_true", help="replace an existing model directory at --output")
    _add_common(p)


def add_export(sub: Any) -> None:
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

    if getattr(args, "recipe", None) == VMEANBA:
        return None  # no low-rank step: vmeanba_config holds what there is to do
    if not low_rank_budget_given(args):
        raise UserError("one of --reduction, --target-params and --target-speedup is required (or --recipe vmeanba "
                        "with --vmeanba-blocks K or --target-speedup S)")
    if args.recipe in RECIPES:
        fields = dict(RECIPES[args.recipe])
    else:
        fields = {**RECIPES[get_method(args.recipe).home_recipe], "decomposition": args.recipe}
    if getattr(args, "distill_steps", None) is not None:
        fields["distill_steps"] = args.distill_steps
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
    output = {"likelihood": getattr(args, "likelihood", "auto"), "output_key": getattr(args, "output_key", None)}
    try:
        return CompressionConfig(reduction=args.reduction, target_params=args.target_params,
                                 calib_samples=args.calib_samples, rank_multiple=multiple,
                                 device=str(device), progress=not args.quiet, **latency, **output, **fields)
    except ValueError as err:
        raise UserError(str(err)) from None
