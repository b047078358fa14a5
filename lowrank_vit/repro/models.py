"""A registry row's model and inputs: timm's pretrained weights or the smoke stand-in, a checkpoint loaded into it
(weights only, checked), the checkpoint's digest, synthetic images for planning, the head's class count, the device."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.core.common import smooth_images
from lowrank_vit.io.checkpoints import CheckpointError, checkpoint_format, read_state_dict
from lowrank_vit.io.convert import ConversionError, to_timm
from lowrank_vit.io.vmamba import VMambaCheckpointError, is_vmamba_layout, read_vmamba_checkpoint, vmamba_to_vssm
from lowrank_vit.nn.adapters import TimmViTAdapter, timm_with_our_models
from lowrank_vit.repro.registry import (
    ModelConfig,
)
from lowrank_vit.repro.standins import build_standin


class SetupError(RuntimeError):
    """Something the run needs is missing (weights, data, a device); the message says how to provide it."""



def build_model(cfg: ModelConfig, progress: bool = True) -> nn.Module:
    """The row's starting network, in eval mode.

    Raises:
        SetupError: timm's pretrained weights cannot be fetched (offline, no cache).
        ValueError: unknown model or stand-in name.
    """
    if cfg.source == "standin":
        return build_standin(cfg.name, pretrained=cfg.pretrained, progress=progress).eval()
    from lowrank_vit.nn.vssm import NoPretrainedWeightsError

    timm = timm_with_our_models()

    if not timm.is_model(cfg.name.split(".")[0]):
        raise ValueError(f"timm has no model {cfg.name!r}")
    if cfg.checkpoint is not None:
        if is_vssm_name(cfg.name):  # may be VMamba's own layout, whose shapes fix the constructor arguments
            return load_vssm_checkpoint(cfg.name, cfg.checkpoint, cfg.kwargs).eval()
        return load_checkpoint_(timm.create_model(cfg.name, pretrained=False, **cfg.kwargs), cfg.checkpoint).eval()
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **cfg.kwargs)
    except NoPretrainedWeightsError as err:
        raise SetupError(f"{cfg.name} has no trained weights here (none ship for this library's implementation, "
                         "lowrank_vit/nn/vssm.py): pass a checkpoint in its layout, or one of VMamba's released "
                         "classification .pth files (docs/vmeanba.md), with --set model.checkpoint=PATH, or use "
                         "--scale smoke") from err
    except (OSError, RuntimeError, ValueError) as err:
        if not cfg.pretrained:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = textwrap.shorten(first, 160, placeholder="...")  # at a word, not inside one
        raise SetupError(
            f"cannot load timm's pretrained weights for {cfg.name} ({first}): run once with network access "
            f"(they are cached in the Hugging Face cache, HF_HOME), unset HF_HUB_OFFLINE, or use --scale smoke"
        ) from err
    return model.eval()



def is_vssm_name(name: str) -> bool:
    """Whether a timm name is one of the state-space models of ``nn/vssm.py`` (``vmamba_*``, ``vssm_micro``)."""
    from lowrank_vit.nn.vssm import MODEL_NAMES

    return name.split(".")[0] in MODEL_NAMES


def _vmamba_file(path: Path) -> dict[str, torch.Tensor] | None:
    """The state dict of a PyTorch file in VMamba's layout (read weights-only, its training configuration allowed
    as a plain dict), else None: a safetensors file, or a state dict in this library's layout, loads as any other."""
    if not path.is_file() or checkpoint_format(path) != "torch":
        return None
    try:
        tensors = read_vmamba_checkpoint(path)
    except VMambaCheckpointError as err:
        if "refuses" in str(err):  # the refusal that names VMamba's reader; load_checkpoint_ words the others
            raise SetupError(f"model {err}") from None
        return None
    return tensors if is_vmamba_layout(tensors) else None


def _merge_vmamba_kwargs(inferred: dict[str, Any], user: dict[str, Any], path: Path) -> dict[str, Any]:
    """The user's constructor arguments over the ones a VMamba checkpoint's shapes fix; a contradiction of the
    latter is refused, naming it (the weights would not load)."""

    def same(key: str, a: Any, b: Any) -> bool:
        if key == "depths":
            return [int(d) for d in a] == [int(d) for d in b]
        if key in ("ssm_ratio", "mlp_ratio"):  # what the widths come to, int(ratio * width), is what matters
            return isinstance(a, (int, float)) and int(a * inferred["embed_dim"]) == int(b * inferred["embed_dim"])
        return bool(a == b)

    for key, value in user.items():
        if key in inferred and not same(key, value, inferred[key]):
            raise SetupError(f"model checkpoint {str(path)!r} is a VMamba checkpoint whose tensors fix {key}="
                             f"{json.dumps(inferred[key])}, and model.kwargs give {key}={json.dumps(value)}: drop it "
                             f"or make them agree")
    return {**inferred, **user}


def load_vssm_checkpoint(name: str, path: str | os.PathLike, kwargs: dict[str, Any]) -> nn.Module:
    """A state-space model of ``nn/vssm.py`` with a checkpoint's weights. A PyTorch file in VMamba's own layout (its
    released classifiers, ``io/vmamba.py``) is converted, and the constructor arguments its shapes fix (width, depths,
    ssm_ratio, stem...) go under ``kwargs``, so that any of these names builds the shape the file holds; any other
    file loads as :func:`load_checkpoint_` says.

    Raises:
        SetupError: as :func:`load_checkpoint_`; a VMamba file the weights-only reader refuses, whose layout does not
            convert, or that contradicts ``kwargs``.
    """
    timm = timm_with_our_models()
    path = Path(path).expanduser()
    tensors = _vmamba_file(path)
    if tensors is None:
        return load_checkpoint_(timm.create_model(name, pretrained=False, **kwargs), path)
    try:
        converted, inferred = vmamba_to_vssm(tensors)
    except VMambaCheckpointError as err:
        raise SetupError(f"model checkpoint {str(path)!r}: {err}") from None
    model = timm.create_model(name, pretrained=False, **_merge_vmamba_kwargs(inferred, kwargs, path))
    return _load_tensors_(model, converted, path, [], ", converted from VMamba's layout")


def load_checkpoint_(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict into ``model`` in place, strictly (every key, every shape): a safetensors file, or a PyTorch
    ``torch.save`` file read weights-only (never a full unpickle), unwrapped as :func:`io.checkpoints.read_state_dict`
    says.

    Raises:
        SetupError: the file is missing, is not a state dict, or does not fit the model.
    """

    path = Path(path).expanduser()
    if not path.is_file():
        raise SetupError(f"model checkpoint {str(path)!r} does not exist: give model.checkpoint= a safetensors or "
                         f"PyTorch file of the model's weights (e.g. save_file(model.state_dict(), PATH))")
    try:
        tensors, notes = read_state_dict(path)
    except CheckpointError as err:
        raise SetupError(f"model checkpoint {err}") from None

    try:  # torchvision's or transformers' ViT keys to timm's
        converted = to_timm(tensors)
    except ConversionError as err:
        raise SetupError(f"model checkpoint {str(path)!r}: {err}") from None
    done = "" if converted.layout == "timm" else f", converted from {converted.layout}" + "".join(
        f"; {note}" for note in converted.notes)
    return _load_tensors_(model, converted.state_dict, path, notes, done)


def _load_tensors_(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, notes: list[str],
                   done: str) -> nn.Module:
    """Load a state dict read from ``path`` into ``model`` strictly, after checking keys, shapes and values; the
    refusal names the differences and what reading (``notes``) and conversion (``done``) did."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        read = f", read with {' and '.join(notes)}" if notes else ""
        raise SetupError(f"model checkpoint {str(path)!r} does not fit {type(model).__name__} with these model.kwargs "
                         f"({'; '.join(parts)}{read}{done})")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SetupError(f"model checkpoint {str(path)!r} holds NaN or infinite values ({', '.join(bad[:3])})")
    model.load_state_dict(tensors, strict=True)
    return model



def checkpoint_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file: recorded with each result, so that a retrained checkpoint reruns its rows.
    Computed once per process for a file of unchanged size and modification time (a row checks a finished result
    and then records the digest of its own run)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)



@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model takes (3 x 224 x 224 where its modules do not say)."""
    channels, size = TimmViTAdapter().input_shape(model)
    size = size or (224, 224)
    return int(channels or 3), int(size[0]), int(size[1])



def synthetic_images(n: int, shape: tuple[int, int, int], batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """``n`` smooth random images (low-frequency noise upsampled), so patch tokens correlate as in real images;
    enough to exercise calibration and allocation without any data."""
    g = torch.Generator().manual_seed(seed)
    return [smooth_images(min(batch_size, n - start), shape, g) for start in range(0, n, batch_size)]



def synthetic_labelled(batches: list[torch.Tensor], num_classes: int,
                       seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` pairs with uniformly random labels, for methods whose calibration needs labels (FWSVD's
    Fisher information) when planning on synthetic images."""
    g = torch.Generator().manual_seed(seed)
    return [(images, torch.randint(num_classes, (images.shape[0],), generator=g)) for images in batches]



def model_num_classes(model: nn.Module) -> int:
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and classes > 0:
        return classes
    raise ValueError(f"{type(model).__name__} states no num_classes; cannot make synthetic labels")



def head_classes(model: nn.Module) -> int | None:
    """How many classes the model's head predicts (None when it states none)."""
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and classes > 0:
        return classes
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head.out_features if isinstance(head, nn.Linear) else None



def check_classes(model: nn.Module, num_classes: int, where: str) -> None:
    """The data's labels must fit the model's head; checked before the calibration pass, which would otherwise
    run for minutes and then fail deep in the loss with "Target N is out of bounds".

    Raises:
        SetupError: the data has more classes (or a label at or above the head's size) than the head predicts.
    """
    classes = head_classes(model)
    if classes is not None and num_classes > classes:
        raise SetupError(f"{where} has {num_classes} classes (labels 0..{num_classes - 1}) but the model's head "
                         f"predicts {classes}: use a model with num_classes={num_classes} (e.g. --set "
                         f"'model.kwargs={{\"num_classes\": {num_classes}}}' with your checkpoint) or data with at "
                         f"most {classes} classes")



def resolve_device(accelerator: str) -> torch.device:
    """The device of this process: the local rank's GPU under DDP."""
    if accelerator == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if accelerator == "gpu":
            raise SetupError("--accelerator gpu was asked for but torch sees no CUDA device; use --accelerator cpu")
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
