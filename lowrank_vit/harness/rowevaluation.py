"""A registry row's evaluations (:mod:`lowrank_vit.harness.runner` runs them): top-1 and top-5 accuracy
(:func:`evaluate`), and the starting model's accuracy evaluated once per output directory and reused by every row
that starts from the same weights on the same data (:func:`row_dense_accuracy`, ``OUTPUT/.dense/KEY.json``), keyed on
what names the weights for good (:func:`weights_identity`: a checkpoint's digest, the stand-in's fingerprint, the
timm name) and the versions of torch and timm (:func:`installed_version`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.files import write_json
from lowrank_vit.harness.registry import ModelConfig, RunConfig

DENSE_DIR = ".dense"
"""Under the output directory: the starting models' accuracies, shared by the rows (see ``row_dense_accuracy``)."""


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


def standin_weights_fingerprint(arch: str) -> str | None:
    from lowrank_vit.harness.standins import STANDINS

    spec = STANDINS.get(arch)
    return None if spec is None else spec.fingerprint()


def weights_identity(cfg: ModelConfig, digest: str | None) -> str | None:
    """What names the starting weights for good, or None when nothing does (a random initialization)."""
    if cfg.checkpoint is not None:
        return f"sha256:{digest}"
    if not cfg.pretrained:
        return None
    return f"standin:{standin_weights_fingerprint(cfg.name)}" if cfg.source == "standin" else f"timm:{cfg.name}"


def row_dense_accuracy(cfg: RunConfig, digest: str | None, output: Path,
                       evaluate_dense: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The starting model's accuracy, evaluated once per output directory: every row of a table that starts from
    the same weights and evaluates on the same data reuses it (``OUTPUT/.dense/KEY.json``), which saves one full
    pass over the validation set per row. Random initializations are never reused."""
    weights = weights_identity(cfg.model, digest)
    if weights is None:
        return evaluate_dense()
    config = cfg.to_dict()
    data = {k: v for k, v in config["data"].items() if k not in ("calib_samples", "augment", "num_workers")}
    payload = {"model": config["model"], "weights": weights, "data": data, "versions": [
        torch.__version__, installed_version("timm")]}
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


def installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
