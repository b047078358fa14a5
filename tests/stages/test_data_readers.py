"""Tests of lowrank_vit/stages/data_readers.py."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lowrank_vit.stages.data import MNIST5kDataModule, build_datamodule
from lowrank_vit.stages.data_config import DataConfig, DataFormatError, DataNotFoundError
from lowrank_vit.stages.data_readers import load_mnist_5k, stratified_split
from tests.helpers import (
    _cfg,
    _one_line,
    _parquet,
    _write_parquet,
    make_tiny_vit,
)


@pytest.mark.usefixtures('one_thread')
def test_the_unlabelled_hold_out_is_seeded_and_never_empties_a_side():
    from lowrank_vit.stages.data_readers import random_split

    train, val = random_split(20, 0.2, 0)
    assert len(val) == 4 and len(train) == 16 and sorted(torch.cat([train, val]).tolist()) == list(range(20))
    assert torch.equal(random_split(20, 0.2, 0)[1], val) and not torch.equal(random_split(20, 0.2, 1)[1], val)
    assert [len(v) for _, v in (random_split(2, 0.2, 0), random_split(3, 0.9, 0), random_split(1, 0.2, 0))] == [1, 2, 0]


@pytest.mark.usefixtures("offline")
def test_a_ground_truth_file_names_what_it_lacks_as_a_list(tmp_path):
    from lowrank_vit.stages.data_config import DataFormatError
    from lowrank_vit.stages.data_readers import read_val_labels

    images = [tmp_path / f"{c}.png" for c in "abcde"]
    csv = tmp_path / "truth.csv"
    csv.write_text("filename,label\ne.png,cat\n")
    with pytest.raises(DataFormatError) as info:
        read_val_labels(csv, images, ["cat", "dog"])
    assert str(info.value).endswith("has no label for 4 of the 5 images (e.g. a.png, b.png, c.png)")
    lines = tmp_path / "truth.txt"
    lines.write_text("cat\ndog\nowl\nfish\nyak\n")
    with pytest.raises(DataFormatError) as info:
        read_val_labels(lines, images, ["ant", "bee", "cat", "dog"])
    assert str(info.value).endswith("label 'owl' of c.png is neither a class index nor one of the training folder's "
                                    "classes (ant, bee, cat...)")


@pytest.mark.usefixtures("offline")
def test_a_label_column_the_data_lacks_is_refused_naming_the_data(tmp_path):
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    _parquet(tmp_path / "d" / "train.parquet", [0, 1])
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0,
                                     label_column="nope", cache_dir=str(tmp_path / "hf")))
    with pytest.raises(ValueError) as info:
        dm.setup()
    assert str(info.value) == (f"{str(tmp_path / 'd')!r} has no label column 'nope'; its columns are ['img', "
                               f"'label']: set label_column= to one of them")


@pytest.mark.usefixtures("offline")
def test_val_labels_without_a_validation_folder_says_where_to_put_the_images(tmp_path):
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError
    from lowrank_vit.stages.data_readers import flat_val_dir

    (tmp_path / "train").mkdir()
    with pytest.raises(DataFormatError) as info:
        flat_val_dir(tmp_path, DataConfig(path=str(tmp_path), val_split="val", val_labels="labels.txt"))
    assert str(info.value) == (f"val_labels= is the ground truth of a flat validation folder, but {str(tmp_path)!r} "
                               f"has none of ['val']: put the validation images in {str(tmp_path / 'val')!r}")


@pytest.mark.usefixtures("offline")
def test_an_empty_flat_validation_folder_is_named(tmp_path):
    from PIL import Image

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, EmptySplitError

    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / label / "0.png")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "notes.txt").write_text("no images here")
    (tmp_path / "labels.txt").write_text("")
    dm = build_datamodule(DataConfig(path=str(tmp_path), val_labels=str(tmp_path / "labels.txt"), img_size=8,
                                     batch_size=2, num_workers=0))
    with pytest.raises(EmptySplitError) as info:
        dm.setup()
    assert str(info.value) == f"the flat validation folder {str(tmp_path / 'val')!r} has no images"


@pytest.mark.usefixtures("offline")
def test_a_stratified_split_holds_out_the_first_of_each_class_in_the_seeds_order():
    """Without a validation split, the held-out images of each class are the first round(fraction * n_c) of that
    class in the order of the seed's permutation, on any machine: computed here class by class in plain Python. (An
    unstable sort would pick others: torch's unstable CPU sort reorders ties at this size.)"""
    from lowrank_vit.stages.data_readers import stratified_split

    labels = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(7)).tolist()
    held = []
    for c in range(3):
        members = [i for i in perm if labels[i] == c]
        held += members[:round(0.25 * len(members))]
    train, val = stratified_split(labels, 0.25, seed=7)
    assert val.tolist() == sorted(held)
    assert train.tolist() == sorted(set(range(200)) - set(held))


@pytest.mark.usefixtures("offline")
def test_labels_are_read_as_int64_whatever_integer_type_the_file_stores(tmp_path):
    """`label_array` promises int64 (uint8 labels cannot hold the -1 an empty split's maximum starts from)."""
    import datasets

    from lowrank_vit.stages.data_readers import label_array

    for dtype in ("uint8", "int16", "int32"):
        ds = datasets.Dataset.from_dict({"label": [0, 2, 1]}, features=datasets.Features({"label":
                                                                                          datasets.Value(dtype)}))
        labels = label_array(ds, "label")
        assert labels.dtype == np.int64 and labels.tolist() == [0, 2, 1]


def test_mnist_5k_decoded_once():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert load_mnist_5k()[0] is images  # cached in memory, not decoded again


def test_stratified_split_holds_out_the_rounded_share_of_every_class():
    """round(fraction * n_c) items of every class c are held out: at 10%, classes of 7, 14, 3 and 16 items hold out
    1 (0.7 rounds up), 1 (1.4), 0 (0.3) and 2 (1.6)."""
    labels = torch.tensor([0] * 7 + [1] * 14 + [2] * 3 + [3] * 16)
    train, val = stratified_split(labels, 0.1, seed=0)
    held = torch.bincount(labels[val], minlength=4).tolist()
    assert held == [1, 1, 0, 2]
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(labels)))


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


@pytest.mark.parametrize(("n", "fraction", "held"), [
    (10, 0.35, 4),  # 3.5 rounds to 4 (not 3: not rounded down)
    (10, 0.25, 2),  # 2.5 rounds to 2 (Python's round, half to even; not 3)
    (10, 0.27, 3),  # 2.7 -> 3
    (10, 0.05, 1),  # 0.5 -> 0, raised to the one image the hold-out needs
    (10, 0.95, 9),  # 9.5 -> 10, lowered to leave one image to train on
    (2, 0.5, 1), (2, 0.99, 1), (1, 0.5, 0),  # the smallest data: one each side; one image: nothing held out
])
def test_the_unlabelled_hold_out_rounds_to_the_nearest_count_within_one_and_n_minus_one(n, fraction, held):
    from lowrank_vit.stages.data_readers import random_split

    train, val = random_split(n, fraction, 3)
    assert len(val) == held and len(train) == n - held
    assert sorted(torch.cat([train, val]).tolist()) == list(range(n))


def test_a_stratified_split_rounds_each_class_count_to_the_nearest():
    """Classes of 14, 10, 5 and 1 images at 0.25: 3.5 -> 4, 2.5 -> 2 (half to even), 1.25 -> 1, 0.25 -> 0 (a class of
    one image stays whole in training)."""
    labels = torch.tensor([0] * 14 + [1] * 10 + [2] * 5 + [3])[torch.randperm(30, generator=torch.Generator()
                                                                              .manual_seed(2))]
    train, val = stratified_split(labels, 0.25, seed=5)
    assert torch.bincount(labels[val], minlength=4).tolist() == [4, 2, 1, 0]
    assert sorted(torch.cat([train, val]).tolist()) == list(range(30))


def test_a_csv_header_row_is_not_read_as_a_label(tmp_path: Path):
    """A ``filename,label`` header (any case, spaces around the comma) is skipped: it is not the label of an image
    whose name is ``filename``, which the file lacks and which is reported as such."""
    from lowrank_vit.stages.data_readers import read_val_labels

    images = [tmp_path / name for name in ("a.png", "b.png", "filename.png")]
    truth = tmp_path / "truth.csv"
    truth.write_text("FileName, Label\na.png,dog\nb,0\nfilename.png,dog\n")
    assert read_val_labels(truth, images, ["cat", "dog"]) == [1, 0, 1]
    truth.write_text("filename,label\na.png,dog\nb.png,cat\n")
    with pytest.raises(DataFormatError) as info:
        read_val_labels(truth, images, ["cat", "dog"])
    assert str(info.value) == f"val_labels file {str(truth)!r} has no label for 1 of the 3 images (e.g. filename.png)"
