"""Files the library writes: JSON that strict readers accept, written whole or not at all (a reader sees the old
file or the new one, never half of one)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def strict_json(data: Any, **kwargs: Any) -> str:
    """JSON that strict readers (jq, browsers) accept: a NaN or infinite float becomes null, which ``json.dumps``
    would otherwise write as a bare ``NaN`` without ever asking ``default``; paths and devices become strings."""
    return json.dumps(_finite(data), default=_as_json, allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _as_json(value: Any) -> Any:
    if isinstance(value, (Path, torch.device)):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: readers see the old file or the
    new one, never half of one, and an interrupted write leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private, unlike any other file written
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as strict, indented JSON (:func:`strict_json`) at ``path``, written whole or not at all
    (:func:`atomic_write`); the parent folders are made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(strict_json(data, indent=2) + "\n"))


def _umask() -> int:
    """The process's umask (read by setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
