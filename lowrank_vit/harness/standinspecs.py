"""The stand-in recipes: for each architecture of the experiment registry, which timm family, how it is shrunk to
28x28 grayscale digits, and how it is pretrained (:class:`StandinSpec`, :data:`STANDINS`). Every field enters the
fingerprint that keys the cached weights.

Imported through :mod:`lowrank_vit.harness.standins`, which re-exports every public name.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

STANDIN_DATASET = "mnist-5k"
"""The dataset every stand-in is pretrained on (:class:`lowrank_vit.stages.data.MNIST5kDataModule`)."""
TRAINER_VERSION = 1
"""Part of every fingerprint: bump it when the training loop changes, so that old caches are retrained."""


@dataclass(frozen=True)
class StandinSpec:
    """One stand-in: which timm family, how it is shrunk, and how it is pretrained on the digits.

    ``timm.create_model(timm_name, pretrained=False, **model_kwargs)`` builds it; every field enters the fingerprint,
    so changing the recipe invalidates the cached weights.
    """

    arch: str
    """Registry key (``"deit_s"``...); also the cache entry's file name."""
    timm_name: str
    """The full-size model of the family (``"deit_small_patch16_224"``): its class and default config are reused."""
    model_kwargs: dict[str, Any] = field(hash=False)
    """Overrides of the full-size constructor: input 1x28x28, 10 classes, patch size, width, depth, heads..."""
    epochs: int
    lr: float
    """Peak learning rate of AdamW (linear warmup, cosine decay to zero)."""
    batch_size: int
    seed: int
    """Seeds the initialization, the batch order and the augmentation."""
    weight_decay: float = 0.05
    """AdamW weight decay of matrices (norms, biases, tokens and position embeddings are not decayed)."""
    warmup_fraction: float = 0.1
    """Fraction of the steps spent warming the learning rate up linearly."""
    label_smoothing: float = 0.1
    max_shift: int = 1
    """Random translation of every training digit by up to this many pixels (0: no augmentation). Measured on the
    DeiT-S stand-in, 20 epochs: 0 pixels 94.0% (it overfits: 100% on the training digits), 1 pixel 97.0%, 2 pixels
    94.4% (it underfits in so few epochs)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction!r}")
        if isinstance(self.max_shift, bool) or not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative integer, got {self.max_shift!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """Short hash of every field and of :data:`TRAINER_VERSION`: the cache key of the pretrained weights."""
        payload = json.dumps({"spec": self.to_dict(), "trainer": TRAINER_VERSION, "data": STANDIN_DATASET},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def create_model(self) -> nn.Module:
        """The randomly initialized stand-in (timm seeds nothing: seed torch first for a reproducible init)."""
        from lowrank_vit.nn.adapters import timm_with_our_models

        timm = timm_with_our_models()

        return timm.create_model(self.timm_name, pretrained=False, **self.model_kwargs)


_DIGITS = {"img_size": 28, "in_chans": 1, "num_classes": 10}


def _vit(embed_dim: int, depth: int, heads: int) -> dict[str, Any]:
    """A ViT/DeiT on 7x7 patches (16 tokens: cheap) with average pooling instead of a class token: on 4,000 digits
    it learns much faster (measured: 89% against 81% after 10 epochs; 4x4 patches, 49 tokens, reached only 72%)."""
    return {**_DIGITS, "patch_size": 7, "embed_dim": embed_dim, "depth": depth, "num_heads": heads, "mlp_ratio": 4.0,
            "global_pool": "avg", "class_token": False}


def _swin(embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...]) -> dict[str, Any]:
    """A Swin on 4x4 patches (the real model's patch4_window7; a 7x7 grid, then 4x4 after the patch merging) without
    timm's default stochastic depth of 0.1, which kept this small model underfitting."""
    return {**_DIGITS, "patch_size": 4, "window_size": 7, "embed_dim": embed_dim, "depths": depths,
            "num_heads": heads, "mlp_ratio": 4.0, "drop_path_rate": 0.0}


def _vmamba(embed_dim: int, depths: tuple[int, ...]) -> dict[str, Any]:
    """A VMamba on 4x4 patches (the real model's patch size): 7x7, 4x4, 2x2 and 1x1 grids through its four stages,
    with the real model's block counts, so that K switched blocks mean the same fraction at both scales."""
    return {**_DIGITS, "patch_size": 4, "embed_dim": embed_dim, "depths": depths}


STANDINS: dict[str, StandinSpec] = {
    spec.arch: spec
    for spec in (
        StandinSpec("deit_t", "deit_tiny_patch16_224", _vit(48, 4, 3), epochs=20, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("deit_s", "deit_small_patch16_224", _vit(64, 4, 2), epochs=15, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("deit_b", "deit_base_patch16_224", _vit(96, 4, 3), epochs=15, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("vit_b", "vit_base_patch16_224", _vit(96, 4, 3), epochs=15, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("vit_l", "vit_large_patch16_224", _vit(128, 6, 4), epochs=12, lr=1.5e-3, batch_size=32, seed=0),
        StandinSpec("swin_b", "swin_base_patch4_window7_224", _swin(60, (2, 2), (2, 4)), epochs=16, lr=2e-3,
                    batch_size=32, seed=0),
        StandinSpec("vmamba_t", "vmamba_tiny", _vmamba(16, (2, 2, 8, 2)), epochs=12, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("vmamba_s", "vmamba_small", _vmamba(16, (2, 2, 20, 2)), epochs=12, lr=2e-3, batch_size=32,
                    seed=0),
        StandinSpec("vmamba_b", "vmamba_base", _vmamba(24, (2, 2, 20, 2)), epochs=12, lr=2e-3, batch_size=32,
                    seed=0),
    )
}
"""The stand-in of every architecture of the experiment registry."""


def resolve_spec(arch: str | StandinSpec) -> StandinSpec:
    """The spec of ``arch`` (a spec passes through, so tests and users can pretrain a recipe of their own).

    Raises:
        ValueError: ``arch`` is not a known stand-in; the message lists them and suggests the closest.
    """
    if isinstance(arch, StandinSpec):
        return arch
    if isinstance(arch, str) and arch in STANDINS:
        return STANDINS[arch]
    close = difflib.get_close_matches(str(arch), list(STANDINS), n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown stand-in architecture {arch!r}{hint} Known: {', '.join(STANDINS)}")
