"""The default Gram product precision: "auto" (None) resolved on the statistics' device, float32 on CUDA for every
method, today's rule on the CPU; explicit values and older configs respected; the report records what was used."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit import CompressionConfig, compress
from lowrank_vit import config as config_module
from lowrank_vit.config import DECOMPOSITIONS, float32_matmul_is_ieee, recipe, resolve_gram_precision
from lowrank_vit.methods.decompositions import get_method

from conftest import make_images, make_tiny_vit

GRADIENT_PASS = [name for name in DECOMPOSITIONS if get_method(name).gradient_pass]
FORWARD_ONLY = [name for name in DECOMPOSITIONS if not get_method(name).gradient_pass]


def _auto(decomposition: str) -> CompressionConfig:
    labels = {"fisher_labels": "sampled"} if decomposition == "loss_aware" else {}
    return CompressionConfig(reduction=0.5, decomposition=decomposition, allocation="uniform", **labels)


def test_the_registries_hold_both_kinds_of_method():
    """The rule below is tested on every registered method; it needs methods of both kinds to mean anything."""
    assert "loss_aware" in GRADIENT_PASS and {"whitened", "plain", "asvd", "fwsvd", "comcat"} <= set(FORWARD_ONLY)


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
def test_auto_is_float32_on_cuda_for_every_method(decomposition):
    assert _auto(decomposition).gram_precision is None  # "auto" stays in the config until the device is known
    assert resolve_gram_precision(_auto(decomposition), "cuda", float32_exact=True) == "float32"


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
def test_auto_on_the_cpu_keeps_the_earlier_rule(decomposition):
    """float32 for the gradient-pass method, float64 for the others, as the config resolved it before."""
    expected = "float32" if decomposition in GRADIENT_PASS else "float64"
    assert resolve_gram_precision(_auto(decomposition), "cpu", float32_exact=True) == expected


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
def test_auto_never_picks_reduced_float32_products(decomposition, device_type):
    """TF32 (CUDA) or bfloat16 (CPU) float32 matmuls are not what the precision comparison measured."""
    assert resolve_gram_precision(_auto(decomposition), device_type, float32_exact=False) == "float64"


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", ["paper", "loss-aware", "vanilla"])
def test_an_explicit_precision_is_always_respected(name, precision, device_type, exact):
    cfg = recipe(name, reduction=0.5, gram_precision=precision)
    assert cfg.gram_precision == precision
    assert resolve_gram_precision(cfg, device_type, float32_exact=exact) == precision


def test_float32_matmul_is_ieee_reads_torch_settings():
    """The default reads torch's matmul setting: "high" makes CUDA's float32 products TF32, so "auto" is float64."""
    before = torch.get_float32_matmul_precision()
    assert before == "highest"  # torch's default, which every other test runs with
    try:
        assert float32_matmul_is_ieee("cuda") and float32_matmul_is_ieee("cpu")
        assert resolve_gram_precision(recipe("paper", reduction=0.5), "cuda") == "float32"
        torch.set_float32_matmul_precision("high")
        assert not float32_matmul_is_ieee("cuda")
        assert resolve_gram_precision(recipe("paper", reduction=0.5), "cuda") == "float64"
        torch.set_float32_matmul_precision("medium")
        assert not float32_matmul_is_ieee("cpu")
        assert resolve_gram_precision(recipe("loss-aware", reduction=0.5), "cpu") == "float64"
    finally:
        torch.set_float32_matmul_precision(before)
    assert float32_matmul_is_ieee("cuda") and float32_matmul_is_ieee("cpu")


def test_configs_of_earlier_versions_load_unchanged():
    """Earlier versions wrote the resolved value: it is an explicit choice now, kept as it was; a config written
    without the field reads as "auto"; a bad value is still an error."""
    for written in ("float64", "float32"):
        data = {**recipe("paper", reduction=0.5).to_dict(), "gram_precision": written}
        assert CompressionConfig.from_dict(data).gram_precision == written
    data = recipe("paper", reduction=0.5).to_dict()
    del data["gram_precision"]
    assert CompressionConfig.from_dict(data).gram_precision is None
    auto = recipe("paper", reduction=0.5)
    assert CompressionConfig.from_dict(auto.to_dict()) == auto
    with pytest.raises(ValueError, match="gram_precision"):
        CompressionConfig(reduction=0.5, gram_precision="bfloat16")


def _compress_recording(monkeypatch, cfg: CompressionConfig) -> tuple[dict, list[str]]:
    """Compress a tiny ViT on the CPU: the report's config, and the precision each statistics pass was given."""
    import lowrank_vit.methods.decompositions as decompositions

    seen: list[str] = []
    for name in ("collect_statistics", "collect_loss_statistics"):
        real = getattr(decompositions, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs["gram_precision"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(decompositions, name, spy)
    images = make_images(32, seed=1)
    report = compress(make_tiny_vit(), [images[i: i + 16] for i in range(0, 32, 16)], cfg)
    return report.config, seen


@pytest.mark.parametrize(("name", "used"), [("paper", "float64"), ("loss-aware", "float32")])
def test_the_report_records_the_precision_used_on_the_cpu(monkeypatch, name, used):
    cfg = recipe(name, reduction=0.5, calib_samples=32, progress=False)
    config, seen = _compress_recording(monkeypatch, cfg)
    assert seen == [used] and config["gram_precision"] == used
    assert cfg.gram_precision is None  # the caller's config is not changed


def test_the_pipeline_resolves_on_the_models_device(monkeypatch):
    """With the CPU counted among the float32 device types (as CUDA is), the paper's recipe calibrates in float32:
    the pipeline asks the resolution about the device its statistics run on, and the report says so."""
    monkeypatch.setattr(config_module, "FLOAT32_GRAM_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    config, seen = _compress_recording(monkeypatch, recipe("paper", reduction=0.5, calib_samples=32, progress=False))
    assert seen == ["float32"] and config["gram_precision"] == "float32"
    explicit = recipe("paper", reduction=0.5, calib_samples=32, progress=False, gram_precision="float64")
    config, seen = _compress_recording(monkeypatch, explicit)
    assert seen == ["float64"] and config["gram_precision"] == "float64"


class _Stop(Exception):
    """Raised by a stand-in calibration once it has seen what the pipeline gives it."""


@pytest.mark.parametrize(("device", "used"), [("cuda", "float32"), ("cpu", "float64")])
def test_compress_resolves_on_the_configured_device(monkeypatch, device, used):
    """The paper's recipe given ``device="cuda"`` reaches its calibration with float32 products (no GPU is touched:
    the calibration is replaced by one that records its arguments and stops), and with float64 on the CPU."""
    seen = []

    def calibrate(self, model, layers, batches, cfg, device, sample_tokens, gram_space):
        seen.append((cfg.gram_precision, device.type))
        raise _Stop

    monkeypatch.setattr(type(get_method("whitened")), "calibrate", calibrate)
    with pytest.raises(_Stop):
        compress(make_tiny_vit(), [make_images(16)], recipe("paper", reduction=0.5, device=device, progress=False))
    assert seen == [(used, device)]


def test_a_finished_row_of_an_earlier_version_is_still_the_same_config():
    """result.json of an earlier version holds the resolved precision; the same row with "auto" is not "another
    config" (which would refuse to resume), while an explicit different precision is."""
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.rows import comparable

    for name, written in (("table2/deit_s/ours-50", "float64"), ("table2/deit_s/loss-aware-50", "float32")):
        current = get_experiment(name).config("smoke").to_dict()
        assert current["compression"]["gram_precision"] is None
        earlier = {**current, "compression": {**current["compression"], "gram_precision": written}}
        assert comparable(earlier) == comparable(current)
        other = "float32" if written == "float64" else "float64"
        different = {**current, "compression": {**current["compression"], "gram_precision": other}}
        assert comparable(different) != comparable(current)
