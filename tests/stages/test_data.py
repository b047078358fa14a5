"""Tests of lowrank_vit/stages/data.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch

from lowrank_vit.stages.data import HFImageDataModule, ImageNetDataModule, MNIST5kDataModule, build_datamodule
from lowrank_vit.stages.data_config import DataConfig, DataFormatError, DataNotFoundError, EmptySplitError
from lowrank_vit.stages.data_transforms import TensorImageTransform
from tests.helpers import (
    IMAGE_SIZE,
    SIZE,
    _cfg,
    _one_line,
    _parquet,
    _pil,
    _write_parquet,
    cifar10_dir,
    cli,
    make_tiny_vit,
    one_line_error,
    write_image_folder,
)


def _datamodule(path: Path, labels: str, **extra):
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    dm = build_datamodule(DataConfig(path=str(path), labels=labels, img_size=SIZE, in_chans=1, batch_size=4,
                                     calib_samples=4, num_workers=0, augment=False, **extra))
    dm.setup()
    return dm


@pytest.mark.usefixtures('one_thread')
def test_an_image_folder_without_class_subfolders_is_read_without_labels(place):
    from lowrank_vit.stages.data_config import DataFormatError

    dm = _datamodule(place / "imgs", "optional")
    assert not dm.labelled and dm.num_classes == 0
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (16, 4)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.calibration_dataloader()):
        batch = next(iter(loader))
        assert isinstance(batch, torch.Tensor) and batch.shape[1:] == (1, SIZE, SIZE)
    with pytest.raises(DataFormatError, match="no label column"):  # the library's default: a classification set
        _datamodule(place / "imgs", "required")


@pytest.mark.usefixtures('one_thread')
def test_labels_none_ignores_class_subfolders_and_optional_reads_them(tmp_path):
    from tests.helpers import write_image_folder

    write_image_folder(tmp_path / "classes", classes=2, per_class=5, size=SIZE)
    none = _datamodule(tmp_path / "classes", "none")
    assert not none.labelled and isinstance(next(iter(none.val_dataloader())), torch.Tensor)
    optional = _datamodule(tmp_path / "classes", "optional")
    assert optional.labelled and optional.num_classes == 2
    images, labels = next(iter(optional.val_dataloader()))
    assert images.shape[1:] == (1, SIZE, SIZE) and labels.dtype == torch.int64


@pytest.mark.usefixtures('one_thread')
def test_a_parquet_file_without_a_label_column_is_read_without_labels(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(seed: int) -> dict:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    pq.write_table(pa.table({"image": [png(i) for i in range(10)]}), tmp_path / "train.parquet")
    dm = _datamodule(tmp_path / "train.parquet", "optional", cache_dir=str(tmp_path / "hf"))
    assert not dm.labelled and (len(dm.train_dataset), len(dm.val_dataset)) == (8, 2)
    assert isinstance(dm.val_dataset[0], torch.Tensor)


@pytest.mark.usefixtures('one_thread')
def test_flat_train_and_val_folders_without_labels_are_two_splits(tmp_path, place):
    import shutil

    images = sorted((place / "imgs").glob("*.png"))
    for split, part in (("train", images[:6]), ("val", images[6:9])):
        (tmp_path / split).mkdir()
        for image in part:
            shutil.copy(image, tmp_path / split / image.name)
    dm = _datamodule(tmp_path, "optional", cache_dir=str(tmp_path / "hf"))
    assert not dm.labelled and (len(dm.train_dataset), len(dm.val_dataset)) == (6, 3)


@pytest.mark.usefixtures('one_thread')
def test_holdout_false_validates_on_every_image_where_there_is_no_validation_split(tmp_path, place):
    """``DataConfig.holdout``: without a validation split a seeded 20% is held out (the default), or, for evaluation
    alone, every image of the training split is validated on; a validation split is read either way, and the
    digits keep their fixed 1000. ``val_origin`` says which."""
    held = _datamodule(place / "imgs", "optional")
    whole = _datamodule(place / "imgs", "optional", holdout=False)
    assert (held.val_origin, len(held.train_dataset), len(held.val_dataset)) == ("holdout", 16, 4)
    assert (whole.val_origin, len(whole.train_dataset), len(whole.val_dataset)) == ("all", 20, 20)
    everything = torch.cat(list(whole.val_dataloader()))
    assert everything.shape == (20, 1, SIZE, SIZE)
    assert all(any(torch.equal(image, other) for other in everything) for image in held.val_dataset)

    write_image_folder(tmp_path / "classes", classes=3, per_class=5, size=SIZE)
    labelled = _datamodule(tmp_path / "classes", "optional", holdout=False)
    assert labelled.labelled and (labelled.val_origin, len(labelled.val_dataset)) == ("all", 15)
    assert torch.equal(torch.cat([y for _, y in labelled.val_dataloader()]).bincount(), torch.full((3,), 5))
    assert _datamodule(tmp_path / "classes", "optional").val_origin == "holdout"

    images = sorted((place / "imgs").glob("*.png"))
    for split, part in (("train", images[:6]), ("val", images[6:9])):
        (tmp_path / "split" / split).mkdir(parents=True)
        for image in part:
            (tmp_path / "split" / split / image.name).write_bytes(image.read_bytes())
    split = _datamodule(tmp_path / "split", "optional", holdout=False, cache_dir=str(tmp_path / "hf"))
    assert (split.val_origin, len(split.train_dataset), len(split.val_dataset)) == ("split", 6, 3)

    digits = build_datamodule(DataConfig(name="mnist-5k", holdout=False))
    assert (digits.val_origin, len(digits.val_dataset)) == ("split", 1000)


@pytest.mark.usefixtures("offline")
def test_an_empty_validation_split_names_the_data(tmp_path):
    """The refusal of an empty split says which data it read (the user may have several folders)."""
    from PIL import Image

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    root = tmp_path / "folder"
    for split, count in (("train", 2), ("validation", 0)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / label / f"{i}.png")
    dm = build_datamodule(DataConfig(path=str(root), img_size=8, batch_size=2, num_workers=0))
    with pytest.raises(ValueError) as info:
        dm.setup()
    assert repr(str(root)) in str(info.value)


@pytest.mark.usefixtures("offline")
def test_unsigned_integer_labels_are_classes_and_local_data_is_cached_where_asked(tmp_path):
    """uint8 labels (what numpy and many exporters write) are integer classes (they crashed the class count with
    an OverflowError until this test); the local data's Arrow cache goes under the data config's cache_dir, not the
    user's Hugging Face cache."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    _parquet(tmp_path / "d" / "train.parquet", [0, 1, 2, 1], dtype="uint8")
    _parquet(tmp_path / "d" / "validation.parquet", [2, 0], dtype="uint8")
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0,
                                     cache_dir=str(tmp_path / "hf")))
    dm.setup()
    assert dm.num_classes == 3 and len(dm.val_dataset) == 2
    assert any((tmp_path / "hf").rglob("*.arrow"))


@pytest.mark.usefixtures("offline")
def test_imagenet_from_the_hub_is_called_by_its_name(monkeypatch):
    import datasets

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError

    def load_dataset(*args, **kwargs):
        raise ValueError("a schema the reader does not know")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dm = build_datamodule(DataConfig(name="imagenet-1k", token="hf_not_a_token", img_size=8, num_workers=0))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert str(info.value) == "could not read ImageNet-1k: a schema the reader does not know"


@pytest.mark.usefixtures("offline")
def test_training_images_are_not_augmented_unless_asked(tmp_path):
    """``augment=False`` (the fine-tune's default, ``--augment`` off): a training image is the evaluation transform
    of it, the same each time it is read (the calibration pool's); ``augment=True`` draws a new crop each time."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    write_image_folder(tmp_path / "imgs", 2, 4, 40)
    plain, augmented = (build_datamodule(DataConfig(path=str(tmp_path / "imgs"), img_size=16, batch_size=2,
                                                    calib_samples=2, augment=augment, cache_dir=str(tmp_path / "hf")))
                        for augment in (False, True))
    index = int(plain.calibration_indices[0])
    calibration_image = next(iter(plain.calibration_dataloader()))[0][0]
    first, again = plain.train_dataset[index][0], plain.train_dataset[index][0]
    assert torch.equal(first, again) and torch.equal(first, calibration_image)
    assert not torch.equal(augmented.train_dataset[index][0], augmented.train_dataset[index][0])


@pytest.mark.usefixtures("offline")
def test_a_validation_split_without_the_label_column_is_refused_naming_it(monkeypatch):
    """A hub dataset whose validation split has no label column (a test split published without its labels): the
    refusal names the split, the missing column and the columns it has, before any image is read."""
    import datasets
    from PIL import Image

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError

    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(4)]
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0, 1]}, features=datasets.Features(
            {"img": datasets.Image(), "label": datasets.Value("int64")})),
        "validation": datasets.Dataset.from_dict({"img": images[:2]},
                                                 features=datasets.Features({"img": datasets.Image()}))})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: splits)
    dm = build_datamodule(DataConfig(name="someone/dataset", img_size=8, batch_size=2, num_workers=0))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert str(info.value) == ("the 'validation' split of 'someone/dataset' lacks column(s) ['label']; its columns "
                               "are ['img']")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_are_kept_between_epochs(workers, tmp_path):
    """``num_workers`` > 0: the loaders keep their worker processes from one epoch (one evaluation) to the next
    rather than starting them again each time (``persistent_workers``); none to keep without workers."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    write_image_folder(tmp_path / "imgs", 2, 4, 16)
    dm = build_datamodule(DataConfig(path=str(tmp_path / "imgs"), img_size=16, batch_size=2, calib_samples=2,
                                     num_workers=workers, cache_dir=str(tmp_path / "hf")))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.calibration_dataloader()):
        assert loader.num_workers == workers and loader.persistent_workers is (workers > 0)


@pytest.mark.usefixtures("offline")
def test_a_missing_data_path_says_what_to_give(tmp_path):
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        build_datamodule(DataConfig(path=str(missing), img_size=8, batch_size=2, num_workers=0)).setup()
    assert str(info.value) == (f"no dataset at {str(missing)!r}: give path= a parquet file, a directory of parquet "
                               f"files, or an image folder (one subfolder per class), or name= a Hugging Face hub "
                               f"dataset")


@pytest.mark.usefixtures("offline")
def test_an_empty_datas_reason_is_cut_to_200_characters(tmp_path, monkeypatch):
    """The reason `datasets` gives for data with no rows is quoted on the one line, cut to 200 characters."""
    import datasets

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    reason = "corresponds to no data " + "x" * 300

    def load_dataset(*args, **kwargs):
        raise ValueError(reason)

    (tmp_path / "d").mkdir()
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError) as info:
        dm.setup()
    assert str(info.value) == f"{str(tmp_path / 'd')!r} has no images ({reason[:197]}...)"


@pytest.mark.usefixtures("offline")
def test_an_empty_training_split_is_named_as_the_training_split(tmp_path):
    """(Reached with a split that loads and holds nothing: what the loaders gave is replaced here.)"""
    from types import SimpleNamespace

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, EmptySplitError

    dm = build_datamodule(DataConfig(path=str(tmp_path), img_size=8, batch_size=2, num_workers=0))
    dm._build = lambda: SimpleNamespace(train=[], val=[0], train_eval=[])
    with pytest.raises(EmptySplitError) as info:
        dm.setup()
    assert str(info.value) == f"the training split of {str(tmp_path)!r} has no images"


@pytest.mark.usefixtures("offline")
def test_an_unreadable_dataset_quotes_at_most_200_characters_of_the_reason(tmp_path, monkeypatch):
    import datasets

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError

    def refuse(*args, **kwargs):
        raise ValueError("x" * 500)

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    (tmp_path / "data").mkdir()
    dm = build_datamodule(DataConfig(path=str(tmp_path / "data"), img_size=8, batch_size=2, num_workers=0))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert str(info.value) == f"could not read {str(tmp_path / 'data')!r}: {'x' * 197}..."


@pytest.mark.usefixtures("offline")
def test_calibrating_on_more_images_than_mnist_holds_names_mnist_in_the_warning():
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import MNIST_5K, DataConfig

    dm = build_datamodule(DataConfig(name=MNIST_5K, img_size=28, batch_size=8, num_workers=0, calib_samples=10**6))
    with pytest.warns(UserWarning) as caught:
        dm.setup()
    assert any(f"training images of {MNIST_5K!r} (calib_samples=1000000)" in str(w.message) for w in caught)


@pytest.mark.usefixtures("offline")
def test_data_of_one_class_counts_one_class(tmp_path):
    """Labels 0 only, in both splits: one class (the class count is the largest label plus one, from either split),
    which the head check then compares with the model's."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    _parquet(tmp_path / "d" / "train.parquet", [0, 0, 0])
    _parquet(tmp_path / "d" / "validation.parquet", [0, 0])
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0,
                                     cache_dir=str(tmp_path / "hf")))
    dm.setup()
    assert dm.num_classes == 1


@pytest.mark.usefixtures("offline")
def test_a_label_column_of_floats_is_refused_not_truncated_to_classes(tmp_path):
    """Labels 0.0, 1.5, 2.0 are not classes: refused naming the column and what it holds (read as integers they
    would silently become 0, 1, 2)."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError

    _parquet(tmp_path / "d" / "train.parquet", [0.0, 1.5, 2.0], dtype="float32")
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0,
                                     cache_dir=str(tmp_path / "hf")))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert "label column 'label' of" in str(info.value) and "not integer classes" in str(info.value)


def test_mnist_module_shapes_and_split():
    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=32), make_tiny_vit())
    assert isinstance(dm, MNIST5kDataModule)
    dm.setup("fit")
    assert dm.num_classes == 10
    assert len(dm.train_dataset) == 4000 and len(dm.val_dataset) == 1000
    train_labels, val_labels = dm.train_dataset.labels, dm.val_dataset.labels
    assert torch.equal(torch.bincount(train_labels), torch.full((10,), 400))  # stratified 80/20
    assert torch.equal(torch.bincount(val_labels), torch.full((10,), 100))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert labels.shape == (32,) and labels.dtype == torch.int64 and 0 <= int(labels.min()) <= int(labels.max()) < 10
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (32, 1, 28, 28)
    with torch.no_grad():
        assert make_tiny_vit()(val_images).shape == (32, 10)


def test_calibration_subset_is_seeded_and_uses_eval_transform():
    def module(seed: int, **kwargs) -> MNIST5kDataModule:
        return MNIST5kDataModule(DataConfig(name="mnist-5k", seed=seed, batch_size=100, **kwargs))

    dm = module(0)
    idx = dm.calibration_indices
    assert len(idx) == 1024 and len(torch.unique(idx)) == 1024 and int(idx.max()) < 4000
    assert torch.equal(idx, module(0).calibration_indices)
    assert not torch.equal(idx, module(1).calibration_indices)
    batches = list(dm.calibration_dataloader())
    assert sum(len(b[0]) for b in batches) == 1024 and batches[0][0].shape[1:] == (1, 28, 28)
    again = list(dm.calibration_dataloader())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    expected = torch.stack([dm._ready().train_eval[i][0] for i in idx[:100].tolist()])
    assert torch.equal(batches[0][0], expected)  # no augmentation: the evaluation transform of those images
    assert torch.equal(batches[0][1], dm.train_dataset.labels[idx[:100]])
    assert len(module(0, calib_samples=10).calibration_indices) == 10


def test_mnist_transform_to_model_shape():
    model = make_tiny_vit(img_size=32, patch_size=8, in_chans=3)
    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=16), model)
    assert dm.preprocessing["input_size"] == (3, 32, 32)
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and torch.isfinite(images).all()
    calib, _ = next(iter(dm.calibration_dataloader()))
    std = torch.tensor(dm.preprocessing["std"]).view(1, 3, 1, 1)
    mean = torch.tensor(dm.preprocessing["mean"]).view(1, 3, 1, 1)
    raw = calib * std + mean
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 0], raw[:, 2], atol=1e-5)
    with torch.no_grad():
        assert model(images).shape == (16, 10)
    # overrides without a model; 3 -> 1 channel averages
    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=4, img_size=32, in_chans=3))
    assert next(iter(dm.val_dataloader()))[0].shape == (4, 3, 32, 32)
    rgb = torch.randint(0, 256, (3, 10, 10), dtype=torch.uint8)
    assert TensorImageTransform((1, 12, 12), (0.0,), (1.0,))(rgb).shape == (1, 12, 12)


def test_augmentation_switch():
    base = dict(name="mnist-5k", batch_size=64)
    plain = MNIST5kDataModule(DataConfig(**base, augment=False))
    image = plain.train_dataset[0][0]
    assert torch.equal(image, plain.val_dataset.transform(plain.train_dataset.images[0]))
    shifted = MNIST5kDataModule(DataConfig(**base)).train_dataset
    torch.manual_seed(0)
    views = torch.stack([shifted[0][0] for _ in range(8)])
    assert not all(torch.equal(views[0], v) for v in views[1:])  # random shifts


def test_local_parquet_file(tmp_path: Path):
    path = _write_parquet(tmp_path / "tiny.parquet", n=30, classes=3)
    dm = build_datamodule(_cfg(tmp_path, path=str(path), calib_samples=16), make_tiny_vit())  # 1 x 28 x 28
    assert isinstance(dm, HFImageDataModule)
    dm.setup("fit")
    assert dm.num_classes == 3
    assert len(dm.train_dataset) == 24 and len(dm.val_dataset) == 6  # held out 20% of each class
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 28, 28) and labels.dtype == torch.int64  # RGB converted to L
    calib = list(dm.calibration_dataloader())
    assert sum(len(b[0]) for b in calib) == 16
    assert torch.equal(calib[0][0], next(iter(dm.calibration_dataloader()))[0])  # eval transform: deterministic
    dm2 = build_datamodule(_cfg(tmp_path, path=str(path), calib_samples=16), make_tiny_vit())
    assert torch.equal(dm.calibration_indices, dm2.calibration_indices)
    pickle.loads(pickle.dumps(dm))  # ddp_spawn and worker processes pickle the module


def test_parquet_directory_splits_and_calib_clamp(tmp_path: Path):
    folder = tmp_path / "pq"
    folder.mkdir()
    _write_parquet(folder / "train.parquet", n=12, columns=("image", "labels"))
    _write_parquet(folder / "test.parquet", n=6, columns=("image", "labels"))
    dm = build_datamodule(_cfg(tmp_path, path=str(folder), calib_samples=1024),
                          make_tiny_vit(img_size=32, patch_size=8, in_chans=3))
    with pytest.warns(UserWarning, match="all 12 training images"):
        dm.setup()
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 6 and len(dm.calibration_indices) == 12
    assert next(iter(dm.val_dataloader()))[0].shape == (6, 3, 32, 32)


def test_image_folder(tmp_path: Path):
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4 if split == "train" else 2):
                _pil(i + 10 * len(cls + split), size=(16, 16), mode="L").save(root / split / cls / f"{i}.png")
    model = make_tiny_vit(img_size=32, patch_size=8, in_chans=3, num_classes=2)
    dm = build_datamodule(_cfg(tmp_path, path=str(root), calib_samples=8), model)
    dm.setup()
    assert dm.num_classes == 2 and len(dm.train_dataset) == 8 and len(dm.val_dataset) == 4
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and sorted(labels.tolist()) == [0] * 4 + [1] * 4  # L converted to RGB
    with torch.no_grad():
        assert model(next(iter(dm.calibration_dataloader()))[0]).shape == (8, 2)


def test_missing_path_is_one_line(tmp_path: Path):
    with pytest.raises(DataNotFoundError) as err:
        build_datamodule(_cfg(tmp_path, path=str(tmp_path / "nowhere")), make_tiny_vit())
    message = _one_line(err)
    assert "nowhere" in message and "path=" in message and "name=" in message
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as err:
        build_datamodule(_cfg(tmp_path, path=str(tmp_path / "empty")), make_tiny_vit()).setup()
    assert "path=" in _one_line(err)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError, match="not a parquet file"):
        build_datamodule(_cfg(tmp_path, path=str(tmp_path / "notes.txt")))


def test_empty_split(tmp_path: Path):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"img": [], "label": []}, features=features).to_parquet(str(path))
    with pytest.raises(EmptySplitError, match="no images") as err:
        build_datamodule(_cfg(tmp_path, path=str(path))).setup()
    _one_line(err)
    with pytest.raises(ValueError, match="calibration subset cannot be empty"):
        DataConfig(name="mnist-5k", calib_samples=0)
    with pytest.raises(DataFormatError, match="no split 'dev'"):
        build_datamodule(_cfg(tmp_path, path=str(_write_parquet(tmp_path / "x.parquet", 6)), val_split="dev")).setup()


def test_imagenet_without_token_or_path_is_one_line_and_offline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("lowrank_vit.stages.data._stored_token", lambda: None)

    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset must not be called without a token or a path")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(DataNotFoundError) as err:
        build_datamodule(DataConfig(name="imagenet-1k"), make_tiny_vit())
    message = _one_line(err)
    assert "HF_TOKEN" in message and "path=" in message and "imagenet-1k" in message
    # with a token (or a path) the module builds; nothing is loaded until prepare_data/setup
    assert isinstance(build_datamodule(DataConfig(name="imagenet-1k", token="hf_x")), ImageNetDataModule)


def test_imagenet_local_path(tmp_path: Path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537", "n01484850"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                _pil(i, size=(40, 30)).save(root / split / cls / f"{i}.JPEG")
    dm = build_datamodule(_cfg(tmp_path, name="imagenet-1k", path=str(root), calib_samples=4), make_tiny_vit())
    assert isinstance(dm, ImageNetDataModule)
    dm.setup()
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 6 and dm.num_classes == 3


def test_imagenet_hub_parquet_shards(tmp_path: Path):
    """A local copy of the hub's ImageNet-1k as downloaded: data/{train,validation,test}-NNNNN-of-MMMMM.parquet,
    ``image`` and ``label`` (ClassLabel) columns, the test split unlabelled (-1). Every training shard is read, the
    validation split validates, the unlabelled test split is not used."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    data = tmp_path / "imagenet-1k" / "data"
    data.mkdir(parents=True)
    shards = {"train": [6, 5], "validation": [4], "test": [3]}
    seed = 0
    for split, sizes in shards.items():
        for index, n in enumerate(sizes):
            labels = [-1] * n if split == "test" else [(seed + i) % 3 for i in range(n)]
            images = [_pil(seed + i, size=(40, 30)) for i in range(n)]
            seed += n
            datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
                str(data / f"{split}-{index:05d}-of-{len(sizes):05d}.parquet"))
    dm = build_datamodule(_cfg(tmp_path, name="imagenet-1k", path=str(data.parent), calib_samples=4),
                          make_tiny_vit(img_size=32, patch_size=8, in_chans=3, num_classes=3))
    assert isinstance(dm, ImageNetDataModule)
    dm.setup()
    assert len(dm.train_dataset) == 11 and len(dm.val_dataset) == 4 and dm.num_classes == 3
    val_labels = torch.cat([labels for _, labels in dm.val_dataloader()])
    assert sorted(val_labels.tolist()) == sorted((11 + i) % 3 for i in range(4))  # the validation shard, labelled
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.min() >= 0


def test_hub_name_offline_is_one_line(tmp_path: Path):
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (the test must not reach the network)")
    dm = build_datamodule(_cfg(tmp_path, name="nobody/no-such-dataset"), make_tiny_vit())
    with pytest.raises(DataNotFoundError) as err:
        dm.setup()
    assert "no-such-dataset" in _one_line(err) and "path=" in str(err.value)


@pytest.mark.skipif(cifar10_dir() is None, reason="CIFAR-10 parquet files not present (set LOWRANK_VIT_CIFAR10)")
def test_cifar10_parquet_directory(tmp_path: Path):
    model = make_tiny_vit(img_size=32, patch_size=8, in_chans=3)
    dm = build_datamodule(_cfg(tmp_path, path=str(cifar10_dir()), batch_size=16), model)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 10 and len(dm.train_dataset) == 50_000 and len(dm.val_dataset) == 10_000
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    assert len(dm.calibration_indices) == 1024
    calib, _ = next(iter(dm.calibration_dataloader()))
    with torch.no_grad():
        assert model(calib).shape == (16, 10)


class Classifier(L.LightningModule):
    """A minimal LightningModule around a tiny ViT (top level, so that ddp_spawn can pickle it)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = make_tiny_vit().train()
        self.seen = 0
        self.record: Path | None = None

    def on_train_start(self) -> None:
        if self.record is not None:  # what this rank's sampler yields, for the DDP test
            sampler = self.trainer.train_dataloader.sampler
            indices = " ".join(map(str, sampler))
            (self.record / f"rank{self.global_rank}.txt").write_text(f"{type(sampler).__name__}\n{indices}")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        self.seen += len(labels)
        return torch.nn.functional.cross_entropy(self.model(images), labels)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.model(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), **kwargs)


def test_trainer_fit_with_mnist_module(tmp_path: Path):
    module = Classifier()
    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=16), module.model)
    trainer = _trainer(tmp_path, devices=1)
    trainer.fit(module, datamodule=dm)
    assert module.seen == 32 and "val_loss" in trainer.callback_metrics


@pytest.mark.slow
def test_ddp_spawn_shards_the_training_set(tmp_path: Path):
    module = Classifier()
    module.record = tmp_path
    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=16), module.model)
    _trainer(tmp_path, devices=2, strategy="ddp_spawn").fit(module, datamodule=dm)
    shards = []
    for rank in range(2):
        kind, indices = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert kind == "DistributedSampler"
        shards.append(set(map(int, indices.split())))
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(4000))  # Lightning's sampler, disjoint


@pytest.mark.parametrize("variable", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_the_hugging_face_token_is_read_from_either_environment_variable(variable, monkeypatch):
    """huggingface_hub reads both HF_TOKEN and the older HUGGING_FACE_HUB_TOKEN; a gated dataset (ImageNet) must work
    with either set, and an explicit token still wins over the environment."""
    from lowrank_vit.stages.data import resolve_token

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("lowrank_vit.stages.data._stored_token", lambda: None)
    assert resolve_token() is None
    monkeypatch.setenv(variable, "hf_from_env")
    assert resolve_token() == "hf_from_env"
    assert resolve_token("hf_given") == "hf_given"


def test_an_unreachable_hub_dataset_says_why(tmp_path):
    """Offline, an unknown or uncached hub dataset: the one-line error names the underlying failure (its type and
    text), which is what tells "offline" from "no such dataset" from "gated"."""
    datasets = pytest.importorskip("datasets")
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (the test must not reach the network)")
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, DataNotFoundError

    dm = build_datamodule(DataConfig(name="nobody/no-such-dataset", cache_dir=str(tmp_path / "hf_cache")),
                          make_tiny_vit())
    with pytest.raises(DataNotFoundError) as err:
        dm.setup()
    cause = err.value.__cause__
    assert cause is not None
    message = str(err.value)
    assert f"({type(cause).__name__}: " in message
    assert " ".join(str(cause).split())[:40] in message


@pytest.mark.usefixtures("_offline")
def test_imagenet_error_names_the_cli_override(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "full", "--output", str(tmp_path / "r"))
    assert code == 2 and "--set data.path=" in one_line_error(err)


def test_datamodule_uses_the_configured_normalization(workdir):
    """DataConfig's preprocessing fields reach the transform: with crop_pct 1 at the native size the image is only
    normalized, so each pixel is exactly (x / 255 - mean) / std."""
    from PIL import Image

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    cfg = DataConfig(path=str(workdir / "imgs"), img_size=IMAGE_SIZE, in_chans=3, mean=(0.2, 0.3, 0.4), std=(0.5,),
                     crop_pct=1.0, interpolation="bilinear", augment=False, calib_samples=1)
    dm = build_datamodule(cfg)
    dm.setup()
    assert dm.preprocessing["mean"] == (0.2, 0.3, 0.4) and dm.preprocessing["std"] == (0.5, 0.5, 0.5)
    image, label = dm.val_dataset[0]
    raw = dm.val_dataset.dataset.dataset[dm.val_dataset.indices[0]]["image"]
    expected = (torch.from_numpy(np.asarray(Image.open(raw["path"]) if isinstance(raw, dict) else raw)).float()
                .permute(2, 0, 1) / 255 - torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)) / 0.5
    assert torch.allclose(image, expected, atol=1e-5)
    with pytest.raises(ValueError, match="crop_pct"):
        DataConfig(path="x", crop_pct=1.5)
    with pytest.raises(ValueError, match="std"):
        DataConfig(path="x", std=(0.0,))


def test_a_limited_validation_loader_is_the_full_ones_first_images():
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=4, num_workers=0))
    dm.setup("fit")
    full = torch.cat([x for x, _ in dm.val_dataloader()])[:6]
    first = torch.cat([x for x, _ in dm.val_dataloader(limit=6)])
    assert first.shape[0] == 6 and torch.equal(first, full)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        dm.val_dataloader(limit=0)


@pytest.mark.parametrize("name", ["IMAGENET_NAMES", "INTERPOLATIONS", "PREPROCESSING_FIELDS", "IMAGE_SUFFIXES",
                                  "to_pil"])
def test_a_name_this_module_only_passed_on_is_imported_from_its_home_alone(name):
    """The five names this module once passed on from its neighbours (never released) are not kept here: each is
    imported from the module that defines it."""
    import importlib

    import lowrank_vit.stages.data as data

    homes = {"IMAGENET_NAMES": "data_config", "INTERPOLATIONS": "data_config", "PREPROCESSING_FIELDS": "data_config",
             "IMAGE_SUFFIXES": "data_readers", "to_pil": "data_transforms"}
    assert getattr(importlib.import_module(f"lowrank_vit.stages.{homes[name]}"), name) is not None
    with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
        getattr(data, name)


def test_a_name_the_data_module_never_had_is_an_attribute_error():
    import lowrank_vit.stages.data as data

    with pytest.raises(AttributeError, match="'lowrank_vit.stages.data' has no attribute 'DataSettings'"):
        data.DataSettings  # noqa: B018


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(("calib", "used", "warned"), [(3999, 3999, False), (4000, 4000, False), (4001, 4000, True)])
def test_calibration_warns_only_when_it_asks_for_more_images_than_training_holds(calib, used, warned):
    """MNIST-5k's training split holds 4,000 images (80% of 5,000): asking for exactly 4,000 uses them all without
    a warning; 4,001 uses the same 4,000 and says so."""
    import warnings

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=8, num_workers=0, calib_samples=calib, seed=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    assert len(dm.calibration_indices) == used and len(torch.unique(dm.calibration_indices)) == used
    assert any("calibration uses all 4000 training images" in str(w.message) for w in caught) is warned


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(("limit", "images"), [(1, 1), (999, 999), (1000, 1000), (1001, 1000)])
def test_a_validation_limit_at_and_past_the_split_size(limit, images):
    """MNIST-5k's validation hold-out is 1,000 images: a limit of 1 is valid, one past the split gives the split."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=8, num_workers=0))
    dm.setup("fit")
    assert len(dm.val_dataloader(limit=limit).dataset) == images


@pytest.mark.usefixtures("offline")
def test_a_training_split_with_rows_without_labels_is_refused_naming_it(monkeypatch):
    """A hub dataset whose training split has null labels (a split published with its labels withheld): the refusal
    names the split and the data, counts the rows, and says what to set."""
    images = [_pil(i, size=(8, 8)) for i in range(4)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"img": images, "label": [0, None, 1, 0]},
                                                                       features=features)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: splits)
    dm = build_datamodule(DataConfig(name="someone/dataset", img_size=8, batch_size=2, num_workers=0))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert str(info.value) == ("the 'train' split of 'someone/dataset' has 1 of 4 rows without a label in column "
                               "'label' (labels withheld, as in a published test split): set val_split= or "
                               "train_split= to a labelled split")


def test_the_digits_read_without_labels_are_the_same_split_with_bare_image_batches():
    """labels="none" on the embedded digits: no labels, no classes, batches of images alone; the split is the one a
    labelled read makes (the labels only stratify it)."""
    unlabelled = MNIST5kDataModule(DataConfig(name="mnist-5k", labels="none", batch_size=8, augment=False))
    labelled = MNIST5kDataModule(DataConfig(name="mnist-5k", batch_size=8, augment=False))
    assert not unlabelled.labelled and unlabelled.num_classes == 0 and labelled.num_classes == 10
    batch = next(iter(unlabelled.val_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (8, 1, 28, 28)
    assert isinstance(next(iter(unlabelled.train_dataloader())), torch.Tensor)
    assert torch.equal(batch, next(iter(labelled.val_dataloader()))[0])
    assert torch.equal(unlabelled.train_dataset.images, labelled.train_dataset.images)
