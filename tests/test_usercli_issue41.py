"""The user commands fail fast and do not repeat work: ``compress`` reuses the dense model's top-1 from a cache (or
skips it with ``--no-dense-eval``), a ``--data`` that can only be a missing local path and an existing ``--output``
are refused before any model is built, and timm pretrained weights that an offline machine has not cached are
refused at once, by name. Tiny timm ViTs (pretrained=False) and a generated image folder, in-process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from conftest import cli, one_line_error, write_image_folder

ARCH = "vit_tiny_patch16_224"
KWARGS = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
CLASSES, PER_CLASS, SIZE = 3, 5, 32


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """An image folder: one subfolder per class, RGB 32x32 PNGs whose brightness depends on the class."""
    return write_image_folder(tmp_path_factory.mktemp("issue41_imgs"), CLASSES, PER_CLASS, SIZE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The user's own weights for the tiny architecture (no preprocessing in them: --preprocessing timm or flags)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **KWARGS)
    path = tmp_path_factory.mktemp("issue41_ckpt") / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own (the latency tables' variable moves the dense top-1 cache too)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(root))
    return root


@pytest.fixture
def evaluations(monkeypatch) -> list[str]:
    """The ``desc`` of every evaluation the commands run, in order (the evaluations themselves still run)."""
    from lowrank_vit.cli import compress as usercli
    from lowrank_vit.cli import data as userdata
    from lowrank_vit.cli import densecache

    seen: list[str] = []
    real = userdata.evaluate_on_user_data

    def counting(model, dm, device, args, desc):
        seen.append(desc)
        return real(model, dm, device, args, desc)

    for module in (densecache, usercli):  # the dense evaluation and the compressed model's
        monkeypatch.setattr(module, "evaluate_on_user_data", counting)
    return seen


def _compress(capsys, images: Path, checkpoint: Path, output: Path, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "compress", ARCH, "--checkpoint", str(checkpoint), "--model-kwargs", json.dumps(KWARGS),
               "--input-size", str(SIZE), "--data", str(images), "--workers", "0", "--calib-samples", "8",
               "--reduction", "0.3", "--recipe", "vanilla", "--device", "cpu", "--output", str(output),
               *map(str, extra))


def _report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


# ------------------------------------------------------------------------------------------- dense top-1 cache


def test_a_second_compress_reuses_the_dense_top1_and_says_so(images, checkpoint, cache, evaluations, tmp_path,
                                                             capsys):
    code, _, err = _compress(capsys, images, checkpoint, tmp_path / "a", "--preprocessing", "timm")
    assert code == 0, err
    assert evaluations == ["evaluate dense", "evaluate compressed"]
    first = _report(tmp_path / "a")
    assert "dense_accuracy_cache" not in first
    assert len(list((cache / "dense").glob("*.json"))) == 1

    evaluations.clear()
    code, out, err = _compress(capsys, images, checkpoint, tmp_path / "b", "--preprocessing", "timm")
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
    code, _, err = _compress(capsys, images, checkpoint, tmp_path / "c", "--preprocessing", "timm", "--no-cache")
    assert code == 0, err
    assert evaluations == ["evaluate dense", "evaluate compressed"]
    assert "reused from the cache" not in err


def test_other_preprocessing_misses_the_cache(images, checkpoint, cache, evaluations, tmp_path, capsys):
    assert _compress(capsys, images, checkpoint, tmp_path / "a", "--preprocessing", "timm")[0] == 0
    evaluations.clear()
    code, _, err = _compress(capsys, images, checkpoint, tmp_path / "b", "--mean", "0.4", "--std", "0.3")
    assert code == 0, err
    assert evaluations == ["evaluate dense", "evaluate compressed"]
    assert "reused from the cache" not in err
    assert len(list((cache / "dense").glob("*.json"))) == 2


def _entry(args: argparse.Namespace, pre: dict, device: str = "cpu", digest: str = "ab" * 32):
    from lowrank_vit.cli.densecache import _dense_cache_entry
    from lowrank_vit.cli.sources import Source

    source = Source(torch.nn.Identity(), ARCH, f"timm {ARCH}, your checkpoint",
                    record={"timm_name": ARCH, "model_kwargs": KWARGS, "checkpoint_sha256": digest})
    return _dense_cache_entry(args, source, pre, torch.device(device))


def test_the_cache_key_holds_everything_the_dense_top1_depends_on(images, cache, tmp_path):
    """A changed --limit, mean, std, data folder, split, device or weights file is another cache file; the same
    inputs are the same file."""
    import shutil

    args = argparse.Namespace(data=str(images), limit=None, train_split="train", val_split=None, image_column=None,
                              label_column=None)
    pre = {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    path, key = _entry(args, pre)
    assert path.parent == cache / "dense" and _entry(args, pre) == (path, key)
    others = [_entry(argparse.Namespace(**{**vars(args), "limit": 2}), pre),
              _entry(argparse.Namespace(**{**vars(args), "val_split": "test"}), pre),
              _entry(args, {**pre, "mean": [0.4] * 3}),
              _entry(args, {**pre, "std": [0.3] * 3}),
              _entry(args, pre, device="meta"),
              _entry(args, pre, digest="cd" * 32),
              _entry(argparse.Namespace(**{**vars(args), "data": "someone/dataset"}), pre)]
    assert len({p for p, _ in others} | {path}) == len(others) + 1
    copy = tmp_path / "imgs"
    shutil.copytree(images, copy)
    copied = _entry(argparse.Namespace(**{**vars(args), "data": str(copy)}), pre)[0]
    (copy / "class0" / "new.png").write_bytes((images / "class0" / "0.png").read_bytes())  # an image added
    assert _entry(argparse.Namespace(**{**vars(args), "data": str(copy)}), pre)[0] != copied


def test_random_weights_are_never_cached(images, cache):
    from lowrank_vit.cli.densecache import _dense_cache_entry
    from lowrank_vit.cli.sources import Source

    args = argparse.Namespace(data=str(images), limit=None, train_split="train", val_split=None, image_column=None,
                              label_column=None)
    random = Source(torch.nn.Identity(), ARCH, f"timm {ARCH}, random weights",
                    record={"timm_name": ARCH, "model_kwargs": KWARGS, "pretrained": False, "checkpoint": None,
                            "checkpoint_sha256": None})
    assert _dense_cache_entry(args, random, {"mean": [0.5]}, torch.device("cpu")) is None


def test_no_dense_eval_leaves_the_before_accuracy_out(images, checkpoint, cache, evaluations, tmp_path, capsys):
    code, out, err = _compress(capsys, images, checkpoint, tmp_path / "a", "--preprocessing", "timm",
                               "--no-dense-eval")
    assert code == 0, err
    assert evaluations == ["evaluate compressed"]
    report = _report(tmp_path / "a")
    assert set(report["accuracy"]) == {"after"} and "evaluate_before" not in report["timings_s"]
    after = report["accuracy"]["after"]["top1"]
    assert f"top-1 {after:.2f}% compressed" in out and "->" not in out.split("top-1")[1]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "after compression" in card and "starting model" not in card
    assert not (cache / "dense").exists()  # nothing evaluated, nothing cached


def test_an_unwritable_cache_never_fails_compress(images, checkpoint, evaluations, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(blocker))
    code, _, err = _compress(capsys, images, checkpoint, tmp_path / "a", "--preprocessing", "timm")
    assert code == 0, err
    assert evaluations == ["evaluate dense", "evaluate compressed"]
    assert "was not cached" in err and "Traceback" not in err
    assert blocker.read_text() == "a file where the cache folder would go"


# ------------------------------------------------------------------------- refused before any model is built


@pytest.fixture
def no_model(monkeypatch) -> None:
    """Any model read fails the test: what these commands refuse must be refused before."""
    from lowrank_vit.cli import compress as usercli
    from lowrank_vit.cli import finetune as finetunecli

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(usercli, "load_source", never)
    monkeypatch.setattr(usercli, "directory_source", never)  # export
    monkeypatch.setattr(finetunecli, "directory_source", never)


def _argv(command: str, tmp_path: Path, data: str) -> list[str]:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return {"compress": ["compress", ARCH, "--data", data, "--reduction", "0.5", "--output", str(tmp_path / "o")],
            "evaluate": ["evaluate", ARCH, "--data", data],
            "finetune": ["finetune", str(model), "--data", data, "--epochs", "1", "--output",
                         str(tmp_path / "o")]}[command]


@pytest.mark.parametrize("command", ["compress", "evaluate", "finetune"])
@pytest.mark.parametrize("data", ["{tmp}/nowhere", "./no-such-folder-41", "~/no-such-folder-41", "imgs/val/cats",
                                  "owner/name/"])
def test_a_missing_data_path_is_refused_before_any_model_is_built(command, data, tmp_path, capsys, no_model,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = data.format(tmp=tmp_path)
    code, _, err = cli(capsys, *_argv(command, tmp_path, data))
    assert code == 2
    assert one_line_error(err) == (f"lowrank-vit: error: no data at {data!r}: give --data an image folder, parquet "
                                   f"file(s) or a Hugging Face dataset name")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("data", ["mnist-5k", "digits", "uoft-cs/cifar10", "imagenet-1k"])
def test_dataset_names_are_not_taken_for_missing_paths(data, tmp_path, capsys, no_model, monkeypatch):
    """A name that may be a dataset reaches the model loading (here: the stand-in that fails the test), where the
    data module then decides."""
    from lowrank_vit.cli.data import check_data_path

    monkeypatch.chdir(tmp_path)
    check_data_path(data)
    with pytest.raises(AssertionError, match="a model was loaded"):
        cli(capsys, *_argv("evaluate", tmp_path, data))


@pytest.mark.parametrize("command", ["compress", "finetune", "export"])
def test_an_existing_output_is_refused_before_any_model_is_built(command, tmp_path, capsys, no_model):
    from lowrank_vit.io.surgery import PLAN_FILE

    model = tmp_path / "model"
    model.mkdir()
    if command == "export":
        out = tmp_path / "m.onnx"
        out.write_bytes(b"an earlier export")
        argv = ["export", str(model), "--output", str(out)]
    else:
        out = tmp_path / "o"
        out.mkdir()
        (out / PLAN_FILE).write_text("a model directory's plan")
        argv = {"compress": ["compress", ARCH, "--data", str(tmp_path), "--reduction", "0.5"],
                "finetune": ["finetune", str(model), "--data", str(tmp_path), "--epochs", "1"]}[command]
        argv += ["--output", str(out)]
    code, _, err = cli(capsys, *argv)
    assert code == 2
    line = one_line_error(err)
    assert str(out) in line and "--force" in line


# ----------------------------------------------------------------------- offline, pretrained weights not cached


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache. huggingface_hub reads HF_HOME once, at import: its resolved cache folder is set
    too, as a fresh process with HF_HOME set would have it."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


@pytest.fixture
def build_marker(monkeypatch) -> None:
    """timm is never asked to build the model: reaching it shows as a SetupError naming this marker."""
    from lowrank_vit.repro import models

    def build(*args, **kwargs):
        raise models.SetupError("BUILD-REACHED")

    monkeypatch.setattr(models, "build_model", build)


@pytest.mark.parametrize("value", ["1", "yes", "True", "ON"])
def test_offline_pretrained_weights_that_are_not_cached_are_refused_at_once(value, empty_hf_cache, build_marker,
                                                                            capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    code, _, err = cli(capsys, "evaluate", "deit_tiny_patch16_224", "--data", "digits")
    assert code == 2
    line = one_line_error(err)
    assert "BUILD-REACHED" not in line
    for needle in ("deit_tiny_patch16_224", "HF_HUB_OFFLINE is set (offline)", "timm/deit_tiny_patch16_224.fb_in1k",
                   "not in the local Hugging Face cache", "--checkpoint FILE", "unset HF_HUB_OFFLINE"):
        assert needle in line, line


@pytest.mark.parametrize("value", [None, "0", "false"])
def test_online_the_weights_are_left_to_timm(value, empty_hf_cache, build_marker, capsys, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    code, _, err = cli(capsys, "evaluate", "deit_tiny_patch16_224", "--data", "digits")
    assert code == 2 and "BUILD-REACHED" in one_line_error(err)


def test_offline_weights_in_the_cache_pass(empty_hf_cache, build_marker, capsys, monkeypatch):
    """The cache in huggingface_hub's layout (refs/main names the snapshot holding the file): timm may load it."""
    from lowrank_vit.cli.sources import _hub_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo, files, revision = _hub_weights("deit_tiny_patch16_224", {})
    assert (repo, files, revision) == ("timm/deit_tiny_patch16_224.fb_in1k", ("model.safetensors",
                                                                              "pytorch_model.bin"), None)
    folder = empty_hf_cache / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    (folder / "snapshots" / "0123abcd" / "pytorch_model.bin").write_bytes(b"weights")
    code, _, err = cli(capsys, "evaluate", "deit_tiny_patch16_224", "--data", "digits")
    assert code == 2 and "BUILD-REACHED" in one_line_error(err)


def test_weights_from_elsewhere_are_not_checked(empty_hf_cache, monkeypatch):
    """A pretrained_cfg of the user's (--model-kwargs) or a tag timm does not have: timm decides, not this check."""
    from lowrank_vit.cli.sources import _check_offline_weights, _hub_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _hub_weights("deit_tiny_patch16_224", {"pretrained_cfg_overlay": {"file": "w.pth"}}) is None
    assert _hub_weights("deit_tiny_patch16_224.no_such_tag", {}) is None
    _check_offline_weights("deit_tiny_patch16_224.no_such_tag", {})
