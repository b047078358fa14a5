"""Preprocessing of the data modules: timm's data config at the model's own input size and channels, PIL images
from whatever a Hugging Face image column holds, timm's training and evaluation transforms, and a transform of
uint8 tensor images (the in-memory digits) that needs no PIL round trip.

The data modules of :mod:`lowrank_vit.stages.data` use them; import them from here.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

from lowrank_vit.nn.adapters import TimmViTAdapter
from lowrank_vit.stages.data_config import DataFormatError


def _match_channels(stats: float | Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in (stats if isinstance(stats, (tuple, list)) else (stats,)))
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:  # grayscale model, RGB statistics: their average
        return (sum(values) / len(values),)
    raise ValueError(f"normalization statistics {values} do not fit in_chans={channels}")


def resolve_preprocessing(
    model: nn.Module | None, img_size: int | None = None, in_chans: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """timm's data config for ``model`` at the resolution and channel count it actually takes.

    Args:
        model: A timm model (its pretrained config gives mean, std, interpolation, crop); None for timm's defaults.
        img_size: Overrides the input resolution.
        in_chans: Overrides the input channels; mean and std are averaged or repeated to match.
        overrides: ``mean``, ``std``, ``crop_pct``, ``interpolation`` given by the user or saved with the weights
            (:meth:`DataConfig.preprocessing_overrides`); they win over the pretrained config.

    Returns:
        ``resolve_data_config``'s dict: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``,
        ``crop_pct``, ``crop_mode``.
    """
    from timm.data import resolve_data_config

    # without a model, timm's defaults (ImageNet statistics, 224 px); an empty args dict is refused
    base = resolve_data_config({}, model=model) if model is not None else resolve_data_config({"input_size": None})
    channels, size = base["input_size"][0], tuple(base["input_size"][1:])
    if model is not None:
        model_chans, model_size = TimmViTAdapter().input_shape(model)
        channels, size = model_chans or channels, model_size or size
    channels = in_chans or channels
    size = (img_size, img_size) if img_size else size
    config = {**base, **(overrides or {})}
    config["input_size"] = (int(channels), int(size[0]), int(size[1]))
    for key in ("mean", "std"):
        try:
            config[key] = _match_channels(config[key], channels)
        except ValueError as err:
            raise ValueError(f"{key}: {err} (give one value, or one per channel)") from None
    return config


def pil_mode(in_chans: int) -> str:
    if in_chans == 1:
        return "L"
    if in_chans == 3:
        return "RGB"
    raise ValueError(f"images can be converted to 1 or 3 channels, not in_chans={in_chans}")


def to_pil(value: Any) -> Image.Image:
    """A PIL image from what a Hugging Face image column may hold: a decoded image, ``{"bytes", "path"}``, or an
    array (H, W), (H, W, C) or (C, H, W)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or array.size == 0:
        raise DataFormatError(f"cannot read an image from an array of shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def create_transforms(preprocessing: dict[str, Any], augment: bool = True) -> tuple[Callable, Callable]:
    """timm's training transform (``is_training=True``, or the evaluation one when ``augment`` is False) and its
    evaluation transform, for PIL images already in the model's channel mode."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    kwargs = {k: preprocessing[k] for k in keys if k in preprocessing}
    eval_tf = create_transform(**kwargs, is_training=False)
    return (create_transform(**kwargs, is_training=True) if augment else eval_tf), eval_tf


class TensorImageTransform:
    """uint8 tensor image (C, H, W) -> normalized float (in_chans, img_size, img_size): optional random shift,
    bilinear resize, channel repeat (1 -> 3) or average (3 -> 1), normalization. Picklable, no PIL round trip.

    Args:
        input_size: (C, H, W) the model takes.
        mean: Per-channel mean (length C).
        std: Per-channel standard deviation (length C).
        max_shift: Random translation of up to this many pixels (at the source resolution) in each direction;
            0 for the evaluation transform.
    """

    def __init__(
        self, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float], max_shift: int = 0
    ) -> None:
        self.channels, self.height, self.width = (int(v) for v in input_size)
        self.mean = torch.tensor(_match_channels(mean, self.channels)).view(-1, 1, 1)
        self.std = torch.tensor(_match_channels(std, self.channels)).view(-1, 1, 1)
        self.max_shift = int(max_shift)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().div_(255.0)
        if self.max_shift > 0:
            s = self.max_shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = F.pad(x, (s, s, s, s))[:, dy: dy + image.shape[1], dx: dx + image.shape[2]]
        if tuple(x.shape[1:]) != (self.height, self.width):
            x = F.interpolate(x[None], size=(self.height, self.width), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True) if self.channels == 1 else x[:1].expand(self.channels, -1, -1)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={(self.channels, self.height, self.width)}, "
                f"max_shift={self.max_shift})")
