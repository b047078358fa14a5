"""Wall times of a computation's stages, kept apart from the computation: the clock whose totals ``compress``
reports as its ``stage_seconds`` and ``substage_seconds``. (Inference speed is measured by
:mod:`lowrank_vit.speed.timing`, in interleaved repeats.)"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class StageClock:
    """Wall times summed by key: ``stages``, the parts of a run, and ``substages``, finer timers inside and between
    them (a stage may leave a substage's time out). Each block is timed to the end of the work it queued on the
    device (CUDA); a block that raises is not timed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stages: dict[str, float] = {}
        self.substages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, key: str, *, less: str | None = None) -> Iterator[None]:
        """Time the block as stage ``key``, less the time substage ``less`` (if given) spent inside it."""
        before = self.substages.get(less, 0.0) if less else 0.0
        with timed(self.stages, key, self.device):
            yield
        if less:
            self.stages[key] -= self.substages.get(less, 0.0) - before

    def sub(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Time the block as substage ``key``."""
        return timed(self.substages, key, self.device)


@contextlib.contextmanager
def timed(totals: dict[str, float], key: str, device: torch.device) -> Iterator[None]:
    """Add the block's wall time to ``totals[key]`` (after the device's queued work, on CUDA)."""
    start = time.perf_counter()
    yield  # an exception propagates untimed (and touches no device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
