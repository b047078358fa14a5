"""Tests of lowrank_vit/core/stopwatch.py, on a scripted clock: every total is known exactly."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lowrank_vit.core import stopwatch
from lowrank_vit.core.stopwatch import StageClock, timed

CPU = torch.device("cpu")


class Clock:
    """perf_counter reads ``now``; the test moves it on by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(stopwatch, "time", SimpleNamespace(perf_counter=fake))
    return fake


def test_timed_adds_each_block_to_its_key(clock):
    totals: dict[str, float] = {"other": 1.0}
    with timed(totals, "fit", CPU):
        clock.now += 2.5
    with timed(totals, "fit", CPU):
        clock.now += 0.5
    clock.now += 10.0  # between blocks: not counted
    with timed(totals, "eval", CPU):
        clock.now += 4.0
    assert totals == {"other": 1.0, "fit": 3.0, "eval": 4.0}


def test_a_block_that_raises_is_not_timed(clock):
    totals: dict[str, float] = {}
    with pytest.raises(KeyError), timed(totals, "fit", CPU):
        clock.now += 3.0
        raise KeyError("boom")
    assert totals == {}
    stages = StageClock(CPU)
    with pytest.raises(ValueError, match="bad"), stages.stage("svd"):
        clock.now += 1.0
        raise ValueError("bad")
    assert stages.stages == {} and stages.substages == {}


def test_stage_less_a_substage_leaves_out_only_the_substage_time_inside_it(clock):
    stages = StageClock(CPU)
    with stages.sub("whitening"):  # before the stage: stays out of the subtraction
        clock.now += 5.0
    with stages.stage("decompose", less="whitening"):
        clock.now += 1.0
        with stages.sub("whitening"):
            clock.now += 3.0
        clock.now += 2.0
        with stages.sub("swap"):  # another substage: not subtracted
            clock.now += 0.5
    assert stages.stages == {"decompose": 3.5}  # 6.5 in all, less the 3 of whitening inside
    assert stages.substages == {"whitening": 8.0, "swap": 0.5}


def test_stage_less_a_substage_that_never_ran_is_the_whole_block(clock):
    stages = StageClock(CPU)
    with stages.stage("report", less="report_errors"):
        clock.now += 2.0
    with stages.stage("report"):
        clock.now += 1.0
    assert stages.stages == {"report": 3.0} and stages.substages == {}


def test_on_cuda_the_block_ends_after_its_queued_work(clock, monkeypatch):
    """The queued work's 4 s (the synchronize) count; no CUDA device is needed for the bookkeeping."""
    synced: list[torch.device] = []

    def synchronize(device):
        synced.append(device)
        clock.now += 4.0

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    gpu = torch.device("cuda", 0)
    stages = StageClock(gpu)
    with stages.stage("fit"):
        clock.now += 1.0
    assert stages.stages == {"fit": 5.0} and synced == [gpu]
    with pytest.raises(ZeroDivisionError), stages.stage("fit"):  # an error: neither synchronized nor timed
        clock.now += 1.0
        raise ZeroDivisionError
    with timed({}, "load", CPU):
        pass
    assert stages.stages == {"fit": 5.0} and synced == [gpu]  # and a CPU block synchronizes nothing


def test_with_the_real_clock_times_are_positive_finite_and_nested_ones_ordered():
    stages = StageClock(CPU)
    with stages.stage("outer"), stages.sub("inner"):
        sum(range(10_000))
    inner, outer = stages.substages["inner"], stages.stages["outer"]
    assert math.isfinite(outer) and 0 < inner <= outer
