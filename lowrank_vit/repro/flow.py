"""The compression step both drivers run: a registry row (:mod:`lowrank_vit.repro.runner`) and ``lowrank-vit
compress`` (:mod:`lowrank_vit.cli.compress`). Where the model comes from and where it goes differ between them (a
row's config and result directory; a user's weights and a model directory written whole), so each loads and saves
its own way; what is done to the model in between is this one function, in this one order.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lowrank_vit.config import CompressionConfig
from lowrank_vit.methods.prune import prune_model
from lowrank_vit.methods.vmeanba import apply_vmeanba
from lowrank_vit.pipeline import compress


@dataclass
class Compressed:
    """What :func:`compress_model` did: the low-rank report (None without a compression config), VMeanba's and the
    pruning's reports as dicts (None without them), the model as it was before the low-rank step when asked for (to
    time it against the compressed one), and each step's wall time."""

    report: Any = None
    vmeanba: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    before_lowrank: nn.Module | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def compress_model(model: nn.Module, calibration: Callable[[], Iterable], compression: CompressionConfig | None,
                   vmeanba: Any = None, *, device: torch.device, progress: bool,
                   available: int | None = None, keep_before_lowrank: bool = False,
                   say: Callable[[str], None] = lambda message: None, pruning: Any = None) -> Compressed:
    """VMeanba's channel-mean scans first, chosen on the dense model (the paper's order for state-space models:
    the scans are picked by their effect on the model as it is), then the magnitude pruning of the block linear
    weights (VMeanba's paper prunes the model its scans run in; the pruning reads weights only, so the order does
    not change which weights go), then the low-rank compression of every block linear layer, in place on ``model``
    (moved to ``device``).

    Args:
        pruning: a :class:`~lowrank_vit.methods.prune.PruningConfig`, or None. Refused together with
            ``compression``: the low-rank step would replace the pruned weights by dense factors.
        calibration: returns a fresh iterable of calibration batches (each step reads them from the start).
        available: the calibration images the data holds, where known: VMeanba's scans are told to read no more,
            so that its progress bar and report count the images it had (a caller caps ``compression.calib_samples``
            itself, as the config it saves should say so too).
        keep_before_lowrank: return a copy of the model before the low-rank step (after the scans).
        say: where a one-line announcement of each step goes.
    """

    if pruning is not None and compression is not None:  # checked before any work (a RunConfig refuses it too)
        raise ValueError("pruning and a low-rank compression do not combine: the low-rank step replaces the pruned "
                         "weights by dense factors")
    done = Compressed()
    model.to(device)
    if vmeanba is not None:
        count = vmeanba.calib_samples if available is None else min(vmeanba.calib_samples, available)
        say("VMeanba, the channel-mean scan in " + (f"{vmeanba.num_blocks} block(s)" if vmeanba.num_blocks
                                                    else f"the blocks that reach {vmeanba.target_speedup}x"))
        start = time.perf_counter()
        done.vmeanba = apply_vmeanba(model, calibration(), replace(vmeanba, progress=progress),
                                     calib_samples=count).to_dict()
        done.seconds["vmeanba"] = round(time.perf_counter() - start, 3)
    if pruning is not None:
        say(f"pruning {100 * pruning.sparsity:g}% of the block linear weights by magnitude ({pruning.scope} scope)")
        start = time.perf_counter()
        done.pruning = prune_model(model, pruning).to_dict()
        done.seconds["pruning"] = round(time.perf_counter() - start, 3)
    if compression is not None:
        done.before_lowrank = copy.deepcopy(model) if keep_before_lowrank else None
        say(f"compressing ({compression.decomposition} SVD, {compression.allocation} ranks, Z "
            f"{compression.compensation})")
        start = time.perf_counter()
        done.report = compress(model, calibration(), replace(compression, device=str(device), progress=progress))
        done.seconds["compress"] = round(time.perf_counter() - start, 3)
    return done
