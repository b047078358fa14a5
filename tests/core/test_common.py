"""Tests of lowrank_vit/core/common.py."""

from __future__ import annotations

import ctypes
import gc
import math
import sys
import weakref
from dataclasses import dataclass
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lowrank_vit.core.common import (
    Registry,
    batch_images,
    batch_labels,
    check_count,
    check_number,
    from_fields,
    release_freed_memory,
    settings_of,
    smooth_images,
)


@dataclass
class Settings:
    rank: int = 4
    damping: float = 0.1


def test_registry_adds_looks_up_and_refuses_duplicates_and_unknown_names():
    registry: Registry[int] = Registry("Z kind", also=("none",))
    assert registry.add("lowrank", 1) == 1
    registry.add("full", 2)
    assert registry.lookup("full") == 2
    with pytest.raises(ValueError, match="Z kind 'full' is registered twice"):
        registry.add("full", 3)
    assert registry["full"] == 2  # the first entry stays
    with pytest.raises(ValueError) as error:
        registry.lookup("diag")
    assert str(error.value) == "unknown Z kind 'diag'; registered: none, lowrank, full"


def test_registry_register_stores_an_instance_under_the_class_name_and_returns_the_class():
    registry: Registry[object] = Registry("policy")

    @registry.register
    class Greedy:
        name = "greedy"

    assert Greedy.__name__ == "Greedy"  # the decorator gives the class back, not the instance
    assert isinstance(registry.lookup("greedy"), Greedy)
    with pytest.raises(ValueError, match="policy 'greedy' is registered twice"):
        registry.register(Greedy)


def test_from_fields_builds_the_dataclass_and_names_every_unknown_key():
    assert from_fields(Settings, {"rank": 8}) == Settings(rank=8, damping=0.1)
    with pytest.raises(ValueError) as error:
        from_fields(Settings, {"rank": 8, "dampnig": 0.2, "alpha": 1})
    assert str(error.value) == "unknown Settings field(s): alpha, dampnig"


def test_settings_of_keeps_the_declared_keys_over_the_defaults():
    cfg = SimpleNamespace(settings={"damping": 0.5, "other_method_key": 3})
    assert settings_of(cfg, Settings) == Settings(rank=4, damping=0.5)
    assert settings_of(SimpleNamespace(settings=None), Settings) == Settings()
    assert settings_of(object(), Settings) == Settings()  # no settings attribute at all


def test_check_number_accepts_values_inside_the_rule_and_refuses_the_others_by_name():
    for value, rule in ((1, "> 0"), (0.0, ">= 0"), (1.5, "> 1"), (0.0, "[0, 0.5)"), (1.0, "(0, 1]"), (0.5, "(0, 1)"),
                        (0.0, "[0, 1)")):
        check_number("x", value, rule)
    for value, rule, message in (
        (0, "> 0", "lr must be a finite number > 0, got 0"),
        (-0.1, ">= 0", "lr must be a finite number >= 0, got -0.1"),
        (1, "> 1", "lr must be a finite number > 1, got 1"),
        (0.5, "[0, 0.5)", "lr must lie in [0, 0.5), got 0.5"),
        (0, "(0, 1]", "lr must lie in (0, 1], got 0"),
        (1.0, "(0, 1)", "lr must lie in (0, 1), got 1.0"),
        (True, "> 0", "lr must be a finite number > 0, got True"),  # a bool is not a number here
        ("0.5", "(0, 1)", "lr must lie in (0, 1), got '0.5'"),
        (math.nan, ">= 0", "lr must be a finite number >= 0, got nan"),
        (math.inf, "> 0", "lr must be a finite number > 0, got inf"),
    ):
        with pytest.raises(ValueError) as error:
            check_number("lr", value, rule)
        assert str(error.value) == message


def test_check_number_names_the_known_rules_for_an_unknown_one_whatever_the_value():
    for value in (0.5, "0.5"):  # the rule is checked first: a typo in it is not blamed on the value
        with pytest.raises(ValueError) as error:
            check_number("lr", value, ">0")
        assert str(error.value) == ("unknown rule '>0' for lr; known: '> 0', '>= 0', '> 1', '[0, 0.5)', '(0, 1]', "
                                    "'(0, 1)', '[0, 1)'")


def test_check_number_refuses_a_numpy_scalar_as_not_a_python_number_rather_than_out_of_range():
    check_number("x", np.float64(0.5), "(0, 1)")  # a float subclass, which JSON writes as a float
    # float32 and int64 are numbers that a saved config (JSON) cannot hold: refused here, not after the compression
    for value, rule in ((np.float32(0.5), "(0, 1)"), (np.int64(3), "> 0"), (Fraction(1, 2), "(0, 1)")):
        with pytest.raises(ValueError) as error:
            check_number("lr", value, rule)
        assert str(error.value) == f"lr must be a Python int or float, got {value!r}"


def test_check_count_accepts_positive_integers_only():
    check_count("batch", 1)
    check_count("batch", 10 ** 12)
    for bad in (0, -3, True, 2.0, "3", None):
        with pytest.raises(ValueError) as error:
            check_count("batch", bad)
        assert str(error.value) == f"batch must be a positive integer, got {bad!r}"


def test_batch_images_and_labels_read_every_accepted_batch_format():
    images, labels = torch.zeros(2, 3, 4, 4), torch.tensor([1, 0])
    assert batch_images(images) is images and batch_labels(images) is None
    for pair in ((images, labels), [images, labels, "paths"]):
        assert batch_images(pair) is images and batch_labels(pair) is labels
    for image_key, label_key in zip(("image", "images", "pixel_values", "img"),
                                    ("label", "labels", "target", "targets"), strict=True):
        batch = {image_key: images, label_key: labels, "id": 7}
        assert batch_images(batch) is images and batch_labels(batch) is labels
    # a key that holds no tensor is passed over for the next one
    assert batch_images({"image": "a.png", "pixel_values": images}) is images
    assert batch_labels({"label": [1, 0], "targets": labels}) is labels
    for nothing in ([], (), {}, {"x": images}, "images", None, ("a", labels)):
        assert batch_images(nothing) is None
    assert batch_labels((images,)) is None and batch_labels({"y": labels}) is None


def test_smooth_images_are_bilinear_upsamplings_of_a_seeded_coarse_grid():
    out = smooth_images(3, (2, 40, 24), torch.Generator().manual_seed(5))
    assert out.shape == (3, 2, 40, 24)
    # 40 // 16 = 2 and 24 // 16 = 1 -> 2 (at least 2): a 2x2 grid drawn first from the generator
    coarse = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(5))
    # without aligned corners, each corner pixel is its grid value, and every pixel a convex mix of the four
    torch.testing.assert_close(out[..., 0, 0], coarse[..., 0, 0])
    torch.testing.assert_close(out[..., -1, -1], coarse[..., 1, 1])
    low, high = coarse.amin(dim=(-2, -1)), coarse.amax(dim=(-2, -1))
    assert (out >= low[..., None, None] - 1e-6).all() and (out <= high[..., None, None] + 1e-6).all()
    torch.testing.assert_close(out, smooth_images(3, (2, 40, 24), torch.Generator().manual_seed(5)))
    assert not torch.equal(out, smooth_images(3, (2, 40, 24), torch.Generator().manual_seed(6)))


def test_release_freed_memory_collects_cycles_and_trims_the_heap_on_linux(monkeypatch):
    class Node:
        pass

    calls: list[tuple[str, int]] = []

    class FakeLibc:
        def __init__(self, name):
            self.name = name

        def malloc_trim(self, pad):
            calls.append((self.name, pad))

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", FakeLibc)
    was_enabled = gc.isenabled()
    gc.disable()  # only the function's own collection may free the cycle
    try:
        node = Node()
        node.self = node
        alive = weakref.ref(node)
        del node
        assert alive() is not None
        assert release_freed_memory() is None
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()
    assert len(calls) == 1 and calls[0][1] == 0


def test_release_freed_memory_does_nothing_off_linux_and_tolerates_a_libc_without_malloc_trim(monkeypatch):
    def refuse(name):
        raise AssertionError("libc loaded off Linux")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    monkeypatch.setattr(sys, "platform", "darwin")
    release_freed_memory()
    monkeypatch.setattr(sys, "platform", "linux")

    def no_libc(name):
        raise OSError("cannot load the C library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    release_freed_memory()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a C library without malloc_trim (musl)
    release_freed_memory()


_TINY = 5e-324  # the smallest positive float
_BELOW_ONE, _ABOVE_ONE, _BELOW_HALF = math.nextafter(1.0, 0.0), math.nextafter(1.0, 2.0), math.nextafter(0.5, 0.0)


@pytest.mark.parametrize(("rule", "value", "ok"), [
    ("> 0", 0, False), ("> 0", 0.0, False), ("> 0", _TINY, True), ("> 0", -_TINY, False),
    (">= 0", 0, True), (">= 0", -_TINY, False), (">= 0", _TINY, True),
    ("> 1", 1, False), ("> 1", 1.0, False), ("> 1", _ABOVE_ONE, True), ("> 1", 2, True), ("> 1", _BELOW_ONE, False),
    ("[0, 0.5)", 0, True), ("[0, 0.5)", -_TINY, False), ("[0, 0.5)", 0.5, False), ("[0, 0.5)", _BELOW_HALF, True),
    ("(0, 1]", 0, False), ("(0, 1]", _TINY, True), ("(0, 1]", 1, True), ("(0, 1]", _ABOVE_ONE, False),
    ("(0, 1)", 0, False), ("(0, 1)", 0.0, False), ("(0, 1)", _TINY, True), ("(0, 1)", 1, False),
    ("(0, 1)", _BELOW_ONE, True),
    ("[0, 1)", 0.0, True), ("[0, 1)", -_TINY, False), ("[0, 1)", 1, False), ("[0, 1)", 1.0, False),
    ("[0, 1)", _BELOW_ONE, True),
])
def test_check_number_at_each_rules_edges_and_one_float_either_side(rule, value, ok):
    """Every rule of ``check_number`` at its threshold (int and float) and at the nearest float on each side."""
    if ok:
        check_number("x", value, rule)
    else:
        with pytest.raises(ValueError, match=r"^x must (lie in|be a finite number) "):
            check_number("x", value, rule)
