"""``compress``'s dense evaluation, cached: the top-1 of weights read from a file, keyed by everything it depends on,
reused with a note on stderr (``--no-cache`` evaluates again)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_vit import __version__
from lowrank_vit.cli.base import say_to_user
from lowrank_vit.cli.data import evaluate_on_user_data
from lowrank_vit.core.files import write_json
from lowrank_vit.io.surgery import WEIGHTS_FILE
from lowrank_vit.repro.models import checkpoint_digest
from lowrank_vit.speed.profile import cache_dir

if TYPE_CHECKING:
    from lowrank_vit.cli.sources import Source


DENSE_CACHE = "dense"
"""The folder, beside the latency tables' (:func:`lowrank_vit.speed.profile.cache_dir`), of the dense models' top-1
that ``compress`` reuses."""


def _dense_cache_dir() -> Path:
    return cache_dir().parent / DENSE_CACHE  # the latency tables' root: one variable moves every cache


def _weights_sha256(source: Source) -> str | None:
    """The content digest of the file the weights were read from (a --checkpoint, a model directory's weights), or
    None where no file holds them: random weights, or timm's pretrained ones, whose classifier timm draws anew when
    --model-kwargs change the class count. Only the former's accuracy is cached."""

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
           "splits": {k: getattr(args, k) for k in ("train_split", "val_split", "image_column", "label_column")},
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
    """Written atomically (:func:`~lowrank_vit.core.files.write_json`: two runs never read half a file); a cache that
    cannot be written is skipped, never a failed command."""
    try:
        write_json(path, {"key": key, "accuracy": metrics})
    except (OSError, ValueError) as err:
        say_to_user(args, f"the dense model's top-1 was not cached ({type(err).__name__}: {err})")


def cached_dense_accuracy(args: argparse.Namespace, source: Source, pre: dict[str, Any], model: nn.Module, dm: Any,
                          device: torch.device) -> tuple[dict[str, Any], Path | None]:
    """The dense model's accuracy: from the cache where this very evaluation was done before (said on stderr, naming
    the file), else evaluated now and cached. Returns it and the cache file it was read from (None: evaluated)."""
    entry = _dense_cache_entry(args, source, pre, device)
    if entry is not None and not args.no_cache:
        cached = _read_cached_accuracy(*entry)
        if cached is not None:
            say_to_user(args, f"dense model: top-1 {cached['top1']:.2f}% reused from the cache ({entry[0]}); "
                              f"--no-cache evaluates it again")
            return cached, entry[0]
    metrics = evaluate_on_user_data(model, dm, device, args, "evaluate dense")
    if entry is not None:
        _write_cached_accuracy(args, *entry, metrics)
    return metrics, None
