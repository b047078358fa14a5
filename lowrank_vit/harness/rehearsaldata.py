"""What a rehearsal (:mod:`lowrank_vit.harness.rehearse`) cuts and generates: its settings
(:class:`RehearsalSettings`), the error a broken hand-over raises (:class:`RehearsalError`), and the generated data,
``images_per_class`` training images for every one of the head's classes and ``val_images`` validation images whose
labels span the first to the last class, written in one of the ImageNet layouts (:data:`LAYOUTS`: the hub's parquet
files, an image folder, a flat validation folder with its ground truth) with timm's ImageNet synsets as class names."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAYOUTS: dict[str, Callable[..., dict[str, Any]]] = {}
"""Layout name -> writer of a generated dataset in that layout (returns the ``data.*`` overrides that read it)."""


def register_layout(name: str) -> Callable:
    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        LAYOUTS[name] = fn
        return fn
    return wrap


class RehearsalError(AssertionError):
    """A hand-over between two stages is not what the next stage needs; the message says which."""


@dataclass
class RehearsalSettings:
    """How far a rehearsal cuts the row (everything else is the row's full-scale config)."""

    layout: str = "hub-parquet"
    devices: int = 1
    """Processes per row (>1: DDP), each on one CPU or one GPU."""
    accelerator: str = "cpu"
    """``"cpu"`` or ``"gpu"``: where the rows run (``lowrank-vit run --accelerator``)."""
    images_per_class: int = 2
    val_images: int = 8
    calib_samples: int = 4
    finetune_steps: int = 2
    batch_size: int = 4
    sgd_steps: int = 5
    """Steps of the SGD solver of Z, for the rows that fit Z by SGD (the loop is the same at any count)."""
    depth: int | None = None
    """Blocks per stage of a shrunk model (None: the full architecture, the default and the point)."""

    def __post_init__(self) -> None:
        if self.accelerator not in ("cpu", "gpu"):
            raise ValueError(f"accelerator must be 'cpu' or 'gpu', got {self.accelerator!r}")
        if self.accelerator == "gpu" and torch.cuda.device_count() < self.devices:
            raise ValueError(f"--accelerator gpu with --devices {self.devices} needs {self.devices} CUDA device(s); "
                             f"torch sees {torch.cuda.device_count()}: use fewer devices or --accelerator cpu")


# ------------------------------------------------------------------------------------------------ generated data


def class_names(num_classes: int) -> list[str]:
    """The synsets of the head's classes in its order: timm's ImageNet-1k table (n01440764 ... n15075141)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    if num_classes != info.num_classes():
        raise RehearsalError(f"the head predicts {num_classes} classes, not ImageNet-1k's {info.num_classes()}")
    return [info.index_to_label_name(i) for i in range(num_classes)]


def _jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A smooth random RGB image (noise upsampled), JPEG-encoded."""
    from PIL import Image

    low = rng.integers(0, 256, (max(size[0] // 16, 2), max(size[1] // 16, 2), 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((size[1], size[0]), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def val_labels(num_classes: int, n: int) -> list[int]:
    """``n`` labels spread from the first class to the last (both ends of the class order are exercised)."""
    return sorted({round(i * (num_classes - 1) / max(n - 1, 1)) for i in range(n)})


@register_layout("hub-parquet")
def _write_hub_parquet(root: Path, num_classes: int, size: tuple[int, int], s: RehearsalSettings) -> dict[str, Any]:
    """The hub's ``ILSVRC/imagenet-1k`` as downloaded: ``data/{train,validation}-*.parquet``, integer labels in the
    synset order (the hub names its classes by description, some of which repeat in timm's table, so the generated
    ``ClassLabel`` names are the synsets)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=class_names(num_classes))})
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    train = [c for c in range(num_classes) for _ in range(s.images_per_class)]
    for split, labels in (("train", train), ("validation", val_labels(num_classes, s.val_images))):
        images = [{"bytes": _jpeg(rng, size), "path": None} for _ in labels]
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return {"data.path": str(root)}


def _write_folder(folder: Path, labels: list[int], synsets: list[str], rng: np.random.Generator,
                  size: tuple[int, int]) -> None:
    for i, label in enumerate(labels):
        (folder / synsets[label]).mkdir(parents=True, exist_ok=True)
        (folder / synsets[label] / f"{synsets[label]}_{i}.JPEG").write_bytes(_jpeg(rng, size))


@register_layout("imagefolder")
def _write_imagefolder(root: Path, num_classes: int, size: tuple[int, int], s: RehearsalSettings) -> dict[str, Any]:
    """``train/<synset>/*.JPEG`` and ``val/<synset>/*.JPEG``."""
    synsets = class_names(num_classes)
    rng = np.random.default_rng(0)
    _write_folder(root / "train", [c for c in range(num_classes) for _ in range(s.images_per_class)], synsets, rng,
                  size)
    _write_folder(root / "val", val_labels(num_classes, s.val_images), synsets, rng, size)
    return {"data.path": str(root)}


@register_layout("flat-val")
def _write_flat_val(root: Path, num_classes: int, size: tuple[int, int], s: RehearsalSettings) -> dict[str, Any]:
    """``train/<synset>/*.JPEG`` beside a flat ``val/ILSVRC2012_val_NNNNNNNN.JPEG`` and its ground truth, one
    0-based label per line in sorted file name order."""
    synsets = class_names(num_classes)
    rng = np.random.default_rng(0)
    _write_folder(root / "train", [c for c in range(num_classes) for _ in range(s.images_per_class)], synsets, rng,
                  size)
    (root / "val").mkdir()
    labels = val_labels(num_classes, s.val_images)
    for i in range(len(labels)):
        (root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(_jpeg(rng, size))
    truth = root / "val_ground_truth.txt"
    truth.write_text("".join(f"{label}\n" for label in labels))
    return {"data.path": str(root), "data.val_labels": str(truth)}
