"""Shared fixtures: tiny timm models built with pretrained=False, and calibration data."""

from __future__ import annotations

import os
import random

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see lowrank_vit/__init__.py

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

TINY_VIT = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def cifar10_dir():
    """The development copy of CIFAR-10 (``LOWRANK_VIT_CIFAR10``, else ``../shared/data/cifar10`` beside the
    repository) when its train.parquet and test.parquet exist, else None: tests that need it skip without it."""
    from pathlib import Path

    env = os.environ.get("LOWRANK_VIT_CIFAR10")
    candidate = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
    return candidate if (candidate / "train.parquet").is_file() and (candidate / "test.parquet").is_file() else None


def make_tiny_vit(seed: int = 0, **overrides):
    """A 28x28 single-channel ViT (16 patches + cls token), about 27k parameters."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, **overrides}).eval()


@torch.no_grad()
def randomize_affine_(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Every linear layer's bias and every LayerNorm's weight and bias drawn at random (non-zero), in place: timm
    initializes biases to zero and LayerNorms to the identity, so a path that dropped or zeroed a bias would pass on
    its fresh models unnoticed. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias.copy_(scale * torch.randn(module.bias.shape, generator=g))
        elif isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine:
            module.weight.copy_(1.0 + scale * torch.randn(module.weight.shape, generator=g))
            module.bias.copy_(scale * torch.randn(module.bias.shape, generator=g))
    return model


@pytest.fixture
def one_thread():
    """Tiny models and matrices: one torch thread avoids oversubscribing the shared cores (much faster here); the
    thread count restored after the test. A module opts in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class DenseHeadViT(torch.nn.Module):
    """A model of one's own class: a tiny timm ViT backbone (``make_tiny_vit(num_classes=0)``) with a
    transposed-convolution head that maps its patch tokens to a (B, 1, 28, 28) map of logits; ``forward`` returns
    the map under "mask" beside the tokens, or the map alone (``as_dict=False``)."""

    def __init__(self, seed: int = 0, as_dict: bool = True) -> None:
        super().__init__()
        self.backbone = make_tiny_vit(seed=seed, num_classes=0)
        self.decoder = torch.nn.ConvTranspose2d(self.backbone.embed_dim, 1, 7, 7)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        tokens = self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens:]
        side = int(tokens.shape[1] ** 0.5)
        mask = self.decoder(tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side))
        return {"mask": mask, "tokens": tokens} if self.as_dict else mask


def make_images(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Smooth random images (low-frequency noise), so patch tokens are correlated like natural ones."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, max(size // 7, 2), max(size // 7, 2), generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def norm_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 on the CPU (a and b may live on different devices, or be numpy arrays)."""
    a, b = (torch.as_tensor(t).detach().float().cpu() for t in (a, b))
    return float((a - b).norm() / b.norm())


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


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``lowrank-vit ARGV`` in-process: (exit status, stdout, stderr)."""
    from lowrank_vit.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The CLI's error contract: exactly one non-empty line on stderr, no traceback, prefixed with the program."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("lowrank-vit")
    return lines[0]


def assert_round_trip(model, path, images) -> None:
    """A compressed tiny ViT saved and loaded computes the same logits, and the loaded copy still quantizes."""
    from lowrank_vit import load_compressed, quantize_, save_compressed

    save_compressed(model, path, model_name="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    loaded = load_compressed(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    quantize_(loaded, bits=8)
    with torch.no_grad():
        assert torch.isfinite(loaded(images)).all()


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


def write_image_folder(root, classes: int = 3, per_class: int = 4, size: int = 32, seed: int = 0):
    """An image folder under ``root``: ``class{c}/{i}.png``, RGB, noise around a brightness that depends on the
    class (so a model can tell them apart). Returns ``root``."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray((rng.random((size, size, 3)) * 80 + c * 70).astype(np.uint8)).save(
                root / f"class{c}" / f"{i}.png")
    return root

