"""Small helpers shared across the package, each in one place: the batch formats the library accepts, the
warm-up + cosine schedule, smooth synthetic images, the atomic file write and handing freed memory back. Torch only
(no timm, no Lightning).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch import nn

DEFERRED_PACKAGES = ("timm", "torchvision", "lightning", "torchmetrics", "datasets", "transformers", "huggingface_hub",
                     "wandb", "matplotlib", "scipy", "onnx", "onnxruntime", "onnxscript", "PIL", "mlxtend")
"""The only packages the package imports inside a function, where it uses them, and never at a module's top: every
other import sits at the top of its module. Each is either optional (an extra: onnx, onnxruntime, onnxscript,
transformers) or slow to import beside torch, which every path needs (timm with torchvision, and Lightning with
torchmetrics, take seconds; benchmarks/cli_startup.py measures each on this machine), so that ``import lowrank_vit``,
``lowrank-vit --help``, ``list``, ``show`` and ``plan`` load none of them. A module of the package that imports one at
its top (the Lightning stages, the VMamba model) is imported inside functions for the same reason.
tests/test_architecture.py holds every function-level import to this list."""

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Name -> entry for one configurable choice (decompositions, Z kinds, allocation policies), the way timm
    registers models: a name is registered once, and an unknown name fails with the registered ones listed."""

    def __init__(self, what: str, also: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.what = what
        self.also = also  # names accepted elsewhere without an entry here ("none" for the Z kinds)

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def register(self, cls: type) -> type:
        """Class decorator: register one instance of ``cls`` under ``cls.name``."""
        self.add(cls.name, cls())
        return cls

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; registered: {', '.join((*self.also, *self))}") from None


def from_fields(cls: type[T], data: dict[str, Any]) -> T:
    """``cls(**data)`` for a config dataclass, with unknown keys an error that names them (a typo in a saved or
    hand-written config must not be silently dropped)."""

    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**data)


_RULES: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "> 1": lambda v: v > 1, "[0, 0.5)": lambda v: 0 <= v < 0.5,
    "(0, 1]": lambda v: 0 < v <= 1, "(0, 1)": lambda v: 0 < v < 1, "[0, 1)": lambda v: 0 <= v < 1,
}


def check_number(name: str, value: Any, rule: str) -> None:
    """A real, finite number (not a bool, a string or NaN) satisfying ``rule`` (one of ``_RULES``: "> 0", ">= 0",
    "(0, 1)", ...), else a ValueError that names ``name`` and says which rule it broke. The number must be a Python
    int or float (numpy's float64 is one): a config holding numpy's float32 or int64 could not be saved as JSON."""
    if rule not in _RULES:  # checked first: a typo in the rule must not be blamed on the value
        raise ValueError(f"unknown rule {rule!r} for {name}; known: {', '.join(map(repr, _RULES))}")
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        # refused at construction rather than when the config or report is written, after the compression
        raise ValueError(f"{name} must be a Python int or float, got {value!r}")
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        _RULES[rule](value)
    if not ok:
        where = f"lie in {rule}" if rule.startswith(("[", "(")) else f"be a finite number {rule}"
        raise ValueError(f"{name} must {where}, got {value!r}")


def check_count(name: str, value: Any) -> None:
    """A positive integer (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def settings_of(cfg: Any, cls: type[T]) -> T:
    """The typed settings ``cls`` (a registered method's or allocation's own dataclass) from ``cfg.settings``: the
    keys ``cls`` declares, on top of its defaults (the other keys belong to the other registered choice)."""

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in (getattr(cfg, "settings", None) or {}).items() if key in names})


IMAGE_KEYS = ("image", "images", "pixel_values", "img")
"""Keys under which a dict batch may carry its images."""
LABEL_KEYS = ("label", "labels", "target", "targets")
"""Keys under which a dict batch may carry its labels."""


def batch_images(batch: object) -> torch.Tensor | None:
    """The image tensor of a batch (a tensor, an (images, labels, ...) pair or a dict with an image key), else None."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        return next((batch[k] for k in IMAGE_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
    return None


def batch_labels(batch: object) -> torch.Tensor | None:
    """The label tensor of a batch (the second item of a pair, or a dict's label key), else None."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, dict):
        return next((batch[k] for k in LABEL_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
    return None


def smooth_images(count: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``count`` smooth random images (low-frequency noise, bilinearly upsampled): neighbouring patch tokens
    correlate as in natural images, which is what calibration statistics need when no data is at hand."""
    channels, height, width = shape
    low = torch.randn(count, channels, max(height // 16, 2), max(width // 16, 2), generator=generator)
    return nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)


def release_freed_memory() -> None:
    """Hand the memory Python has freed back to the operating system, where the C library keeps it (glibc).

    glibc serves blocks of up to 32 MiB from its heap once larger ones have been freed, and keeps the heap's freed
    pages: a ViT-L compression left 10 GB resident after returning (measured), which under DDP on one host stays
    held while the next process compresses. ``malloc_trim(0)`` returns it; elsewhere (macOS, Windows, musl) this
    does nothing.
    """

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Learning-rate factor at ``step``: linear warm-up to 1, then a cosine decay to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
