"""Interleaved timing: every repeat visits every candidate, in a rotating order, so that a change in the machine's
load (other jobs, frequency scaling) falls on all of them alike; a sample loops its call until it lasts ``min_time``
seconds, so that short calls are not timer noise; the median and quartiles of the repeats are reported
(:class:`lowrank_vit.core.latency.Timing`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from lowrank_vit.core.latency import Timing


def interleaved_timings(calls: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2,
                        min_time: float = 0.05, sync: Callable[[], None] = lambda: None,
                        on_repeat: Callable[[int], None] | None = None) -> dict[str, Timing]:
    """Per-call milliseconds of every entry of ``calls``: ``warmup`` untimed calls each (the fastest of them sets the
    loop count), then ``repeats`` interleaved samples each. ``sync`` waits for queued device work (CUDA);
    ``on_repeat(i)`` is called after each repeat (a progress bar)."""
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats and warmup must be at least 1, got {repeats} and {warmup}")
    names = list(calls)
    loops: dict[str, int] = {}
    for name, call in calls.items():
        seconds = min(_seconds(call, 1, sync) for _ in range(warmup))
        loops[name] = max(1, math.ceil(min_time / max(seconds, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        start = rep % len(names)
        for name in names[start:] + names[:start]:
            samples[name].append(1000.0 * _seconds(calls[name], loops[name], sync) / loops[name])
        if on_repeat is not None:
            on_repeat(rep)
    return {name: Timing.of(values) for name, values in samples.items()}


def _seconds(call: Callable[[], object], loops: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(loops):
        call()
    sync()
    return time.perf_counter() - start
