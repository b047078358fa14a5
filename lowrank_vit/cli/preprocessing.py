"""The preprocessing a model is fed: the user's flags, else what the weights carry, else timm's pretrained config
(only when asked for, for a user's checkpoint); printed with where each field came from."""

from __future__ import annotations

import argparse
from typing import Any, Protocol

from torch import nn

from lowrank_vit.cli.base import UserError
from lowrank_vit.stages.data_config import check_preprocessing
from lowrank_vit.stages.data_transforms import resolve_preprocessing


class CarriesPreprocessing(Protocol):
    """What the resolution reads of a model source (:class:`lowrank_vit.cli.sources.Source` is one): named by its
    shape, because sources.py reads this module's field lists and the imports run one way."""

    model: nn.Module
    architecture: str
    description: str
    preprocessing: dict[str, Any]
    carried_from: str
    record: dict[str, Any]


PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")
"""The preprocessing fields saved with a model and printed by every command."""


USER_PREPROCESSING = ("mean", "std", "crop_pct", "interpolation")
"""Those a user, a checkpoint or a directory may set (the input size is the model's own); data.PREPROCESSING_FIELDS."""


def user_preprocessing(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing fields given on the command line."""
    given = {key: getattr(args, key, None) for key in USER_PREPROCESSING}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if v is not None}


def resolve_model_preprocessing(source: CarriesPreprocessing,
                                args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The preprocessing in use (the user's flags, else what the weights carry, else timm's pretrained config, at the
    model's own input size) and where each field came from.

    Raises:
        UserError: ``--input-size`` differs from what the model takes, or a field is invalid.
    """
    try:  # the data config's own rules, for the flags and for what a checkpoint or directory carries
        user = check_preprocessing(user_preprocessing(args))
        carried = check_preprocessing({k: v for k, v in source.preprocessing.items() if k in USER_PREPROCESSING})
    except ValueError as err:
        raise UserError(f"preprocessing: {err}") from None
    unknown = [key for key in ("mean", "std") if key not in user and key not in carried]
    checkpoint = source.record.get("checkpoint")
    if checkpoint and unknown and getattr(args, "preprocessing", None) != "timm":
        # timm's values are those of timm's weights for the name, not of the user's: a wrong mean and std give a
        # model that runs but loses much of its accuracy, and compress would calibrate on such images and save them
        raise UserError(f"--checkpoint {checkpoint} carries no {' or '.join(unknown)}: give the values the model "
                        f"was trained with (--mean R G B --std R G B; --crop-pct and --interpolation where they "
                        f"differ from timm's), or --preprocessing timm to take timm's for {source.architecture}")
    pre = resolve_preprocessing(source.model, overrides={**carried, **user})
    size = getattr(args, "input_size", None)
    if size is not None:
        channels, height, width = size
        wanted = (channels or pre["input_size"][0], height, width)
        if tuple(pre["input_size"]) != wanted:
            why = ("a model directory keeps its size (build a timm name at another size with --input-size)"
                   if source.description.startswith("directory") else
                   "--model-kwargs or the checkpoint fix another size: make them agree")
            raise UserError(f"the model takes {_shape(pre['input_size'])} images, --input-size asks for "
                            f"{_shape(wanted)}: {why}")
    origin = {}
    for key in PREPROCESSING_KEYS:
        if key == "input_size":
            origin[key] = "model"
        elif key in user:
            origin[key] = "flag"
        elif key in carried:
            origin[key] = source.carried_from
        else:
            origin[key] = "timm config"
    return {k: _plain(pre[k]) for k in PREPROCESSING_KEYS if k in pre}, origin


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shape(size: Any) -> str:
    return "x".join(str(int(v)) for v in size)


def describe_preprocessing(pre: dict[str, Any], origin: dict[str, str]) -> str:
    """One line: every field and where it came from."""
    def numbers(values: Any) -> str:
        return ",".join(f"{v:.4g}" for v in values)

    parts = [f"input {_shape(pre['input_size'])} ({origin['input_size']})",
             f"mean {numbers(pre['mean'])} ({origin['mean']})", f"std {numbers(pre['std'])} ({origin['std']})"]
    for key in ("crop_pct", "interpolation"):
        if key in pre:
            parts.append(f"{key} {pre[key]} ({origin[key]})")
    return "preprocessing: " + ", ".join(parts)
