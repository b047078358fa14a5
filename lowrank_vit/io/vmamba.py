"""VMamba's released classification checkpoints (github.com/MzeroMiko/VMamba) into this library's VSSM
(``lowrank_vit/nn/vssm.py``).

VMamba's training script saves ``torch.save({"model": state_dict, "optimizer": ..., "config": yacs_config, ...})``.
Its state dict differs from the VSSM here in names and in how the four scan paths are stored:

* each SS2D keeps the four paths' projections stacked, ``op.x_proj_weight`` (4, dt_rank + 2 d_state, inner),
  ``op.dt_projs_weight`` (4, inner, dt_rank) and ``op.dt_projs_bias`` (4, inner), where this library has one
  ``nn.Linear`` per path (``op.x_proj.K``, ``op.dt_proj.K``: the modules the low-rank methods replace); its
  ``op.A_logs`` and ``op.Ds`` are this library's ``op.A_log`` and ``op.D``, in the same path-major order;
* the stem and the downsampling are ``nn.Sequential`` (``patch_embed.0`` ... ``patch_embed.7``,
  ``layers.i.downsample.1`` and ``.3``), whose permutations and activation hold no weights;
* the final norm and the head sit in ``classifier`` (``classifier.norm``, ``classifier.head``).

Its ``Linear2d`` layers (1x1 convolutions on channels-first maps, the ``ln2d`` configurations) store the weight of
a linear layer, and its ``LayerNorm2d`` the weight and bias of a LayerNorm over channels: both load as they are.

:func:`vmamba_to_vssm` converts a state dict and says which VSSM constructor arguments build the model it fits;
:func:`read_vmamba_checkpoint` reads a ``.pth`` file weights-only (never a full unpickle).
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

PATHS = 4  # VMamba's k_group: rows, columns, and both backwards

_TRAINING_CONFIG = (collections.OrderedDict, "yacs.config.CfgNode")
"""VMamba's training script saves its yacs configuration beside the weights. A yacs node is a dict with a few
attributes, so it is read as an ``OrderedDict`` (a plain container the weights-only unpickler builds and fills
without running any of yacs' code); without this, the weights-only unpickler refuses the whole file."""


class VMambaCheckpointError(ValueError):
    """A file or state dict that is not one of VMamba's classification checkpoints in a form this library builds;
    the message names the file or the first key at fault."""


def read_vmamba_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a VMamba ``.pth`` file: read by ``torch.load(..., weights_only=True)`` (tensors and plain
    containers only; the training configuration as a plain dict), the ``"model"`` entry taken when present.

    Raises:
        VMambaCheckpointError: the file is missing or damaged, weights-only loading refuses it (it holds other
            Python objects), or it holds no dict of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise VMambaCheckpointError(f"VMamba checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([_TRAINING_CONFIG]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _refusal(str(err))
        raise VMambaCheckpointError(f"VMamba checkpoint {str(path)!r} holds Python objects that weights-only loading "
                                    f"refuses ({reason}); it is never unpickled in full here: if you trust it, load "
                                    f"it yourself and torch.save its 'model' state dict") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise VMambaCheckpointError(f"VMamba checkpoint {str(path)!r} is not a readable PyTorch file "
                                    f"({type(err).__name__}: {first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise VMambaCheckpointError(f"VMamba checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict "
                                    f"(a dict of tensors, or one under 'model')")
    others = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if others:
        raise VMambaCheckpointError(f"VMamba checkpoint {str(path)!r}: entry {others[0]!r} of its state dict is not a "
                                    f"tensor")
    return dict(obj)


def _refusal(message: str) -> str:
    """What torch's long weights-only refusal met, in a few words: the global the file names, else its first
    error line."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if named:
        return f"it names {named.group(1)}"
    lines = [line.strip() for line in message.splitlines() if "WeightsUnpickler error" in line or "Can only" in line]
    return (lines[-1] if lines else "refused")[:160]


def is_vmamba_layout(tensors: dict[str, Any]) -> bool:
    """Whether a state dict has VMamba's layout (its head under ``classifier``, or its stacked SS2D projections)
    rather than this library's."""
    return "classifier.head.weight" in tensors or any(k.endswith(".op.x_proj_weight") for k in tensors)


def _need(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise VMambaCheckpointError(f"VMamba state dict: missing key {key!r}")
    return tensors[key]


def _depths(tensors: dict[str, torch.Tensor]) -> list[int]:
    """Blocks per stage, counted from the highest block index of each stage (a gap shows as a missing key later)."""
    stages: dict[int, int] = {}
    for key in tensors:
        match = re.match(r"layers\.(\d+)\.(?:blocks\.(\d+)\.)?", key)
        if match:
            i, j = int(match.group(1)), match.group(2)
            stages[i] = max(stages.get(i, 0), int(j) + 1 if j is not None else 0)
    if not stages:
        raise VMambaCheckpointError("VMamba state dict: missing key 'layers.0.blocks.0.norm.weight' (no stages)")
    return [stages.get(i, 0) for i in range(max(stages) + 1)]


def vmamba_kwargs(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The VSSM constructor arguments (``nn/vssm.py``) that a VMamba state dict's shapes fix: width, depths,
    d_state, ssm_ratio, dt_rank, the depthwise convolution, MLP ratio, stem, downsampling, classes, channels.

    Raises:
        VMambaCheckpointError: a key the inference reads is missing, or the checkpoint uses a VMamba option this
            library does not build (the output gate of the forward types without ``_noz``, patch-merging
            downsampling, no depthwise convolution).
    """
    if "patch_embed.5.weight" in tensors:  # the v2 stem: two overlapping convolutions of stride patch_size / 2
        stem = _need(tensors, "patch_embed.0.weight")
        patch_embed, embed_dim, patch_size = "v2", int(_need(tensors, "patch_embed.5.weight").shape[0]), \
            2 * (int(stem.shape[-1]) - 1)
    else:  # the v1 stem: one convolution of kernel and stride patch_size
        stem = _need(tensors, "patch_embed.0.weight")
        patch_embed, embed_dim, patch_size = "v1", int(stem.shape[0]), int(stem.shape[-1])
    depths = _depths(tensors)
    block = "layers.0.blocks.0."
    A_logs = _need(tensors, block + "op.A_logs")
    inner, d_state = int(A_logs.shape[0]) // PATHS, int(A_logs.shape[1])
    in_proj = _need(tensors, block + "op.in_proj.weight")
    if int(in_proj.shape[0]) == 2 * inner:
        raise VMambaCheckpointError(f"VMamba state dict: {block}op.in_proj.weight has twice the inner width, the "
                                    "output gate of forward types without '_noz'; only the gate-free ones (v05_noz, "
                                    "as in the released VMamba-T/S/B) are built here")
    conv = _need(tensors, block + "op.conv2d.weight")
    x_proj = _need(tensors, block + "op.x_proj_weight")
    rank = int(x_proj.shape[1]) - 2 * d_state
    kwargs: dict[str, Any] = {
        "embed_dim": embed_dim, "depths": depths, "patch_size": patch_size, "patch_embed": patch_embed,
        "in_chans": int(stem.shape[1]), "num_classes": int(_need(tensors, "classifier.head.weight").shape[0]),
        "d_state": d_state, "ssm_ratio": inner / embed_dim, "d_conv": int(conv.shape[-1]),
        "conv_bias": block + "op.conv2d.bias" in tensors,
        "dt_rank": "auto" if rank == math.ceil(embed_dim / 16) else rank,
        "mlp_ratio": int(_need(tensors, block + "mlp.fc1.weight").shape[0]) / embed_dim,
    }
    if len(depths) > 1:
        if "layers.0.downsample.reduction.weight" in tensors:
            raise VMambaCheckpointError("VMamba state dict: layers.0.downsample.reduction.weight is patch-merging "
                                        "downsampling (VMamba's v1), which is not built here (only v2 and v3)")
        kernel = int(_need(tensors, "layers.0.downsample.1.weight").shape[-1])
        if kernel not in (2, 3):
            raise VMambaCheckpointError(f"VMamba state dict: layers.0.downsample.1.weight has a {kernel}x{kernel} "
                                        "kernel, neither v2's 2x2 nor v3's 3x3 downsampling")
        kwargs["downsample"] = "v2" if kernel == 2 else "v3"
    return kwargs


def _renames(kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    """(VMamba key, this library's key) for every tensor the plain renaming carries, in VMamba's module order."""
    pairs: list[tuple[str, str]] = []

    def module(src: str, dst: str, bias: bool = True) -> None:
        pairs.append((src + ".weight", dst + ".weight"))
        if bias:
            pairs.append((src + ".bias", dst + ".bias"))

    module("patch_embed.0", "patch_embed.proj")
    if kwargs["patch_embed"] == "v2":  # conv, (permute), norm, (permute), GELU, conv, (permute), norm
        module("patch_embed.2", "patch_embed.norm1")
        module("patch_embed.5", "patch_embed.proj2")
        module("patch_embed.7", "patch_embed.norm")
    else:  # conv, (permute), norm
        module("patch_embed.2", "patch_embed.norm")
    depths = kwargs["depths"]
    for i, depth in enumerate(depths):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            module(b + "norm", b + "norm")
            module(b + "op.in_proj", b + "op.in_proj", bias=False)
            module(b + "op.conv2d", b + "op.conv2d", bias=kwargs["conv_bias"])
            module(b + "op.out_norm", b + "op.out_norm")
            module(b + "op.out_proj", b + "op.out_proj", bias=False)
            pairs += [(b + "op.A_logs", b + "op.A_log"), (b + "op.Ds", b + "op.D")]
            module(b + "norm2", b + "norm2")
            module(b + "mlp.fc1", b + "mlp.fc1")
            module(b + "mlp.fc2", b + "mlp.fc2")
        if i + 1 < len(depths):  # (permute), conv, (permute), norm
            module(f"layers.{i}.downsample.1", f"layers.{i}.downsample.conv")
            module(f"layers.{i}.downsample.3", f"layers.{i}.downsample.norm")
    module("classifier.norm", "norm")
    module("classifier.head", "head")
    return pairs


def _stacked_keys(kwargs: dict[str, Any]) -> list[str]:
    """The SS2D blocks' keys (VMamba's prefixes, without the parameter name) whose tensors stack the four paths."""
    return [f"layers.{i}.blocks.{j}.op." for i, depth in enumerate(kwargs["depths"]) for j in range(depth)]


STACKED = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias")
"""SS2D's per-path projections, stored stacked along a first axis of length 4."""


def _as_linear(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A ``Linear2d`` weight saved as a 1x1 convolution's (out, in, 1, 1): the linear layer's (out, in)."""
    if key.endswith(("in_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")) and tensor.dim() == 4 \
            and tensor.shape[-2:] == (1, 1):
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


def convert_vmamba(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """VMamba's state dict (the ``"model"`` entry of its checkpoints) in this library's VSSM layout, and the VSSM
    constructor arguments it fits (:func:`vmamba_kwargs`). A pure function: the input is not changed, tensors are
    shared where only their name changes.

    Raises:
        VMambaCheckpointError: naming the first key that VMamba's layout for these shapes does not have
            (unexpected), else the first one it needs that is absent (missing), or a stacked tensor whose first
            axis is not the four scan paths.
    """
    kwargs = vmamba_kwargs(tensors)
    pairs = _renames(kwargs)
    blocks = _stacked_keys(kwargs)
    expected = [src for src, _ in pairs] + [b + name for b in blocks for name in STACKED]
    known = set(expected)
    unexpected = next((k for k in tensors if k not in known), None)
    if unexpected is not None:
        raise VMambaCheckpointError(f"VMamba state dict: unexpected key {unexpected!r} (not in the layout of the "
                                    f"VMamba these shapes give: {_describe(kwargs)})")
    missing = next((k for k in expected if k not in tensors), None)
    if missing is not None:
        raise VMambaCheckpointError(f"VMamba state dict: missing key {missing!r} (for {_describe(kwargs)})")
    out = {dst: _as_linear(src, tensors[src]) for src, dst in pairs}
    for b in blocks:
        for name in STACKED:
            if tensors[b + name].shape[0] != PATHS:
                raise VMambaCheckpointError(f"VMamba state dict: {b + name} stacks {tensors[b + name].shape[0]} "
                                            f"paths, not the {PATHS} of SS2D's cross scan")
        for k in range(PATHS):  # one nn.Linear per scan path, each its own storage (safetensors refuses shared ones)
            out[f"{b}x_proj.{k}.weight"] = tensors[b + "x_proj_weight"][k].clone()
            out[f"{b}dt_proj.{k}.weight"] = tensors[b + "dt_projs_weight"][k].clone()
            out[f"{b}dt_proj.{k}.bias"] = tensors[b + "dt_projs_bias"][k].clone()
    return out, kwargs


def _describe(kwargs: dict[str, Any]) -> str:
    return (f"width {kwargs['embed_dim']}, depths {'-'.join(map(str, kwargs['depths']))}, ssm_ratio "
            f"{kwargs['ssm_ratio']:g}, d_state {kwargs['d_state']}, {kwargs['patch_embed']} stem, conv bias "
            f"{'on' if kwargs['conv_bias'] else 'off'}")


def check_fits(tensors: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> None:
    """Raise unless ``tensors`` (this library's layout) load strictly into ``VSSM(**kwargs)``: built on the meta
    device (no memory, no initialisation), every key and shape compared; the message names the first difference."""
    from lowrank_vit.nn.vssm import VSSM

    with torch.device("meta"):
        skeleton = VSSM(**kwargs)
    own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for key, shape in own.items():
        if key not in tensors:
            raise VMambaCheckpointError(f"VMamba state dict converts without {key!r}, which VSSM({kwargs}) has")
        if tuple(tensors[key].shape) != shape:
            raise VMambaCheckpointError(f"VMamba state dict: {key} is {tuple(tensors[key].shape)} after conversion, "
                                        f"VSSM with these shapes wants {shape}")
    extra = next((k for k in tensors if k not in own), None)
    if extra is not None:
        raise VMambaCheckpointError(f"VMamba state dict converts to {extra!r}, which VSSM({kwargs}) does not have")


def vmamba_to_vssm(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`convert_vmamba`, then :func:`check_fits`: a state dict that ``VSSM(**kwargs).load_state_dict``
    accepts strictly, and those kwargs."""
    converted, kwargs = convert_vmamba(tensors)
    check_fits(converted, kwargs)
    return converted, kwargs


def load_vmamba(path: str | os.PathLike, **overrides: Any) -> torch.nn.Module:
    """A VSSM (``nn/vssm.py``) with the weights of a VMamba ``.pth`` file, in eval mode; ``overrides`` go to the
    constructor (e.g. ``img_size``, ``drop_path_rate``; not the shapes the weights fix)."""
    from lowrank_vit.nn.vssm import VSSM

    converted, kwargs = vmamba_to_vssm(read_vmamba_checkpoint(path))
    model = VSSM(**{**kwargs, **overrides})
    model.load_state_dict(converted, strict=True)
    return model.eval()


__all__ = ["PATHS", "STACKED", "VMambaCheckpointError", "check_fits", "convert_vmamba", "is_vmamba_layout",
           "load_vmamba", "read_vmamba_checkpoint", "vmamba_kwargs", "vmamba_to_vssm"]
