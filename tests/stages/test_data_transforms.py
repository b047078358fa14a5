"""Tests of lowrank_vit/stages/data_transforms.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_vit.stages.data_transforms import resolve_preprocessing
from tests.helpers import (
    make_tiny_vit,
)


@pytest.mark.usefixtures("offline")
def test_an_array_whose_first_and_last_axes_could_both_be_channels_is_read_channels_last():
    """(3, 5, 3): channels-first only when the last axis cannot be channels; here it can, so it is 3 rows of 5
    pixels of 3 channels, as PIL and Hugging Face datasets store images."""
    from lowrank_vit.stages.data_transforms import to_pil

    array = np.arange(45, dtype=np.uint8).reshape(3, 5, 3)
    image = to_pil(array)
    assert image.size == (5, 3) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), array)
    four = np.arange(60, dtype=np.uint8).reshape(3, 5, 4)  # the last axis could be RGBA: channels-last too
    assert to_pil(four).size == (5, 3)


@pytest.mark.usefixtures("offline")
def test_a_pattern_finer_than_the_model_input_comes_out_grey():
    """A one-pixel checkerboard shrunk threefold is averaged (antialiased), not sampled back into black and white."""
    from lowrank_vit.stages.data_transforms import TensorImageTransform

    board = (torch.arange(48)[:, None] + torch.arange(48)[None, :]) % 2 * 255
    out = TensorImageTransform((1, 16, 16), (0.0,), (1.0,))(board[None].to(torch.uint8))
    assert out.shape == (1, 16, 16)
    assert (out - 0.5).abs().max().item() < 0.1


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("shape", [(0, 0), (5,), (0, 4, 3)])
def test_an_array_of_no_pixels_or_the_wrong_rank_is_refused_naming_its_shape(shape):
    import numpy as np

    from lowrank_vit.stages.data_config import DataFormatError
    from lowrank_vit.stages.data_transforms import to_pil

    with pytest.raises(DataFormatError) as info:
        to_pil(np.zeros(shape, dtype=np.float32))
    assert str(info.value) == f"cannot read an image from an array of shape {shape}"


@pytest.mark.usefixtures("offline")
def test_a_float_image_on_the_unit_scale_with_a_white_pixel_is_scaled_to_255():
    """Floats in [0, 1] whose brightest pixel is exactly 1.0 (white) are on the unit scale: scaled by 255."""
    import numpy as np

    from lowrank_vit.stages.data_transforms import to_pil

    pixels = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)
    assert np.asarray(to_pil(pixels)).tolist() == [[0, 127], [63, 255]]


@pytest.mark.usefixtures("offline")
def test_timms_squash_crop_mode_keeps_the_whole_width_of_the_image():
    """`crop_mode: squash` (a model's pretrained config may say so) resizes the whole image to the model's size; the
    default center crop of a 4:1 image keeps its middle quarter. Four vertical stripes tell them apart: the first
    output column is the first stripe's colour when squashed and the second's when center-cropped."""
    from PIL import Image

    from lowrank_vit.stages.data_transforms import create_transforms

    stripes = np.zeros((16, 64, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    for i, colour in enumerate(colours):
        stripes[:, 16 * i:16 * (i + 1)] = colour
    image = Image.fromarray(stripes)
    base = {"input_size": (3, 16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3, "crop_pct": 1.0,
            "interpolation": "bilinear"}
    for mode, first in (("squash", colours[0]), ("center", colours[1])):
        _, eval_tf = create_transforms({**base, "crop_mode": mode}, augment=False)
        column = eval_tf(image)[:, 8, 0]
        assert column.tolist() == pytest.approx([v / 255 for v in first], abs=0.02), mode


@pytest.mark.usefixtures("offline")
def test_the_tensor_transform_resizes_with_half_pixel_centres():
    """Two pixels (0 and 255) stretched to four: sampled at the centres of the new pixels (x_src = (x + 0.5) / 2 -
    0.5, clamped), they read 0, 1/4, 3/4 and 1; corner-aligned sampling would give thirds."""
    from lowrank_vit.stages.data_transforms import TensorImageTransform

    image = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    out = TensorImageTransform((1, 1, 4), mean=(0.0,), std=(1.0,))(image)
    assert out.flatten().tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0], abs=1e-6)


@pytest.mark.usefixtures("offline")
def test_normalization_statistics_that_fit_no_channel_count_are_refused_with_both():
    from lowrank_vit.stages.data_transforms import _match_channels

    assert _match_channels((0.2, 0.4, 0.6), 1) == pytest.approx((0.4,))
    with pytest.raises(ValueError) as info:
        _match_channels((0.5, 0.5), 3)
    assert str(info.value) == "normalization statistics (0.5, 0.5) do not fit in_chans=3"


def test_array_images_in_any_layout_and_scale_become_the_same_picture():
    """An image column holding arrays: uint8 (H, W, C), channels first (C, H, W), and floats in [0, 1] all decode
    to the same uint8 picture (floats are scaled by 255, not truncated to black)."""
    from lowrank_vit.stages.data_transforms import to_pil

    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    expected = np.asarray(to_pil(pixels))
    assert np.array_equal(expected, pixels)
    assert np.array_equal(np.asarray(to_pil(pixels.transpose(2, 0, 1))), pixels)
    scaled = np.asarray(to_pil(pixels.astype(np.float32) / 255.0)).astype(int)
    assert np.abs(scaled - pixels.astype(int)).max() <= 1


def test_preprocessing_follows_the_model():
    assert resolve_preprocessing(make_tiny_vit())["input_size"] == (1, 28, 28)
    pre = resolve_preprocessing(make_tiny_vit(img_size=32, patch_size=8, in_chans=3), in_chans=1, img_size=64)
    assert pre["input_size"] == (1, 64, 64) and len(pre["mean"]) == 1 and len(pre["std"]) == 1


def test_tensor_transform_on_a_non_square_image_shifts_within_the_frame_and_matches_channels():
    """A 5x7 grey image into a 3-channel model, shifted: every output pixel is a source pixel (or the zero padding)
    at the drawn offset, normalized by the user's values; computed here by index, not by the transform."""
    from lowrank_vit.stages.data_transforms import TensorImageTransform

    image = torch.arange(35, dtype=torch.uint8).reshape(1, 5, 7) * 7
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    transform = TensorImageTransform((3, 5, 7), mean, std, max_shift=2)
    torch.manual_seed(11)
    out = transform(image)
    torch.manual_seed(11)
    dy, dx = torch.randint(0, 5, (2,)).tolist()
    assert out.shape == (3, 5, 7)
    for c in range(3):
        for i in range(5):
            for j in range(7):
                src_i, src_j = i + dy - 2, j + dx - 2
                value = float(image[0, src_i, src_j]) / 255 if 0 <= src_i < 5 and 0 <= src_j < 7 else 0.0
                assert float(out[c, i, j]) == pytest.approx((value - mean[c]) / std[c], abs=1e-6)


def test_tensor_transform_averages_colour_into_a_grey_model_on_a_non_square_image():
    from lowrank_vit.stages.data_transforms import TensorImageTransform

    image = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = TensorImageTransform((1, 4, 6), (0.4,), (0.3,))(image)
    assert out.shape == (1, 4, 6)
    assert torch.allclose(out[0], (image.float().mean(0) / 255 - 0.4) / 0.3, atol=1e-6)


def test_tensor_transform_keeps_each_colour_channel_of_a_colour_image():
    from lowrank_vit.stages.data_transforms import TensorImageTransform

    image = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor([0.3, 0.5, 0.7]), torch.tensor([0.2, 0.4, 0.6])
    out = TensorImageTransform((3, 4, 6), mean.tolist(), std.tolist())(image)
    assert torch.allclose(out, (image.float() / 255 - mean[:, None, None]) / std[:, None, None], atol=1e-6)


def test_arrays_become_images_with_their_values_clipped_and_their_channels_found():
    """Float arrays on the 0-255 scale are clipped to it (300 -> 255, -5 -> 0), not wrapped around by the uint8
    cast; a channels-first array is recognised whenever its last axis cannot be channels, a width of 2 included."""
    from lowrank_vit.stages.data_transforms import to_pil

    values = np.array([[300.0, -5.0, 128.0], [2.0, 255.0, 17.0]], dtype=np.float32)
    assert np.array_equal(np.asarray(to_pil(values)), np.array([[255, 0, 128], [2, 255, 17]], dtype=np.uint8))
    channels_first = np.random.default_rng(0).integers(0, 256, (3, 5, 2), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_pil(channels_first)), channels_first.transpose(1, 2, 0))


def test_a_one_channel_channels_first_array_becomes_a_grey_image():
    """A Hugging Face image column may hold (1, H, W) arrays (a grey image stored channels first): each must become
    the H x W grey picture, not a one-pixel-high strip or an error."""
    from lowrank_vit.stages.data_transforms import to_pil

    pixels = np.random.default_rng(0).integers(0, 256, (7, 5), dtype=np.uint8)
    image = to_pil(pixels[None])
    assert image.mode == "L" and image.size == (5, 7)
    assert np.array_equal(np.asarray(image), pixels)


def test_a_colour_image_for_a_grey_model_is_one_channel_of_the_mean_of_its_three():
    """An RGB image fed to a one-channel model: one channel (C, H, W with C = 1), each pixel the mean of its three
    values, then normalized: (mean - 0.5) / 0.25 here, computed by hand."""
    from lowrank_vit.stages.data_transforms import TensorImageTransform

    image = torch.tensor([[[0, 255]], [[51, 255]], [[102, 0]]], dtype=torch.uint8)  # 3 x 1 x 2
    out = TensorImageTransform((1, 1, 2), mean=(0.5,), std=(0.25,))(image)
    assert out.shape == (1, 1, 2)
    expected = torch.tensor([[[(51 / 255 - 0.5) / 0.25, (170 / 255 - 0.5) / 0.25]]])
    torch.testing.assert_close(out, expected)
