"""Tests of lowrank_vit/speed/timing.py."""

from __future__ import annotations

from lowrank_vit.speed import interleaved_timings


def test_interleaved_timing_rotates_the_order_of_every_repeat():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timings = interleaved_timings(calls, repeats=3, warmup=1, min_time=0.0)
    assert order[3:] == list("abc" "bca" "cab")  # after one warm-up call each
    assert all(t.repeats == 3 for t in timings.values())
