"""A row's fine-tune over several processes: rank zero compresses once and hands the compressed model to the
processes Lightning starts, which load it instead of compressing again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from lowrank_vit.io.surgery import WEIGHTS_FILE, save_compressed

SHARED_DIR = ".compressed-for-ranks"



SHARED_ENV = "LOWRANK_VIT_COMPRESSED_FOR_RANKS"
"""Set by rank zero before the fine-tune starts the other DDP processes, which inherit it: JSON with the row's name
and the directory of the compressed model they load instead of compressing (:func:`share_compressed`)."""



@contextlib.contextmanager
def share_compressed(model: nn.Module, exp_name: str, out_dir: Path, enabled: bool) -> Iterator[None]:
    """Rank zero, around the fine-tune: save the compressed ``model`` for the DDP processes the fine-tune starts
    (they inherit :data:`SHARED_ENV`), so that they load it instead of repeating the compression: that saves the
    repeat's time and, on one host, its memory (up to 11 GB per process for ViT-L with the loss-aware recipe, while
    rank zero still holds the model), and makes every rank's ranks identical by construction. The directory and
    the variable are removed when the block ends, however it ends."""

    if not enabled:
        yield
        return
    shared = out_dir / SHARED_DIR
    shutil.rmtree(shared, ignore_errors=True)
    save_compressed(model, shared, metadata={"experiment": exp_name, "shared_with_ranks": True})
    os.environ[SHARED_ENV] = json.dumps({"experiment": exp_name, "path": str(shared.resolve())})
    try:
        yield
    finally:
        os.environ.pop(SHARED_ENV, None)
        shutil.rmtree(shared, ignore_errors=True)



def shared_compressed(exp_name: str) -> Path | None:
    """A non-zero DDP rank started by rank zero's fine-tune: the directory of rank zero's compressed model of this
    row (:func:`share_compressed`), else None (rank zero itself, or processes started by another launcher)."""

    text = os.environ.get(SHARED_ENV)
    if not text or is_rank_zero():
        return None
    try:
        shared = json.loads(text)
    except json.JSONDecodeError:
        return None
    path = Path(shared.get("path", "")) if isinstance(shared, dict) else None
    if path is None or shared.get("experiment") != exp_name or not (path / WEIGHTS_FILE).is_file():
        return None
    return path



def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0 and \
        int(os.environ.get("NODE_RANK", "0") or 0) == 0
