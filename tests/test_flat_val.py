"""The original ILSVRC2012 layout: ``train/<synset>/`` class folders beside a flat ``val/`` folder of images whose
labels come from a ground-truth file (``DataConfig.val_labels``): one label per line in sorted file name order, or a
CSV of ``filename,label``; labels as 0-based indices in the sorted synset order or as synset names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lowrank_vit.stages.data import DataConfig, DataFormatError, DataNotFoundError, build_datamodule

from conftest import make_tiny_vit

pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

SYNSETS = ("n01440764", "n01443537", "n01484850")


def _image(value: int) -> Image.Image:
    """A uniform image whose grey level says which class it belongs to (so a test can check every label)."""
    return Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8))


LEVELS = (10, 120, 240)
"""The grey level of each class's images."""


def _flat_copy(tmp_path: Path, val_classes: list[int]) -> Path:
    root = tmp_path / "imagenet"
    for c, synset in enumerate(SYNSETS):
        (root / "train" / synset).mkdir(parents=True)
        for i in range(2):
            _image(LEVELS[c]).save(root / "train" / synset / f"{synset}_{i}.JPEG")
    (root / "val").mkdir()
    for i, c in enumerate(val_classes):  # sorted names: ILSVRC2012_val_00000001.JPEG, ...
        _image(LEVELS[c]).save(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    return root


def _module(tmp_path: Path, root: Path, labels: Path, **kwargs):
    cfg = DataConfig(name="imagenet-1k", path=str(root), val_labels=str(labels), batch_size=8, calib_samples=4,
                     cache_dir=str(tmp_path / "hf_cache"), crop_pct=1.0, **kwargs)
    return build_datamodule(cfg, make_tiny_vit(img_size=32, patch_size=8, in_chans=3, num_classes=3))


def _val_pairs(dm) -> list[tuple[int, int]]:
    """(grey level class, label) of every validation image, in loader order."""
    pairs = []
    for images, labels in dm.val_dataloader():
        means = images.mean(dim=(1, 2, 3))  # normalized grey: monotone in the level
        pairs += list(zip(means.tolist(), labels.tolist(), strict=True))
    order = sorted({round(m, 3) for m, _ in pairs})
    return [(order.index(round(m, 3)), label) for m, label in pairs]


def test_flat_val_with_one_label_per_line(tmp_path: Path):
    val_classes = [2, 0, 1, 1, 0]
    root = _flat_copy(tmp_path, val_classes)
    labels = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    labels.write_text("".join(f"{c}\n" for c in val_classes))
    dm = _module(tmp_path, root, labels)
    dm.setup()
    assert dm.num_classes == 3 and len(dm.train_dataset) == 6 and len(dm.val_dataset) == 5
    assert _val_pairs(dm) == [(c, c) for c in val_classes]  # every image got its own class
    images, _ = next(iter(dm.calibration_dataloader()))
    assert images.shape == (4, 3, 32, 32)


def test_flat_val_with_csv_of_synset_names(tmp_path: Path):
    val_classes = [1, 2, 0]
    root = _flat_copy(tmp_path, val_classes)
    labels = tmp_path / "val.csv"
    rows = [f"ILSVRC2012_val_{i + 1:08d},{SYNSETS[c]}" for i, c in enumerate(val_classes)]
    labels.write_text("filename,label\n" + "\n".join(reversed(rows)) + "\n")  # any order; names without suffix
    dm = _module(tmp_path, root, labels)
    dm.setup()
    assert _val_pairs(dm) == [(c, c) for c in val_classes]


def test_flat_val_errors(tmp_path: Path):
    root = _flat_copy(tmp_path, [0, 1, 2])
    short = tmp_path / "short.txt"
    short.write_text("0\n1\n")
    with pytest.raises(DataFormatError, match="2 labels for the 3 images"):
        _module(tmp_path, root, short).setup()
    devkit = tmp_path / "devkit.txt"
    devkit.write_text("1\n2\n3\n")  # the devkit's 1-based ids: 3 is out of range for three classes
    with pytest.raises(DataFormatError, match="devkit"):
        _module(tmp_path, root, devkit).setup()
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("0\nn99999999\n1\n")
    with pytest.raises(DataFormatError, match="'n99999999'"):
        _module(tmp_path, root, unknown).setup()
    with pytest.raises(DataNotFoundError, match="does not exist"):
        _module(tmp_path, root, tmp_path / "missing.txt").setup()
    csv = tmp_path / "partial.csv"
    csv.write_text("ILSVRC2012_val_00000001.JPEG,0\n")
    with pytest.raises(DataFormatError, match="no label for 2 of the 3 images"):
        _module(tmp_path, root, csv).setup()
    # a flat val folder without its ground truth: refused, not read as unlabelled images
    cfg = DataConfig(name="imagenet-1k", path=str(root), batch_size=8, cache_dir=str(tmp_path / "hf_cache"))
    with pytest.raises(DataFormatError, match="data.val_labels=FILE"):
        build_datamodule(cfg, make_tiny_vit(img_size=32, patch_size=8, in_chans=3, num_classes=3)).setup()
    with pytest.raises(ValueError, match="needs path="):
        DataConfig(name="imagenet-1k", val_labels="labels.txt")


def test_val_labels_on_a_folder_with_class_subfolders_is_refused(tmp_path: Path):
    root = tmp_path / "folder"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        _image(5).save(root / split / "a" / "0.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n")
    cfg = DataConfig(path=str(root), val_labels=str(labels), cache_dir=str(tmp_path / "hf_cache"))
    with pytest.raises(DataFormatError, match="class subfolders"):
        build_datamodule(cfg, make_tiny_vit(img_size=32, patch_size=8, in_chans=3, num_classes=3)).setup()
