"""Tests of lowrank_vit/speed/profile.py."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit import CompressionConfig, compress
from lowrank_vit.core.latency import (
    ShapeLatency,
)
from lowrank_vit.nn.factorized import FactorizedLinear, LowRankZ
from lowrank_vit.speed import cached_profile, profile_model
from lowrank_vit.speed.profile import time_models
from tests.helpers import LATENCY_KWARGS, _latency_images, _latency_model, _t


def test_profile_covers_every_layer_with_the_rows_of_the_models_geometry(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path))
    model = _latency_model()
    table, path, fresh = cached_profile(model, batch=3, rank_step=8, repeats=1, warmup=1, min_time=0.0,
                                        progress=False)
    tokens = (LATENCY_KWARGS["img_size"] // LATENCY_KWARGS["patch_size"]) ** 2 + 1  # patches + the class token
    assert fresh and path.parent == tmp_path / "latency"
    assert len(table.layers) == 4 * LATENCY_KWARGS["depth"]
    assert {(s.in_features, s.out_features) for s in table.shapes.values()} == {(36, 108), (36, 36), (36, 108),
                                                                               (108, 36)}
    for s in table.shapes.values():
        assert s.rows == 3 * tokens
        assert list(s.ranks) == [r for r in range(8, s.in_features * s.out_features // (s.in_features +
                                                                                           s.out_features) + 1, 8)]
        assert len(s.factored) == len(s.ranks) and all(t.median > 0 and t.repeats == 1 for t in s.factored)
    assert table.model_ms.median > 0 and table.batch == 3
    again, path2, fresh2 = cached_profile(model, batch=3, rank_step=8, repeats=1, warmup=1, min_time=0.0,
                                          progress=False)
    assert (again, path2, fresh2) == (table, path, False)
    # a different torch version is a different cache entry, measured anew
    monkeypatch.setattr(torch, "__version__", "9.9")
    _, path3, fresh3 = cached_profile(model, batch=3, rank_step=8, repeats=1, warmup=1, min_time=0.0,
                                      progress=False)
    assert fresh3 and path3 != path


def test_profile_refuses_a_compressed_model_and_a_runtime_it_cannot_run():
    model = _latency_model()
    with pytest.raises(ValueError, match="runs float32"):
        profile_model(model, batch=1, runtime="onnxruntime", dtype="bfloat16")
    compress(model, _latency_images(), CompressionConfig(reduction=0.3, calib_samples=12, progress=False))
    with pytest.raises(ValueError, match="dense model"):
        profile_model(model, batch=1)


def test_time_models_times_the_folded_copy_and_leaves_the_model_alone():
    model = _latency_model()
    compress(
        model,
        _latency_images(),
        CompressionConfig(
            reduction=0.3,
            compensation="lowrank",
            decomposition="whitened",
            allocation="greedy",
            calib_samples=12,
            progress=False,
        ),
    )
    zs = [m for m in model.modules() if isinstance(m, LowRankZ)]
    assert zs
    times = time_models(
        {"m": model}, batch=2, input_size=(3, 40, 40), repeats=2, warmup=1, min_time=0.0, progress=False
    )
    assert times["m"].repeats == 2
    assert [m for m in model.modules() if isinstance(m, LowRankZ)] == zs  # not folded in place
    assert all(isinstance(m, FactorizedLinear) for m in model.modules() if hasattr(m, "U"))


def test_each_shapes_times_are_scaled_to_the_models_common_time():
    """A shape whose run saw the model at 20 ms (a busy machine) against a median of 15 ms is scaled by 15/20, one
    that saw 10 ms by 15/10: the layers are compared at one load."""
    from lowrank_vit.speed.profile import _common_load

    def shape(ms: float) -> ShapeLatency:
        return ShapeLatency(4, 4, 2, True, _t(ms), (1, 2), (_t(ms / 2), _t(ms)), _t(ms / 10))

    model_ms, scaled = _common_load(
        {"a": (shape(4.0), _t(10.0)), "b": (shape(8.0), _t(20.0)), "c": (shape(6.0), _t(15.0))}
    )
    assert model_ms.median == 15.0 and model_ms.repeats == 15
    assert scaled["a"].dense.median == pytest.approx(6.0) and scaled["b"].dense.median == pytest.approx(6.0)
    assert scaled["a"].factored[0].median == pytest.approx(3.0) and scaled["b"].overhead.median == pytest.approx(0.6)
    assert scaled["c"] == shape(6.0)
