"""Every registered decomposition method behaves the same way from the outside: the conformance test of the
registry (plan equals compress, the target is met, the model saves, loads and quantizes)."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit import compress, count_params
from lowrank_vit.config import DECOMPOSITIONS, CompressionConfig
from lowrank_vit.methods.decompositions import METHODS, Method, get_method, register_method
from lowrank_vit.pipeline import plan_compression

from conftest import assert_round_trip, make_images, make_tiny_vit


def test_registry_matches_the_config_choices():
    assert tuple(METHODS) == DECOMPOSITIONS
    with pytest.raises(ValueError, match="unknown decomposition 'nope'; registered: plain"):
        get_method("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_method(type("Again", (Method,), {"name": "plain"}))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("compensation", ["none", "lowrank"])
def test_every_method_conforms(name, compensation, tmp_path):
    images = make_images(32, seed=3)
    labels = torch.arange(32) % 10
    batches = [(images[:16], labels[:16]), (images[16:], labels[16:])]  # FWSVD and given labels need them
    config = CompressionConfig(reduction=0.5, decomposition=name, allocation="marginal" if name == "loss_aware"
                               else "greedy", compensation=compensation, calib_samples=32, progress=False)
    plan = plan_compression(make_tiny_vit(), batches, config)
    model = make_tiny_vit()
    before = count_params(model)
    report = compress(model, batches, config)
    assert plan.ranks == report.ranks and plan.params_after == report.params_after == count_params(model)
    assert abs(report.params_after - 0.5 * before) <= max(0.001 * 0.5 * before, 64)  # a 32-wide model's rank step
    assert all(layer.output_error >= 0 for layer in report.layers if layer.output_error == layer.output_error)
    assert (report.layers[0].predicted_loss is not None) == get_method(name).loss_units
    assert_round_trip(model, tmp_path / name, images[:4])


def test_the_pipeline_names_no_method():
    """COMCAT's attention heads reach the pipeline through ``Method.whole_modules`` like any method's units: the
    pipeline's code calls no method's own helpers and reads no method-specific attribute."""
    import ast
    from pathlib import Path

    import lowrank_vit.pipeline as pipeline

    tree = ast.parse(Path(pipeline.__file__).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    specific = ("comcat", "head", "asvd", "fwsvd", "fisher", "whitened", "loss_aware")
    assert not sorted(n for n in names if any(word in n.lower() for word in specific))


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_named_alone_gets_its_home_recipe(name):
    """``lowrank-vit compress --recipe NAME`` with a decomposition's name: that decomposition inside its own recipe."""
    import argparse

    from lowrank_vit.cli.compress import compression_config
    from lowrank_vit.config import RECIPES

    home = RECIPES[get_method(name).home_recipe]
    args = argparse.Namespace(recipe=name, reduction=0.5, target_params=None, calib_samples=8, rank_multiple=1,
                              quiet=True)
    config = compression_config(args, torch.device("cpu"))
    assert config.decomposition == name
    assert (config.allocation, config.compensation) == (home["allocation"], home["compensation"])
    assert (config.allocation == "marginal") == (name == "loss_aware")  # only the loss-aware method leaves the paper's


def test_the_documented_new_method_runs():
    """docs/api.md's "Adding a method" example, as written: registered after import, its name is a valid
    decomposition and compress meets the target with it."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    code = re.search(r"## Adding a method.*?```python\n(.*?)```", text, re.S).group(1)
    model = make_tiny_vit()
    before = count_params(model)
    namespace = {"model": model, "images": [make_images(16, seed=1)]}
    try:
        exec(compile(code, "docs/api.md", "exec"), namespace)
        report = namespace["report"]
        assert report.config["decomposition"] == "row_normalized"
        assert abs(report.params_after - 0.5 * before) <= max(0.001 * 0.5 * before, 64)
        assert all(layer.rank is not None for layer in report.layers)
    finally:
        METHODS.pop("row_normalized", None)
