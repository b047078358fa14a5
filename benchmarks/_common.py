"""Helpers shared by the benchmark scripts: model lookup, lazy calibration images, timing, tables and JSON.

Nothing here is part of the ``lowrank_vit`` package; the scripts import it as a sibling module, so they run as
``python benchmarks/<script>.py`` from the repository root (or anywhere else) without installing anything extra.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from lowrank_vit.cli.args import fraction, positive_int  # noqa: F401  (the scripts' argparse type, shared with the CLI)
from lowrank_vit.core import common

MODEL_ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "swin_base": "swin_base_patch4_window7_224",
}
"""Short names accepted by ``--model`` beside every full timm model name."""


class UsageError(ValueError):
    """A bad command-line value; the scripts turn it into a one-line message and exit code 2."""


def resolve_model_name(name: str) -> str:
    """The timm architecture for a ``--model`` value (a short alias or any registered timm name).

    Raises:
        UsageError: the name is neither an alias nor a timm model.
    """
    import timm

    full = MODEL_ALIASES.get(name, name)
    if not timm.is_model(full):
        aliases = ", ".join(sorted(MODEL_ALIASES))
        raise UsageError(f"unknown model {name!r}: give a timm model name or one of {aliases}")
    return full


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs`` as a dict: a JSON object of extra ``timm.create_model`` arguments (e.g. a tiny test ViT)."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--model-kwargs must be a JSON object, e.g. '{\"depth\": 2}'")
    return kwargs


def create_model(name: str, kwargs: dict[str, Any], seed: int = 0, device: str = "cpu") -> nn.Module:
    """A randomly initialised timm model in eval mode (speed and cost do not depend on the weights' values)."""
    import timm

    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise UsageError(f"timm rejected --model-kwargs for {name}: {exc}") from None
    return model.eval().to(device)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images ``model`` expects."""
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(proj, nn.Conv2d) and img_size is not None:
        return proj.in_channels, int(img_size[0]), int(img_size[1])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    return int(channels), int(height), int(width)


def smooth_images(batch: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``batch`` smooth random images (low-frequency noise, bilinearly upsampled): patch tokens are correlated like
    natural ones, which matters for the statistics, not for speed."""
    return common.smooth_images(batch, shape, torch.Generator().manual_seed(seed))


def image_batches(num_images: int, batch_size: int, shape: tuple[int, int, int],
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """Lazily generated calibration batches: only one batch is ever in memory, so the data set itself does not
    count in a peak-memory measurement. Iterating twice with the same seed yields the same images."""
    for index, start in enumerate(range(0, num_images, batch_size)):
        yield smooth_images(min(batch_size, num_images - start), shape, seed * 1_000_003 + index)


class ImageStream:
    """A re-iterable :func:`image_batches` (every ``iter`` starts again from the first batch)."""

    def __init__(self, num_images: int, batch_size: int, shape: tuple[int, int, int], seed: int = 0) -> None:
        self.num_images, self.batch_size, self.shape, self.seed = num_images, batch_size, shape, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        return image_batches(self.num_images, self.batch_size, self.shape, self.seed)


class LabelledStream:
    """``images`` as (images, labels) batches, image i of the stream labelled i mod ``classes``: for the methods
    whose calibration needs labels (FWSVD, KFAC-SVD); their cost does not depend on which labels."""

    def __init__(self, images: ImageStream, classes: int) -> None:
        self.images, self.classes = images, classes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for batch in self.images:
            yield batch, torch.arange(seen, seen + batch.shape[0]) % self.classes
            seen += batch.shape[0]


def check_device(device: str) -> str:
    """Validate ``--device``."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA device is available")
    return device


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds ``fn()`` takes, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def environment(device: str) -> dict[str, Any]:
    """What the figures were measured on (with the 1/5/15-minute load averages: the machine may be shared)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
           "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def command_line() -> str:
    """The command that produced a result, for the README and the JSON."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (indented, keys in insertion order), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table. ``columns``: (key, header, format spec) triples; missing values print as '-'."""
    cells = []
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                line.append("-")
            else:
                line.append(format(value, spec))
        cells.append(line)
    widths = [max(len(header), *(len(line[i]) for line in cells)) if cells else len(header)
              for i, (_, header, _) in enumerate(columns)]
    out = ["  ".join(header.rjust(w) for (_, header, _), w in zip(columns, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in cells)
    return "\n".join(out)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``<script>: error: <message>`` on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


