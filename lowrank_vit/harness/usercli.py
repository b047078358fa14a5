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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.common import fraction, positive_int, strict_json
from lowrank_vit.stages.finetune_config import PRECISIONS, check_precision_on

PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")
"""The preprocessing fields saved with a model and printed by every command."""
USER_PREPROCESSING = ("mean", "std", "crop_pct", "interpolation")
"""Those a user, a checkpoint or a directory may set (the input size is the model's own); data.PREPROCESSING_FIELDS."""
LATENCY_BATCHES = (1, 32)


class UserError(ValueError):
    """Bad input to one of these commands: the CLI prints it on one line and exits with status 2."""


def _last_line(err: BaseException) -> str:
    """The message of an error re-raised from a DataLoader worker is the worker's whole traceback: its last line is
    the error itself."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


_QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "datasets")


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """``--quiet``: nothing but the results. Warnings, Lightning's notices and the datasets library's messages and
    progress bars are silenced for the command, and restored after it."""
    if not enabled:
        yield
        return
    import logging

    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    bars = os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS")
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bars is None:
            os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = bars


def user_command(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """What every command here shares: ``--quiet`` (:func:`_quiet`), and a file in ``--data`` that is not an image,
    or a folder no dataset builder reads, reported as the user's data at fault, on one line naming it, instead of a
    traceback from a loader worker."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from PIL import UnidentifiedImageError

        try:
            with _quiet(getattr(args, "quiet", False)):
                return command(args)
        except UnidentifiedImageError as err:
            raise UserError(f"--data {getattr(args, 'data', None)!r}: {_last_line(err)}") from None
        except Exception as err:
            if type(err).__name__ != "DatasetGenerationError":  # datasets' own, raised while building the dataset
                raise
            cause = err.__cause__ or err.__context__
            raise UserError(f"--data {getattr(args, 'data', None)!r} could not be read as a dataset"
                            + (f": {_last_line(cause)}" if cause is not None else "")) from None
    return run


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


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
                   help="one of the recipe's own settings (docs/peers.md), e.g. --setting grad_shrinkage=0.3; "
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
    return {"compress": cmd_compress, "evaluate": cmd_evaluate, "finetune": cmd_finetune, "export": cmd_export}


# -------------------------------------------------------------------------------------------------- models


@dataclass
class Source:
    """A loaded model and what travels with it."""

    model: nn.Module
    architecture: str
    description: str
    """For people: ``timm deit_small_patch16_224 (pretrained)``, ``directory out/deit-50``..."""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """Preprocessing the weights carry (a directory's plan, a checkpoint's metadata); empty if none."""
    carried_from: str = ""
    """Where :attr:`preprocessing` came from."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """A model directory's plan metadata (empty for a timm name)."""
    record: dict[str, Any] = field(default_factory=dict)
    """JSON-safe identity of the source, stored in the report."""


def _suggest(name: str) -> str:
    from lowrank_vit.nn.adapters import timm_with_our_models

    timm = timm_with_our_models()

    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"


def _checkpoint_preprocessing(path: Path) -> dict[str, Any]:
    """Preprocessing a checkpoint carries: its safetensors metadata (keys ``mean``, ``std``, ``crop_pct``,
    ``interpolation``, ``input_size``, JSON-encoded) and, beside it, a timm ``config.json`` (its ``pretrained_cfg``,
    the hub's layout). The metadata wins."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, Any] = {}
    config = path.parent / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        cfg = data.get("pretrained_cfg", data) if isinstance(data, dict) else {}
        found.update({k: cfg[k] for k in (*USER_PREPROCESSING, "input_size") if isinstance(cfg, dict) and k in cfg})
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return found  # load_checkpoint_ names the problem
    for key in (*USER_PREPROCESSING, "input_size"):
        if key in meta:
            try:
                found[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                found[key] = meta[key]  # a bare string such as bicubic
    return found


def _timm_source(args: argparse.Namespace) -> Source:
    from lowrank_vit.nn.adapters import timm_with_our_models

    timm = timm_with_our_models()

    from lowrank_vit.harness.registry import ModelConfig
    from lowrank_vit.harness.runner import SetupError, build_model, checkpoint_digest

    name = args.model
    if not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        if any(ch in name for ch in "/\\") or name.startswith((".", "~")):
            raise UserError(f"no model directory {name!r} (and it is not a timm model name)")
        raise UserError(f"timm has no model {name!r}{_suggest(name)}")
    kwargs = dict(args.model_kwargs)
    carried: dict[str, Any] = {}
    checkpoint = None
    if args.checkpoint:
        checkpoint = Path(args.checkpoint).expanduser()
        if not checkpoint.is_file():
            what = "is a directory" if checkpoint.is_dir() else "does not exist"
            raise UserError(f"checkpoint {str(checkpoint)!r} {what}: give --checkpoint a safetensors or PyTorch file")
        carried = _checkpoint_preprocessing(checkpoint)
        from lowrank_vit.io.convert import ConversionError, checkpoint_kwargs

        try:  # a torchvision or transformers ViT: the constructor arguments its shapes fix, under the user's
            kwargs = checkpoint_kwargs(checkpoint, kwargs)[0]
        except ConversionError as err:
            raise UserError(f"checkpoint {str(checkpoint)!r}: {err}") from None
    size = getattr(args, "input_size", None) or (_input_size_of(carried.get("input_size")))
    if size is not None:
        channels, height, width = size
        kwargs.setdefault("img_size", height if height == width else [height, width])
        if channels is not None:
            kwargs.setdefault("in_chans", channels)
    pretrained = not args.no_pretrained and checkpoint is None
    if pretrained:
        _check_offline_weights(name, kwargs)
    cfg = ModelConfig("timm", name, pretrained=pretrained, kwargs=kwargs,
                      checkpoint=None if checkpoint is None else str(checkpoint))
    try:
        model = build_model(cfg, progress=not args.quiet)
    except SetupError as err:  # the weights: not downloadable, or a checkpoint that does not fit
        message = str(err).replace("or use --scale smoke", "or give --no-pretrained or --checkpoint FILE")
        raise UserError(message.replace("model.checkpoint=", "--checkpoint").replace(
            "with these model.kwargs", "with these --model-kwargs")) from None
    except (TypeError, RuntimeError) as err:  # bad kwargs, a pretrained tag timm does not have
        raise UserError(f"cannot build timm model {name!r} with {kwargs}: {err}") from None
    weights = "your checkpoint" if checkpoint else ("pretrained" if pretrained else "random weights")
    record = {"timm_name": name, "model_kwargs": kwargs, "pretrained": pretrained,
              "checkpoint": None if checkpoint is None else str(checkpoint),
              "checkpoint_sha256": None if checkpoint is None else checkpoint_digest(checkpoint)}
    return Source(model, name.split(".")[0], f"timm {name}, {weights}",
                  {k: carried[k] for k in USER_PREPROCESSING if k in carried},
                  f"checkpoint {checkpoint}" if carried else "", {}, record)


def _hub_weights(name: str, kwargs: dict[str, Any]) -> tuple[str, tuple[str, ...], str | None] | None:
    """Where timm reads the pretrained weights of ``name`` (its tag, else the architecture's default one) from the
    Hugging Face hub: (repository, the files it tries in order, revision). None where they come from elsewhere (a URL,
    a file, a ``pretrained_cfg`` in --model-kwargs) or timm does not say. timm's own resolution is asked rather than
    copied, so that the answer is what create_model will do."""
    if any(key.startswith("pretrained_cfg") for key in kwargs):
        return None
    try:
        from timm.models import get_pretrained_cfg
        from timm.models._builder import _resolve_pretrained_source
        from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split
    except ImportError:  # another timm layout: no early check; create_model's own error still comes
        return None
    try:  # timm's private helpers: any change of theirs only skips this early check
        cfg = get_pretrained_cfg(name)
        source, location = _resolve_pretrained_source(cfg.to_dict()) if cfg is not None else (None, None)
    except Exception:  # a tag timm does not have (create_model names it), or another signature
        return None
    if source != "hf-hub":
        return None
    hub_id, filename = location if isinstance(location, (tuple, list)) else (location, HF_WEIGHTS_NAME)
    repo_id, revision = hf_split(hub_id)
    files = (filename,) if filename.endswith(".safetensors") else (*_get_safe_alternatives(filename), filename)
    return repo_id, tuple(files), revision


def _check_offline_weights(name: str, kwargs: dict[str, Any]) -> None:
    """With ``HF_HUB_OFFLINE`` set, pretrained weights that the local Hugging Face cache does not hold are refused at
    once, naming the model: timm would build the model first and then fail on huggingface_hub's long message."""
    from lowrank_vit.io.hub import cached_file, offline

    if not offline():
        return
    where = _hub_weights(name, kwargs)
    if where is None:
        return
    repo_id, files, revision = where
    if cached_file(repo_id, files, revision, kwargs.get("cache_dir")) is None:
        raise UserError(f"{name}: HF_HUB_OFFLINE is set (offline) and timm's pretrained weights for it ({repo_id}) "
                        f"are not in the local Hugging Face cache: give your own weights with --checkpoint FILE (or "
                        f"--no-pretrained for random ones), or unset HF_HUB_OFFLINE to download them once")


def _input_size_of(value: Any) -> tuple[int | None, int, int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1]), int(value[2])
    return None


def _directory_source(args: argparse.Namespace, directory: Path) -> Source:
    from lowrank_vit.io.surgery import load_compressed, read_plan

    if getattr(args, "checkpoint", None):
        raise UserError("--checkpoint goes with a timm model name, not with a model directory")
    if getattr(args, "model_kwargs", None):
        raise UserError("--model-kwargs goes with a timm model name; a model directory knows its architecture")
    plan = read_plan(directory)
    model = load_compressed(directory)
    metadata = plan.get("metadata") or {}
    saved = metadata.get("preprocessing") or {}
    return Source(model, plan["architecture"], f"directory {directory}",
                  {k: saved[k] for k in PREPROCESSING_KEYS if k in saved}, f"directory {directory}", metadata,
                  {"directory": str(directory), "architecture": plan["architecture"],
                   "from": metadata.get("source")})


def load_teacher(args: argparse.Namespace, source: Source) -> nn.Module:
    """The model a model directory was compressed from, rebuilt from the source ``compress`` recorded in it (timm
    name, arguments, pretrained tag or checkpoint), for distillation. A recorded checkpoint must still be the file
    that was compressed (same SHA-256) unless ``--teacher-checkpoint`` names the file to use."""
    from lowrank_vit.harness.runner import checkpoint_digest

    record = source.metadata.get("source")
    if not isinstance(record, dict) or not record.get("timm_name"):
        raise UserError(f"--distill needs the model before compression, and {source.description} does not record "
                        "it (lowrank-vit compress records it); fine-tune without --distill")
    checkpoint = args.teacher_checkpoint or record.get("checkpoint")
    if checkpoint is None and not record.get("pretrained"):
        raise UserError(f"--distill: {source.description} was compressed from random weights, which cannot be "
                        "rebuilt; fine-tune without --distill")
    if checkpoint is not None and args.teacher_checkpoint is None:
        path = Path(checkpoint).expanduser()
        if not path.is_file() or checkpoint_digest(path) != record.get("checkpoint_sha256"):
            state = "changed" if path.is_file() else "is gone"
            raise UserError(f"--distill: the dense weights compress read, {checkpoint!r}, {state} since; give "
                            "--teacher-checkpoint FILE")
    spec = argparse.Namespace(model=record["timm_name"], model_kwargs=dict(record.get("model_kwargs") or {}),
                              checkpoint=checkpoint, no_pretrained=checkpoint is None and not record["pretrained"],
                              quiet=args.quiet)
    teacher = _timm_source(spec).model
    classes = getattr(source.model, "num_classes", None)
    if getattr(teacher, "num_classes", None) != classes:
        raise UserError(f"--distill: the rebuilt dense model has {getattr(teacher, 'num_classes', None)} classes, "
                        f"the compressed one {classes}")
    return teacher.eval()


def load_source(args: argparse.Namespace) -> Source:
    """The model MODEL names: a directory written by ``save_compressed``/``compress`` (local, or a hub repository
    ``hf-hub:owner/name`` holding one), or a timm name (``hf-hub:`` names of timm's own repositories too)."""
    from lowrank_vit.io.hub import download, is_hub_reference
    from lowrank_vit.io.surgery import PLAN_FILE

    if is_hub_reference(args.model):
        unreachable = None
        try:
            snapshot = download(args.model)
        except FileNotFoundError as err:
            snapshot, unreachable = None, err  # not reachable as a model directory: timm may still know it
        if snapshot is not None and (snapshot / PLAN_FILE).is_file():
            return _directory_source(args, snapshot)
        try:
            return _timm_source(args)
        except Exception as err:  # timm could not build it either: the hub's reason is the one to read
            if unreachable is None or not isinstance(err, (ValueError, FileNotFoundError, RuntimeError)):
                raise
            raise UserError(f"{unreachable} (timm could not build it either: {_last_line(err)})") from None
    path = Path(args.model).expanduser()
    if path.is_dir():
        return _directory_source(args, path)
    if path.exists():
        raise UserError(f"{args.model!r} is a file: give a model directory, or a timm name with --checkpoint FILE")
    return _timm_source(args)


# ---------------------------------------------------------------------------------------------- preprocessing


def user_preprocessing(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing fields given on the command line."""
    given = {key: getattr(args, key, None) for key in USER_PREPROCESSING}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if v is not None}


def resolve_model_preprocessing(source: Source, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The preprocessing in use (the user's flags, else what the weights carry, else timm's pretrained config, at the
    model's own input size) and where each field came from.

    Raises:
        UserError: ``--input-size`` differs from what the model takes, or a field is invalid.
    """
    from lowrank_vit.stages.data import check_preprocessing, resolve_preprocessing

    try:  # the data config's own rules, for the flags and for what a checkpoint or directory carries
        user = check_preprocessing(user_preprocessing(args))
        carried = check_preprocessing({k: v for k, v in source.preprocessing.items() if k in USER_PREPROCESSING})
    except ValueError as err:
        raise UserError(f"preprocessing: {err}") from None
    unknown = [key for key in ("mean", "std") if key not in user and key not in carried]
    checkpoint = source.record.get("checkpoint")
    if checkpoint and unknown and getattr(args, "preprocessing", None) != "timm":
        # timm's values are those of timm's weights for the name, not of the user's: a wrong mean and std give a
        # model that runs but loses much of its accuracy, and compress would calibrate on such images and save them
        raise UserError(f"--checkpoint {checkpoint} carries no {' or '.join(unknown)}: give the values the model "
                        f"was trained with (--mean R G B --std R G B; --crop-pct and --interpolation where they "
                        f"differ from timm's), or --preprocessing timm to take timm's for {source.architecture}")
    pre = resolve_preprocessing(source.model, overrides={**carried, **user})
    size = getattr(args, "input_size", None)
    if size is not None:
        channels, height, width = size
        wanted = (channels or pre["input_size"][0], height, width)
        if tuple(pre["input_size"]) != wanted:
            why = ("a model directory keeps its size (build a timm name at another size with --input-size)"
                   if source.description.startswith("directory") else
                   "--model-kwargs or the checkpoint fix another size: make them agree")
            raise UserError(f"the model takes {_shape(pre['input_size'])} images, --input-size asks for "
                            f"{_shape(wanted)}: {why}")
    origin = {}
    for key in PREPROCESSING_KEYS:
        if key == "input_size":
            origin[key] = "model"
        elif key in user:
            origin[key] = "flag"
        elif key in carried:
            origin[key] = source.carried_from
        else:
            origin[key] = "timm config"
    return {k: _plain(pre[k]) for k in PREPROCESSING_KEYS if k in pre}, origin


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shape(size: Any) -> str:
    return "x".join(str(int(v)) for v in size)


def describe_preprocessing(pre: dict[str, Any], origin: dict[str, str]) -> str:
    """One line: every field and where it came from."""
    def numbers(values: Any) -> str:
        return ",".join(f"{v:.4g}" for v in values)

    parts = [f"input {_shape(pre['input_size'])} ({origin['input_size']})",
             f"mean {numbers(pre['mean'])} ({origin['mean']})", f"std {numbers(pre['std'])} ({origin['std']})"]
    for key in ("crop_pct", "interpolation"):
        if key in pre:
            parts.append(f"{key} {pre[key]} ({origin[key]})")
    return "preprocessing: " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------------- data


def default_workers() -> int:
    """DataLoader workers that fit the machine: up to 4, leaving one core to the main process."""
    return max(0, min(4, _cores() - 1))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _only_a_path(data: str) -> bool:
    """Whether ``--data`` can be nothing but a local path: it starts like one (``/``, ``.``, ``~``) or holds what no
    dataset name does: a backslash, a second ``/`` or an empty part. A Hugging Face name is ``owner/name`` or a bare
    ``name`` (the embedded ``mnist-5k`` too), which ``datasets`` may still find in its cache or on the hub."""
    parts = data.split("/")
    return data.startswith(("/", ".", "~")) or "\\" in data or len(parts) > 2 or not all(parts)


def check_data_path(data: str) -> None:
    """Refuse a ``--data`` that can only be a local path and is not there: called before any model is built (a
    typo must not cost a download or a checkpoint read) and again where the data config is made."""
    if _only_a_path(data) and not Path(data).expanduser().exists():
        raise UserError(f"no data at {data!r}: give --data an image folder, parquet file(s) or a Hugging Face dataset "
                        f"name")


def _data_config(args: argparse.Namespace, pre: dict[str, Any], *, augment: bool = False,
                 calib_samples: int = 1024) -> Any:
    from lowrank_vit.stages.data_config import DataConfig

    workers = default_workers() if args.workers is None else args.workers
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    workers = min(workers, _cores())
    check_data_path(args.data)
    path = Path(args.data).expanduser()
    location: dict[str, Any] = {"path": str(path)} if path.exists() else {"name": args.data}
    channels, height, width = pre["input_size"]
    if height != width:
        raise UserError(f"the data loaders take square images; the model takes {height}x{width}")
    return DataConfig(**location, image_column=args.image_column, label_column=args.label_column,
                      train_split=args.train_split, val_split=args.val_split, batch_size=args.batch_size,
                      num_workers=workers, calib_samples=calib_samples, img_size=height, in_chans=channels,
                      augment=augment, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                      crop_pct=pre.get("crop_pct"), interpolation=pre.get("interpolation"))


_DATA_FLAGS = {"path": "--data", "label_column": "--label-column", "image_column": "--image-column",
               "val_split": "--val-split", "train_split": "--train-split"}
"""DataConfig's fields, as the errors of the data module name them, and the flags that set them here."""


def build_data(args: argparse.Namespace, model: nn.Module, pre: dict[str, Any], **kwargs: Any) -> Any:
    """The data module, loaded, with its class count checked against the model's head."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataFormatError, DataNotFoundError

    try:
        cfg = _data_config(args, pre, **kwargs)
        dm = build_datamodule(cfg, model)
        dm.setup()
    except (DataFormatError, DataNotFoundError, ValueError) as err:  # the library's words for its fields: ours here
        raise UserError(re.sub(r"(?<![\w.(])(path|label_column|image_column|val_split|train_split)=",
                               lambda m: _DATA_FLAGS[m.group(1)], str(err))) from None
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and classes != dm.num_classes:
        if Path(str(args.model)).expanduser().is_dir():  # a model directory's head is what it is
            raise UserError(f"the model in {args.model!r} has {classes} classes, {args.data!r} has "
                            f"{dm.num_classes}: give data with the classes it was compressed for")
        raise UserError(f"the model has {classes} classes, {args.data!r} has {dm.num_classes}: give weights trained "
                        f"on this data (--checkpoint) or a model built for it (--model-kwargs "
                        f"'{{\"num_classes\": {dm.num_classes}}}')")
    return dm


def resolve_device(name: str) -> torch.device:
    """``auto``: the first GPU if torch sees one, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", 0)


# ------------------------------------------------------------------------------------------------- outputs


def _size_mib(model: nn.Module) -> float:
    """The MiB the saved weights take: every tensor as stored (float32; quantized parameters as their codes, scales
    and zero points; a sparse Z's index lists), so the figure is the file's, whatever the Z kind or bit width."""
    from lowrank_vit.io.surgery import stored_bytes

    return stored_bytes(model) / 2**20


def model_dir_files() -> tuple[str, ...]:
    """What :func:`write_model_dir` puts in a model directory: all that ``--force`` may replace."""
    from lowrank_vit.io.modelcard import CARD_FILE, RANKS_FIGURE, REPORT_FILE
    from lowrank_vit.io.surgery import PLAN_FILE, WEIGHTS_FILE

    return WEIGHTS_FILE, PLAN_FILE, REPORT_FILE, CARD_FILE, RANKS_FIGURE


def _check_parents(out: Path) -> None:
    """An output below a regular file can never be written: say so before any work (not as an OSError after it)."""
    for parent in out.expanduser().absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--output {str(out)!r} cannot be written: {str(parent)!r} is a file")
            return


def _check_apart(out: Path, protect: Path) -> None:
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
    from lowrank_vit.io.surgery import PLAN_FILE

    _check_parents(out)
    if protect is not None:
        _check_apart(out, protect)
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
    from lowrank_vit.io.surgery import read_plan

    try:
        plan = read_plan(directory)
    except (OSError, ValueError):
        return "unreadable"
    source = (plan.get("metadata") or {}).get("source")
    described = source.get("description") if isinstance(source, dict) else None
    return f"{plan['architecture']}" + (f" from {described}" if described else "")


def _staging(out: Path, suffix: str) -> Path:
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


def _write_json(path: Path, data: Any) -> None:
    path.write_text(strict_json(data, indent=2) + "\n")


def write_model_dir(stage: Path, model: nn.Module, report: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Weights and plan, report.json, the ranks figure and the model card, into ``stage``."""
    from lowrank_vit.io.modelcard import CARD_FILE, RANKS_FIGURE, REPORT_FILE, plot_ranks, render_card
    from lowrank_vit.io.surgery import save_compressed

    save_compressed(model.cpu(), stage, metadata=json.loads(strict_json(metadata)))
    _write_json(stage / REPORT_FILE, report)
    plot_ranks(report, stage / RANKS_FIGURE)
    (stage / CARD_FILE).write_text(render_card(report, report.get("name") or stage.name))


def _layers(model: nn.Module, compression: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per-layer rows of the report: the compression's own where there is one."""
    if compression and compression.get("layers"):
        keys = ("name", "in_features", "out_features", "rank", "dense_params", "factored_params", "output_error")
        return [{k: layer.get(k) for k in keys} for layer in compression["layers"]]
    from lowrank_vit.nn.factorized import FactorizedLinear

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLinear):
            rows.append({"name": name, "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                         "dense_params": m.in_features * m.out_features,
                         "factored_params": sum(p.numel() for n, p in m.named_parameters() if n != "bias")})
    return rows


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


def _top5_text(metrics: dict[str, Any], before: str = "", after: str = "") -> str:
    """``top-5 97.10%`` between ``before`` and ``after``, or nothing where 5 classes or fewer make it 100% always."""
    from lowrank_vit.io.modelcard import top5_informative

    return f"{before}top-5 {metrics['top5']:.2f}%{after}" if top5_informative(metrics) else ""


def _evaluate(model: nn.Module, dm: Any, device: torch.device, args: argparse.Namespace, desc: str) -> dict[str, Any]:
    from lowrank_vit.harness.runner import evaluate

    loader = dm.val_dataloader(limit=getattr(args, "limit", None))
    return evaluate(model, loader, device, progress=not args.quiet, desc=desc)


DENSE_CACHE = "dense"
"""The folder, beside the latency tables' (:func:`lowrank_vit.speed.profile.cache_dir`), of the dense models' top-1
that ``compress`` reuses."""


def _dense_cache_dir() -> Path:
    from lowrank_vit.speed.profile import cache_dir

    return cache_dir().parent / DENSE_CACHE  # the latency tables' root: one variable moves every cache


def _weights_sha256(source: Source) -> str | None:
    """The content digest of the file the weights were read from (a --checkpoint, a model directory's weights), or
    None where no file holds them: random weights, or timm's pretrained ones, whose classifier timm draws anew when
    --model-kwargs change the class count. Only the former's accuracy is cached."""
    from lowrank_vit.harness.runner import checkpoint_digest
    from lowrank_vit.io.surgery import WEIGHTS_FILE

    if source.record.get("checkpoint_sha256"):
        return str(source.record["checkpoint_sha256"])
    directory = source.record.get("directory")
    weights = Path(directory) / WEIGHTS_FILE if directory else None
    return checkpoint_digest(weights) if weights is not None and weights.is_file() else None


def _data_stamp(path: Path) -> list[list[Any]]:
    """What changes when local data changes, read cheaply: the size and modification time of the path, of what it
    holds, and of the folders one level further down (a folder's time changes when a file in it is added, renamed
    or removed). An image rewritten in place two folders down is not seen: --no-cache."""
    def row(name: str, entry: os.DirEntry | Path) -> list[Any]:
        stat = entry.stat()
        return [name, stat.st_size, stat.st_mtime_ns]

    rows = [row(".", path)]
    if not path.is_dir():
        return rows
    with os.scandir(path) as children:
        for child in sorted(children, key=lambda e: e.name):
            rows.append(row(child.name, child))
            if child.is_dir():
                with os.scandir(child.path) as grandchildren:  # names only: files are not stat'ed one by one
                    rows += [row(f"{child.name}/{g.name}", g)
                             for g in sorted(grandchildren, key=lambda e: e.name) if g.is_dir()]
    return rows


def _dense_cache_entry(args: argparse.Namespace, source: Source, pre: dict[str, Any],
                       device: torch.device) -> tuple[Path, dict[str, Any]] | None:
    """The cache file of the dense model's accuracy and the key stored in it: all the figure depends on (the
    weights' content, the model's name and arguments, the data and its splits, the preprocessing, --limit, the
    device type, the library versions); None where it is not cached (:func:`_weights_sha256`)."""
    import timm

    from lowrank_vit import __version__

    digest = _weights_sha256(source)
    if digest is None:
        return None
    data = Path(str(args.data)).expanduser()
    try:
        where = {"path": str(data.resolve()), "stamp": _data_stamp(data)} if data.exists() else {"name": str(args.data)}
    except OSError:  # a folder it may not list, a dangling link: evaluated, never a failed command
        return None
    key = {"weights_sha256": digest, "architecture": source.architecture,
           "model": {k: source.record.get(k) for k in ("timm_name", "model_kwargs")}, "data": where,
           "splits": {k: getattr(args, k, None) for k in ("train_split", "val_split", "image_column",
                                                           "label_column")},
           "preprocessing": pre, "limit": getattr(args, "limit", None), "device": device.type,
           "versions": {"torch": torch.__version__, "timm": timm.__version__, "lowrank_vit": __version__}}
    text = json.dumps(key, sort_keys=True, default=str)
    name = re.sub(r"[^\w.-]", "_", source.architecture)
    path = _dense_cache_dir() / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    return path, json.loads(text)  # as read back from the file: tuples are lists there


def _read_cached_accuracy(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not there yet, or damaged: evaluated again
    metrics = data.get("accuracy") if isinstance(data, dict) and data.get("key") == key else None
    if isinstance(metrics, dict) and all(isinstance(metrics.get(k), (int, float)) for k in ("top1", "top5", "images")):
        return metrics
    return None


def _write_cached_accuracy(args: argparse.Namespace, path: Path, key: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Written atomically (two runs never read half a file); a cache that cannot be written is skipped, never a
    failed command."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(strict_json({"key": key, "accuracy": metrics}, indent=2) + "\n")
        os.replace(tmp, path)
    except (OSError, ValueError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _say(args, f"the dense model's top-1 was not cached ({type(err).__name__}: {err})")


def _dense_accuracy(args: argparse.Namespace, source: Source, pre: dict[str, Any], model: nn.Module, dm: Any,
                    device: torch.device) -> tuple[dict[str, Any], Path | None]:
    """The dense model's accuracy: from the cache where this very evaluation was done before (said on stderr, naming
    the file), else evaluated now and cached. Returns it and the cache file it was read from (None: evaluated)."""
    entry = _dense_cache_entry(args, source, pre, device)
    if entry is not None and not args.no_cache:
        cached = _read_cached_accuracy(*entry)
        if cached is not None:
            _say(args, f"dense model: top-1 {cached['top1']:.2f}% reused from the cache ({entry[0]}); --no-cache "
                       f"evaluates it again")
            return cached, entry[0]
    metrics = _evaluate(model, dm, device, args, "evaluate dense")
    if entry is not None:
        _write_cached_accuracy(args, *entry, metrics)
    return metrics, None


@user_command
def cmd_compress(args: argparse.Namespace) -> int:
    from lowrank_vit.harness.speedcli import measured_latency, resolve_latency_table
    from lowrank_vit.harness.vmeanbacli import check_vmeanba, summary_line, vmeanba_config
    from lowrank_vit.io.surgery import check_rebuildable
    from lowrank_vit.methods.vmeanba import apply_vmeanba
    from lowrank_vit.nn.adapters import count_params
    from lowrank_vit.pipeline import check_target, compress

    device = resolve_device(args.device)
    vmeanba = vmeanba_config(args)  # bad options fail before anything is loaded
    cfg = compression_config(args, device)
    out = Path(args.output).expanduser()
    check_output_dir(out, args.force)
    check_data_path(args.data)
    timings: dict[str, float] = {}
    start = time.perf_counter()
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
    start = time.perf_counter()
    available = len(dm.calibration_indices)
    vreport = None
    if vmeanba is not None:
        vreport = apply_vmeanba(model, dm.calibration_dataloader(), vmeanba,
                                calib_samples=min(vmeanba.calib_samples, available)).to_dict()
        timings["vmeanba"] = time.perf_counter() - start
        start = time.perf_counter()
    report, latency = None, {}
    if cfg is not None:
        if available < cfg.calib_samples:  # the images there are (already warned about): progress bars count to them
            cfg = dataclasses.replace(cfg, calib_samples=available)
        dense = copy.deepcopy(model) if cfg.latency_table is not None and not args.no_timing else None
        report = compress(model, dm.calibration_dataloader(), cfg)
        timings["compress"] = time.perf_counter() - start
        latency = {} if dense is None else measured_latency(args, dense, model, report.to_dict())
        del dense
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
    line = (f"{out}: {params_before:,} -> {params_after:,} parameters "
            f"(-{100 * summary['reduction']:.1f}%), {mib_before:.1f} -> {summary['size_mib']['after']:.1f} MiB")
    if vreport is not None:
        line += summary_line(vreport)
    if "before" in accuracy:
        line += f", top-1 {accuracy['before']['top1']:.2f} -> {accuracy['after']['top1']:.2f}%"
    elif "after" in accuracy:
        line += f", top-1 {accuracy['after']['top1']:.2f}% compressed (dense not evaluated)"
    if summary["latency"]:
        line += f", {summary['latency']['predicted_speedup']:.2f}x predicted"
        if "measured_speedup" in summary["latency"]:
            line += f" / {summary['latency']['measured_speedup']:.2f}x measured"
        line += f" at batch {summary['latency']['batch']}"
    print(line)
    return 0


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


# ---------------------------------------------------------------------------------------------------- finetune


@user_command
def cmd_finetune(args: argparse.Namespace) -> int:
    from lowrank_vit.io.modelcard import REPORT_FILE
    from lowrank_vit.nn.adapters import count_params
    from lowrank_vit.stages.finetune import FinetuneConfig, finetune

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
    source = _directory_source(args, directory)
    pre, origin = resolve_model_preprocessing(source, args)
    _say(args, describe_preprocessing(pre, origin))
    model = source.model
    teacher = load_teacher(args, source) if config.distill > 0 else None
    previous = _read_report(directory / REPORT_FILE)  # before the fine-tune: a bad report must not cost one
    dm = build_data(args, model, pre, augment=args.augment, calib_samples=1)  # no calibration in a fine-tune
    stage = _staging(out, "partial")  # a fixed name: a second run resumes from its checkpoints
    checkpoints = stage / "checkpoints"
    _resume_or_start(args, stage, _finetune_run(args, directory, config))
    start = time.perf_counter()
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    strategy = "ddp" if args.devices > 1 else "auto"
    try:
        module, trainer = finetune(model, datamodule=dm, config=config, teacher=teacher, accelerator=accelerator,
                                   devices=args.devices, strategy=strategy, checkpoint_dir=str(checkpoints),
                                   ckpt_path="last", progress=not args.quiet)
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
    final = _evaluate(model, dm, device, args, "evaluate fine-tuned")
    accuracy = {**previous.get("accuracy", {}), "final": final}
    report = {**previous, "name": out.name, "command": "finetune", "input": str(directory), "data": args.data,
              "preprocessing": pre, "preprocessing_origin": origin, "accuracy": accuracy,
              "params": {**previous.get("params", {}), "after": count_params(model)},
              "finetune": {**config.to_dict(), "steps": int(trainer.global_step), "seconds": seconds,
                           "augment": args.augment}}
    report.setdefault("layers", _layers(model, None))
    report.setdefault("source", {"description": source.description, "architecture": source.architecture})
    metadata = {**source.metadata, "preprocessing": pre, "finetune": report["finetune"]}
    write_model_dir(stage, model, report, metadata)
    shutil.rmtree(checkpoints, ignore_errors=True)  # Lightning checkpoints are pickles: none left in a model dir
    (stage / RESUME_FILE).unlink(missing_ok=True)
    publish(stage, out)
    print(f"{out}: fine-tuned {trainer.global_step} steps, top-1 {final['top1']:.2f}% "
          f"({_top5_text(final, '', ', ')}{final['images']:,} images)")
    return 0


RESUME_FILE = "resume.json"
"""In a fine-tune's staging directory: what the interrupted run was, so that only the same run resumes there."""


def _resume_note(checkpoints: Path, every: int) -> str:
    """What the same command will do after an interruption, read from the checkpoints' names (never unpickled)."""
    import re

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
    from lowrank_vit.harness.runner import checkpoint_digest
    from lowrank_vit.io.surgery import WEIGHTS_FILE

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
        _say(args, f"resuming from {last}")
        return
    stage.mkdir(parents=True, exist_ok=True)
    _write_json(record, run)


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


__all__ = ["UserError", "add_user_commands", "check_output_dir", "cmd_compress", "cmd_evaluate", "cmd_export",
           "cmd_finetune", "default_workers", "describe_preprocessing", "latency", "load_source", "publish",
           "resolve_model_preprocessing"]
