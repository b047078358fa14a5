"""Tests of lowrank_vit/cli/densecache.py."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    ARCH,
    IMAGE_SIZE,
    ONE_BLOCK_KWARGS,
    _cache_args,
    _compress_checkpoint,
    _report,
    _source,
)


@pytest.mark.usefixtures("offline")
def test_a_dense_top1_that_cannot_be_cached_leaves_no_temporary_file(tmp_path, capsys):
    """The cache file's place is taken (here by a folder): said on stderr, the command goes on, and the temporary
    file written beside it is gone."""
    from lowrank_vit.cli.densecache import _write_cached_accuracy

    folder = tmp_path / "dense"
    target = folder / "vit-0123.json"
    target.mkdir(parents=True)
    _write_cached_accuracy(argparse.Namespace(quiet=False), target, {"k": 1},
                           {"top1": 50.0, "top5": 100.0, "images": 12})
    assert "the dense model's top-1 was not cached (IsADirectoryError" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["vit-0123.json"]


@pytest.mark.usefixtures("offline")
def test_the_data_stamp_of_a_folder_of_splits_sees_a_class_folder_change(tmp_path):
    """A folder of splits (``train/<class>/``, ``validation/<class>/``): the stamp lists the class folders one level
    down by their relative names, and a file added to one changes it (the cached dense top-1 is then not reused)."""
    from lowrank_vit.cli.densecache import _data_stamp

    for split in ("train", "validation"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            (tmp_path / split / label / "0.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hello")
    rows = _data_stamp(tmp_path)
    assert [row[0] for row in rows] == [".", "notes.txt", "train", "train/a", "train/b", "validation",
                                        "validation/a", "validation/b"]
    assert rows[1][1] == 5  # a file's size
    before = {row[0]: row for row in rows}
    (tmp_path / "validation" / "b" / "1.png").write_bytes(b"y")
    os.utime(tmp_path / "validation" / "b", ns=(0, before["validation/b"][2] + 10**9))  # coarse clocks: move it
    after = {row[0]: row for row in _data_stamp(tmp_path)}
    assert after["validation/b"] != before["validation/b"]
    assert after["train/a"] == before["train/a"]


@pytest.mark.usefixtures("offline")
def test_a_model_directorys_weights_key_the_dense_cache_by_their_digest(tmp_path):
    """A model directory: the dense accuracy is cached under the SHA-256 of its model.safetensors."""
    from types import SimpleNamespace

    from lowrank_vit.cli.densecache import _weights_sha256

    (tmp_path / "model.safetensors").write_bytes(b"some weights")
    source = SimpleNamespace(record={"directory": str(tmp_path)})
    assert _weights_sha256(source) == hashlib.sha256(b"some weights").hexdigest()
    assert _weights_sha256(SimpleNamespace(record={"directory": str(tmp_path / "none")})) is None


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("quiet", [False, True])
def test_a_reused_dense_accuracy_is_said_unless_quiet(quiet, capsys, monkeypatch, tmp_path):
    from lowrank_vit.cli import densecache

    where = tmp_path / "entry.json"
    monkeypatch.setattr(densecache, "_dense_cache_entry", lambda *a: (where, {}))
    monkeypatch.setattr(densecache, "_read_cached_accuracy", lambda *a: {"top1": 12.345})
    args = argparse.Namespace(quiet=quiet, no_cache=False)
    metrics, path = densecache.cached_dense_accuracy(args, None, {}, None, None, torch.device("cpu"))
    assert (metrics, path) == ({"top1": 12.345}, where)
    err = capsys.readouterr().err
    assert err == ("" if quiet else f"dense model: top-1 12.35% reused from the cache ({where}); --no-cache "
                                    f"evaluates it again\n")


@pytest.mark.usefixtures("offline")
def test_the_dense_cache_key_names_the_data_it_was_measured_on(tmp_path):
    """A local folder is keyed by its absolute path (two copies of one folder are two entries), a dataset name by
    the name as typed."""
    from lowrank_vit.cli.densecache import _dense_cache_entry

    folder = tmp_path / "imgs"
    folder.mkdir()
    cpu = torch.device("cpu")
    _, key = _dense_cache_entry(_cache_args(str(folder)), _source(), {}, cpu)
    assert key["data"]["path"] == str(folder.resolve())
    _, key = _dense_cache_entry(_cache_args("someone/dataset"), _source(), {}, cpu)
    assert key["data"] == {"name": "someone/dataset"}


@pytest.mark.usefixtures("offline")
def test_the_dense_cache_file_is_named_after_the_architecture_made_safe(tmp_path):
    """The file name starts with the architecture, each character a file name cannot safely hold replaced by one
    underscore, then a 24-digit hex digest."""
    import re

    from lowrank_vit.cli.densecache import _dense_cache_entry

    path, _ = _dense_cache_entry(_cache_args("someone/dataset"), _source("hf-hub:timm/vit tiny"), {},
                                 torch.device("cpu"))
    assert re.fullmatch(r"hf-hub_timm_vit_tiny-[0-9a-f]{24}\.json", path.name), path.name


@pytest.mark.usefixtures("offline")
def test_the_dense_model_is_evaluated_on_the_device_the_command_chose(monkeypatch, tmp_path):
    from lowrank_vit.cli import densecache

    seen = []
    monkeypatch.setattr(densecache, "_dense_cache_entry", lambda *a: None)
    monkeypatch.setattr(densecache, "evaluate_on_user_data",
                        lambda model, dm, device, args, desc: seen.append(device) or {})
    device = torch.device("meta")
    densecache.cached_dense_accuracy(argparse.Namespace(no_cache=False), _source(), {}, torch.nn.Identity(), None,
                                     device)
    assert seen == [device]


@pytest.mark.usefixtures("offline")
def test_the_dense_cache_key_holds_everything_the_accuracy_depends_on(tmp_path):
    """Entry by entry, what the cache's docs list: the weights' content, the model's name and arguments, the data
    (a folder by its path and stamp) and its splits and columns, the preprocessing, --limit, the device type and the
    library versions. A dependency missing from the key would let one model's figure stand for another's."""
    import timm

    from lowrank_vit import __version__
    from lowrank_vit.cli.densecache import _data_stamp, _dense_cache_entry

    folder = tmp_path / "imgs"
    folder.mkdir()
    args = argparse.Namespace(data=str(folder), limit=7, train_split="tr", val_split="va", image_column="img",
                              label_column="y")
    _, key = _dense_cache_entry(args, _source(), {"mean": (0.1, 0.2, 0.3)}, torch.device("cpu"))
    assert key == {
        "weights_sha256": "ab" * 32,
        "architecture": ARCH,
        "model": {"timm_name": ARCH, "model_kwargs": ONE_BLOCK_KWARGS},
        "data": {"path": str(folder.resolve()), "stamp": _data_stamp(folder)},
        "splits": {"train_split": "tr", "val_split": "va", "image_column": "img", "label_column": "y"},
        "preprocessing": {"mean": [0.1, 0.2, 0.3]},
        "limit": 7,
        "device": "cpu",
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "lowrank_vit": __version__},
    }


@pytest.mark.usefixtures("offline")
def test_a_cached_accuracy_is_reused_only_under_its_own_key_and_whole(tmp_path):
    """A cache file is read back only if the key stored in it is the one asked for, and its top-1, top-5 and image
    count are numbers: anything else (another key, a hand-edited figure) is evaluated again."""
    import json

    from lowrank_vit.cli.densecache import _read_cached_accuracy

    path = tmp_path / "entry.json"
    good = {"top1": 71.5, "top5": 90.0, "images": 50}
    for stored, read in (
        ({"key": {"a": 1}, "accuracy": good}, good),
        ({"key": {"a": 2}, "accuracy": good}, None),
        ({"key": {"a": 1}, "accuracy": {**good, "top1": "n/a"}}, None),
        ([{"a": 1}, good], None),
    ):
        path.write_text(json.dumps(stored))
        assert _read_cached_accuracy(path, {"a": 1}) == read, stored


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("quiet", [False, True])
def test_a_dense_accuracy_that_cannot_be_cached_is_said_unless_quiet(quiet, capsys, monkeypatch, tmp_path):
    """The cache's folder cannot be made (a file is in the way): the figure is still returned, and a note says
    it was not cached, except under --quiet."""
    from lowrank_vit.cli import densecache

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(densecache, "_dense_cache_entry", lambda *a: (tmp_path / "file" / "entry.json", {}))
    monkeypatch.setattr(densecache, "evaluate_on_user_data", lambda *a: {"top1": 50.0})
    metrics, reused = densecache.cached_dense_accuracy(
        argparse.Namespace(quiet=quiet, no_cache=False), None, {}, None, None, torch.device("cpu")
    )
    assert (metrics, reused) == ({"top1": 50.0}, None)
    err = capsys.readouterr().err
    assert (err == "") if quiet else err.startswith("the dense model's top-1 was not cached (")


@pytest.mark.usefixtures("offline")
def test_the_dense_cache_file_does_not_depend_on_the_order_the_preprocessing_was_given_in(tmp_path):
    """The same preprocessing in another order (a checkpoint's metadata, a directory's plan) is the same entry."""
    from lowrank_vit.cli.densecache import _dense_cache_entry

    args = _cache_args("someone/dataset")
    one = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "crop_pct": 0.9}
    other = dict(reversed(list(one.items())))
    cpu = torch.device("cpu")
    assert _dense_cache_entry(args, _source(), one, cpu)[0] == _dense_cache_entry(args, _source(), other, cpu)[0]


def test_a_second_compress_reuses_the_dense_top1_and_says_so(
    class_folder, plain_checkpoint, cache, evaluations, tmp_path, capsys
):
    code, _, err = _compress_checkpoint(
        capsys, class_folder, plain_checkpoint, tmp_path / "a", "--preprocessing", "timm"
    )
    assert code == 0, err
    assert evaluations == ["evaluate dense", "evaluate compressed"]
    first = _report(tmp_path / "a")
    assert "dense_accuracy_cache" not in first
    assert len(list((cache / "dense").glob("*.json"))) == 1

    evaluations.clear()
    code, out, err = _compress_checkpoint(
        capsys, class_folder, plain_checkpoint, tmp_path / "b", "--preprocessing", "timm"
    )
    assert code == 0, err
    assert evaluations == ["evaluate compressed"]  # the dense model was not evaluated again
    second = _report(tmp_path / "b")
    assert second["accuracy"]["before"] == first["accuracy"]["before"]
    cached = second["dense_accuracy_cache"]
    assert Path(cached).parent == cache / "dense"
    # never silent: stderr says the figure was reused and from which file
    assert any("reused from the cache" in line and cached in line for line in err.splitlines()), err
    assert f"top-1 {first['accuracy']['before']['top1']:.2f} -> " in out

    evaluations.clear()  # --no-cache: evaluated again (and the figure cached anew)
    code, _, err = _compress_checkpoint(
        capsys, class_folder, plain_checkpoint, tmp_path / "c", "--preprocessing", "timm", "--no-cache"
    )
    assert code == 0, err
    assert evaluations == ["evaluate dense", "evaluate compressed"]
    assert "reused from the cache" not in err


def test_other_preprocessing_misses_the_cache(class_folder, plain_checkpoint, cache, evaluations, tmp_path, capsys):
    assert (
        _compress_checkpoint(capsys, class_folder, plain_checkpoint, tmp_path / "a", "--preprocessing", "timm")[0] == 0
    )
    evaluations.clear()
    code, _, err = _compress_checkpoint(
        capsys, class_folder, plain_checkpoint, tmp_path / "b", "--mean", "0.4", "--std", "0.3"
    )
    assert code == 0, err
    assert evaluations == ["evaluate dense", "evaluate compressed"]
    assert "reused from the cache" not in err
    assert len(list((cache / "dense").glob("*.json"))) == 2


def _entry(args: argparse.Namespace, pre: dict, device: str = "cpu", digest: str = "ab" * 32):
    from lowrank_vit.cli.densecache import _dense_cache_entry
    from lowrank_vit.cli.sources import Source

    source = Source(
        torch.nn.Identity(),
        ARCH,
        f"timm {ARCH}, your checkpoint",
        record={"timm_name": ARCH, "model_kwargs": ONE_BLOCK_KWARGS, "checkpoint_sha256": digest},
    )
    return _dense_cache_entry(args, source, pre, torch.device(device))


def test_the_cache_key_holds_everything_the_dense_top1_depends_on(class_folder, cache, tmp_path):
    """A changed --limit, mean, std, data folder, split, device or weights file is another cache file; the same
    inputs are the same file."""
    import shutil

    args = argparse.Namespace(
        data=str(class_folder), limit=None, train_split="train", val_split=None, image_column=None, label_column=None
    )
    pre = {"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    path, key = _entry(args, pre)
    assert path.parent == cache / "dense" and _entry(args, pre) == (path, key)
    others = [
        _entry(argparse.Namespace(**{**vars(args), "limit": 2}), pre),
        _entry(argparse.Namespace(**{**vars(args), "val_split": "test"}), pre),
        _entry(args, {**pre, "mean": [0.4] * 3}),
        _entry(args, {**pre, "std": [0.3] * 3}),
        _entry(args, pre, device="meta"),
        _entry(args, pre, digest="cd" * 32),
        _entry(argparse.Namespace(**{**vars(args), "data": "someone/dataset"}), pre),
    ]
    assert len({p for p, _ in others} | {path}) == len(others) + 1
    copy = tmp_path / "imgs"
    shutil.copytree(class_folder, copy)
    copied = _entry(argparse.Namespace(**{**vars(args), "data": str(copy)}), pre)[0]
    (copy / "class0" / "new.png").write_bytes((class_folder / "class0" / "0.png").read_bytes())  # an image added
    assert _entry(argparse.Namespace(**{**vars(args), "data": str(copy)}), pre)[0] != copied


def test_random_weights_are_never_cached(class_folder, cache):
    from lowrank_vit.cli.densecache import _dense_cache_entry
    from lowrank_vit.cli.sources import Source

    args = argparse.Namespace(
        data=str(class_folder), limit=None, train_split="train", val_split=None, image_column=None, label_column=None
    )
    random = Source(
        torch.nn.Identity(),
        ARCH,
        f"timm {ARCH}, random weights",
        record={
            "timm_name": ARCH,
            "model_kwargs": ONE_BLOCK_KWARGS,
            "pretrained": False,
            "plain_checkpoint": None,
            "checkpoint_sha256": None,
        },
    )
    assert _dense_cache_entry(args, random, {"mean": [0.5]}, torch.device("cpu")) is None


def test_an_unwritable_cache_never_fails_compress(
    class_folder, plain_checkpoint, evaluations, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(blocker))
    code, _, err = _compress_checkpoint(
        capsys, class_folder, plain_checkpoint, tmp_path / "a", "--preprocessing", "timm"
    )
    assert code == 0, err
    assert evaluations == ["evaluate dense", "evaluate compressed"]
    assert "was not cached" in err and "Traceback" not in err
    assert blocker.read_text() == "a file where the cache folder would go"
