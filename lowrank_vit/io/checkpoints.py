"""Reading a user's state dict from the files people have: safetensors, or PyTorch's ``torch.save`` files (``.pth``,
``.pt``, ``.bin``), the latter only through torch's weights-only unpickler, which builds tensors and plain containers
and refuses anything else (a full unpickle runs whatever code the file names; it is never done here).

Training scripts rarely save a bare state dict: the weights sit under ``state_dict``, ``model``, ``model_state_dict``
or ``module`` beside an optimizer and an epoch, and their keys carry ``module.`` (DistributedDataParallel) or
``_orig_mod.`` (``torch.compile``) in front. :func:`read_state_dict` unwraps both and says what it did.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
"""Keys under which training scripts nest the weights, tried in this order (``model_ema`` is deliberately absent:
the user says which weights by saving them)."""
PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes a wrapper adds (DDP, torch.compile): removed when every key has one."""


class CheckpointError(ValueError):
    """A file that is not a readable state dict; the message says what it is and how to write one."""


def checkpoint_format(path: str | os.PathLike) -> str:
    """"safetensors", "torch" (a zip written by ``torch.save``, or its older pickle format) or "unknown", from the
    file's first bytes rather than its name."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"  # 8 bytes of header length, then the JSON header
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # torch.save's zip, or a pickle's protocol byte
        return "torch"
    return "unknown"


def _unwrap(obj: Any, notes: list[str]) -> Any:
    """The state dict inside a training script's checkpoint dict (one level of nesting at a time)."""
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            return obj
        notes.append(f"the weights under {key!r}")
        obj = obj[key]
    return obj


def _strip_prefixes(tensors: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and tensors:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                notes.append(f"the {prefix!r} prefix removed")
                changed = True
    return tensors


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a checkpoint file and notes on what was unwrapped (empty for a bare state dict).

    Raises:
        CheckpointError: not safetensors nor a torch file; a torch file holding more than tensors and plain
            containers (the weights-only unpickler refused it); no state dict inside; non-tensor values.
    """
    path = Path(path).expanduser()
    kind = checkpoint_format(path)
    notes: list[str] = []
    if kind == "safetensors":
        try:
            return load_file(str(path)), notes
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{str(path)!r} is a damaged safetensors file ({err})") from None
    if kind == "unknown":
        raise CheckpointError(f"{str(path)!r} is neither a safetensors file nor a PyTorch file written by torch.save: "
                              f"save the weights with safetensors.torch.save_file(model.state_dict(), PATH) or "
                              f"torch.save(model.state_dict(), PATH)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{str(path)!r} holds Python objects besides tensors, which are only read by running "
                              f"the code they name, and that is never done here ({first[:160]}): load it yourself "
                              f"if you trust it and save model.state_dict() with torch.save or safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is a damaged PyTorch file ({type(err).__name__}: "
                              f"{str(err).strip()[:160]})") from None
    obj = _unwrap(obj, notes)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict (a dict of tensors): "
                              f"save model.state_dict()")
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if others:
        raise CheckpointError(f"{str(path)!r} holds a dict whose entries {', '.join(others[:4])} are not tensors, "
                              f"and none of {', '.join(WRAPPER_KEYS)} holds the weights: save model.state_dict()")
    return _strip_prefixes(dict(obj), notes), notes


__all__ = ["PREFIXES", "WRAPPER_KEYS", "CheckpointError", "checkpoint_format", "read_state_dict"]
