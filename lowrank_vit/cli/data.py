"""``--data`` for the user commands: refused early where it can only be a missing path, turned into the library's
data module with the model's preprocessing, and evaluated on: top-1 where a classifier meets labelled data, else
fidelity to the dense model (:mod:`lowrank_vit.cli.fidelity`).

A model that is not a classifier (``num_classes`` 0, or 1: no class logits) reads its data without labels, whatever
the data holds (an image folder with or without subfolders, a parquet file with or without a label column); a
classifier reads the labels where the training split has a label column, and otherwise takes the images alone
(``DataConfig.labels``).

Which images each command scores: the validation split (``--val-split``, else the first of validation, val, valid,
test present); where the data has none, ``compress`` and ``finetune`` hold out a seeded 20% of the images (they learn
from the rest) and ``evaluate``, which learns from none, scores every image (``DataConfig.holdout``)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.cli.base import UserError
from lowrank_vit.cli.fidelity import measure_fidelity
from lowrank_vit.core.likelihood import is_classifier
from lowrank_vit.io.modelcard import top5_informative
from lowrank_vit.repro.rows import evaluate
from lowrank_vit.stages.data_config import DataConfig, DataFormatError, DataNotFoundError


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


def _data_config(args: argparse.Namespace, pre: dict[str, Any], *, calib_samples: int,
                 augment: bool = False, labels: str = "required", holdout: bool = True) -> Any:
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
    return DataConfig(**location, image_column=args.image_column, label_column=args.label_column, labels=labels,
                      train_split=args.train_split, val_split=args.val_split, holdout=holdout,
                      batch_size=args.batch_size, num_workers=workers, calib_samples=calib_samples, img_size=height,
                      in_chans=channels,
                      augment=augment, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                      crop_pct=pre.get("crop_pct"), interpolation=pre.get("interpolation"))


_DATA_FLAGS = {"path": "--data", "label_column": "--label-column", "image_column": "--image-column",
               "val_split": "--val-split", "train_split": "--train-split"}
"""DataConfig's fields, as the errors of the data module name them, and the flags that set them here."""


def build_data(args: argparse.Namespace, model: nn.Module, pre: dict[str, Any], *, calib_samples: int,
               augment: bool = False, holdout: bool = True) -> Any:
    """The data module, loaded, with its class count checked against the model's head; ``calib_samples`` is what
    the command calibrates on (1 where it calibrates nothing, so no subset is drawn or warned about). A model that
    is not a classifier reads the images without labels; a classifier reads labels where there are some
    (``dm.labelled`` says which). ``holdout``: where the data has no validation split, validate on a seeded 20% of
    the images (True: a command that learns from the rest), or on every one of them (False: evaluation alone;
    ``dm.val_origin`` is then "all")."""
    from lowrank_vit.stages.data import build_datamodule

    classifier = is_classifier(model)
    if not classifier and getattr(args, "label_column", None):
        raise UserError(f"--label-column {args.label_column!r}: the model is not a classifier (num_classes="
                        f"{getattr(model, 'num_classes', None)!r}), its data is read without labels; drop "
                        f"--label-column")
    try:
        cfg = _data_config(args, pre, calib_samples=calib_samples, augment=augment,
                           labels="optional" if classifier else "none", holdout=holdout)
        dm = build_datamodule(cfg, model)
        dm.setup()
    except (DataFormatError, DataNotFoundError, ValueError) as err:  # the library's words for its fields: ours here
        raise UserError(re.sub(r"(?<![\w.(])(path|label_column|image_column|val_split|train_split)=",
                               lambda m: _DATA_FLAGS[m.group(1)], str(err))) from None
    classes = getattr(model, "num_classes", None)
    if classifier and dm.labelled and isinstance(classes, int) and classes != dm.num_classes:
        if Path(str(args.model)).expanduser().is_dir():  # a model directory's head is what it is
            raise UserError(f"the model in {args.model!r} has {classes} classes, {args.data!r} has "
                            f"{dm.num_classes}: give data with the classes it was compressed for")
        raise UserError(f"the model has {classes} classes, {args.data!r} has {dm.num_classes}: give weights trained "
                        f"on this data (--checkpoint) or a model built for it (--model-kwargs "
                        f"'{{\"num_classes\": {dm.num_classes}}}')")
    return dm


def evaluate_on_user_data(model: nn.Module, dm: Any, device: torch.device, args: argparse.Namespace,
                          desc: str) -> dict[str, Any]:
    loader = dm.val_dataloader(limit=getattr(args, "limit", None))
    return evaluate(model, loader, device, progress=not args.quiet, desc=desc)


def measures_top1(model: nn.Module, dm: Any) -> bool:
    """Whether top-1 can be measured: a classifier, and data with labels."""
    return is_classifier(model) and dm.labelled


def no_top1_reason(model: nn.Module, dm: Any) -> str:
    """Why there is no top-1, for the line that says fidelity is reported instead."""
    if not is_classifier(model):
        return f"the model is not a classifier (num_classes={getattr(model, 'num_classes', None)!r})"
    return ("the data has no labels (its training split has no label column, or only an empty one; --label-column "
            "names one)")


def fidelity_on_data(model: nn.Module, dense: nn.Module, dm: Any, device: torch.device, args: argparse.Namespace,
              desc: str, likelihood: str, output_key: Any) -> dict[str, Any]:
    """The fidelity of ``model`` to ``dense`` on the validation images (``--limit`` of them where given)."""

    loader = dm.val_dataloader(limit=getattr(args, "limit", None))
    return measure_fidelity(model, dense, loader, device, likelihood=likelihood, output_key=output_key,
                            progress=not args.quiet, desc=desc)


def recorded_output(metadata: dict[str, Any]) -> tuple[str, Any]:
    """The likelihood and output key a model directory's compression recorded (``metadata["output"]``, else its
    saved ``compression_config``): ("auto", None) where it records none."""
    output = metadata.get("output") if isinstance(metadata.get("output"), dict) else {}
    config = metadata.get("compression_config") if isinstance(metadata.get("compression_config"), dict) else {}
    likelihood = output.get("likelihood") or config.get("likelihood") or "auto"
    key = output["output_key"] if "output_key" in output else config.get("output_key")
    return str(likelihood), key

def top5_text(metrics: dict[str, Any], before: str = "", after: str = "") -> str:
    """``top-5 97.10%`` between ``before`` and ``after``, or nothing where 5 classes or fewer make it 100% always."""

    return f"{before}top-5 {metrics['top5']:.2f}%{after}" if top5_informative(metrics) else ""
