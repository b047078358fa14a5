"""Tests of experiments/_rows.py."""

from __future__ import annotations

import pytest
import torch

from experiments._rows import ARCHS, make_row
from lowrank_vit.config import CompressionConfig
from lowrank_vit.methods.prune import PruningConfig
from lowrank_vit.repro.registry import (
    Experiment,
    ModelConfig,
    RunConfig,
)
from tests.helpers import ALL

UNCOMPRESSED = ("baseline", "vmeanba", "prune", "vmeanba+prune")
"""The methods of rows without a low-rank step: the dense model, VMeanba's scans, pruning, and both."""


@pytest.mark.parametrize("exp", ALL, ids=lambda e: e.name)
def test_entry_is_complete_and_round_trips(exp: Experiment):
    table, arch, variant = exp.name.split("/")
    assert exp.table == table and exp.arch == arch and arch in ARCHS
    assert exp.description
    for scale in ("full", "smoke"):
        cfg = exp.config(scale)
        assert cfg.scale == scale
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
        assert (cfg.compression is None) == (exp.method in UNCOMPRESSED)
        assert (cfg.vmeanba is None) == (not exp.method.startswith("vmeanba"))
        assert (cfg.pruning is None) == (exp.method.removeprefix("vmeanba+") != "prune")
        if cfg.finetune is not None:
            assert cfg.compression is not None
    full, smoke = exp.full, exp.smoke
    assert full.model == ModelConfig("timm", ARCHS[arch].timm_name, pretrained=True)
    assert smoke.model == ModelConfig("standin", arch, pretrained=True)
    assert full.data.name == "imagenet-1k" and full.data.calib_samples == 1024
    assert smoke.data.name == "mnist-5k" and smoke.data.calib_samples == 256
    assert full.hardware.accelerator == "gpu" and smoke.hardware.accelerator == "cpu"
    if full.compression is not None:
        # same method at both scales: only the budget's form and the calibration size differ
        strip = dict(reduction=None, target_params=None, calib_samples=0)
        assert {**full.compression.to_dict(), **strip} == {**smoke.compression.to_dict(), **strip}
        assert full.compression.calib_samples == 1024 and smoke.compression.calib_samples == 256
        fraction = full.compression.reduction or 1 - full.compression.target_params / ARCHS[arch].params
        assert smoke.compression.reduction == pytest.approx(fraction, abs=1e-6)
        assert exp.reduction == pytest.approx(fraction)
    if full.finetune is not None:
        assert (full.finetune.epochs, full.finetune.lr) == (20, 1e-4)  # Section 4.1
    assert (full.finetune is None) == (smoke.finetune is None)
    assert full.quantization == smoke.quantization


def test_arch_parameter_counts_are_timms():
    from lowrank_vit.nn.adapters import timm_with_our_models

    timm = timm_with_our_models()  # timm's models and this library's (the VMamba sizes)
    for arch in ARCHS.values():
        with torch.device("meta"):
            model = timm.create_model(arch.timm_name.split(".")[0], pretrained=False)
        assert sum(p.numel() for p in model.parameters()) == arch.params, arch.key


# ------------------------------------------------------------------ every row's recipe, from its name (issue: tests)
# Written out here, not imported from RECIPES or experiments._rows.METHODS: a row that silently compresses with the
# library's default (or with a recipe that changed under it) differs from these literals and fails.
_PAPER = dict(decomposition="whitened", allocation="greedy", compensation="lowrank", solver="closed_form",
              z_fraction=0.05, gamma=80.0, greedy_iterations=500)


_LOSS_AWARE = dict(decomposition="loss_aware", allocation="marginal", compensation="none", bias_correction=True)


_VANILLA = dict(decomposition="plain", allocation="uniform", compensation="none")


_PEERS = {"flar-svd": dict(decomposition="flar", allocation="flar", compensation="none"),
          "svd-llm": dict(decomposition="svd_llm", allocation="uniform", compensation="none"),
          "svd-llm-update": dict(decomposition="svd_llm", allocation="uniform", compensation="none", refit=True),
          "svd-llm-v2": dict(decomposition="svd_llm", allocation="svd_llm_v2", compensation="none"),
          "kfac-lems": dict(decomposition="kfac", allocation="lems", compensation="none")}


_TABLE1_Z = {"lowrank": "lowrank", "diagonal": "diagonal", "sparse-unstructured": "sparse",
             "sparse-structured": "structured"}


def _declared(exp: Experiment) -> dict:
    """What the row's name says it runs: its table, variant and method, read independently of how it was built."""
    table, _, variant = exp.name.split("/")
    method = exp.method.removeprefix("vmeanba+")  # VMeanba first, then the low-rank recipe the name declares
    if method == "loss-aware":
        return _LOSS_AWARE
    if method == "vanilla":
        return _VANILLA
    if method in _PEERS:
        return _PEERS[method]
    if table == "table1":
        return {**_PAPER, "compensation": _TABLE1_Z[variant.removeprefix("z-")], "solver": "sgd"}
    if method == "ours":
        return _PAPER
    if method == "paper-literal":
        return {**_PAPER, "decomposition": "mean", "solver": "sgd"}
    if method == "comcat-search":  # COMCAT's own search at its public schedule and search batch (run.sh)
        batch = {"deit_s": 64, "deit_b": 16}[exp.arch]
        return dict(decomposition="comcat", allocation="comcat_search", compensation="none",
                    settings={"search_rounds": 30, "search_batch_size": batch})
    if table == "compare":  # the paper's recipe with another decomposition, nothing else changed
        return {**_PAPER, "decomposition": method}
    kind = method.split("-", 1)[1]
    if method.startswith("decomposition-"):
        return {**_PAPER, "decomposition": kind, "allocation": "uniform", "compensation": "none"}
    if method.startswith("solver-"):
        return {**_PAPER, "solver": kind}
    if method.startswith("allocation-"):
        return {**_PAPER, "allocation": kind, "compensation": "none", "decomposition": variant.split("-")[2]}
    if method.startswith("z-"):
        return {**_PAPER, "compensation": "lowrank" if kind == "on" else "none"}
    raise AssertionError(f"no declared recipe for {exp.name} (method {method!r}): add it to this test")


@pytest.mark.parametrize("exp", [e for e in ALL if e.method not in UNCOMPRESSED], ids=lambda e: e.name)
def test_every_rows_configuration_is_its_declared_recipe_and_nothing_else(exp: Experiment):
    """Table-driven over every compressing row at both scales: the configuration equals the recipe its name declares
    on top of the defaults, plus the budget and the scale's calibration count, field by field."""
    declared = _declared(exp)
    for run, calib in ((exp.full, 1024), (exp.smoke, 256)):
        got = run.compression.to_dict()
        budget = {key: got[key] for key in ("reduction", "target_params")}
        expected = CompressionConfig(**budget, calib_samples=calib, **declared).to_dict()
        wrong = {key: (got[key], expected[key]) for key in expected if got[key] != expected[key]}
        assert not wrong, f"{exp.name} ({run.scale}): field: (row, declared) {wrong}"


@pytest.mark.parametrize("exp", [e for e in ALL if e.full.pruning is not None], ids=lambda e: e.name)
def test_a_pruning_row_prunes_the_fraction_its_name_declares_at_both_scales_and_nothing_else(exp: Experiment):
    """``...-prune-40``: 40% of the block weights under one global threshold (the library's default), at both
    scales, training-free;
    ``vmeanba-kK-prune-...``: VMeanba in K blocks first."""
    variant = exp.name.split("/")[2]
    declared = PruningConfig(int(variant.rsplit("-", 1)[1]) / 100)
    for cfg in (exp.full, exp.smoke):
        assert cfg.pruning == declared
        assert cfg.compression is None and cfg.finetune is None and cfg.quantization is None
        assert (cfg.vmeanba.num_blocks if cfg.vmeanba else None) == (
            int(variant.split("-")[1].removeprefix("k")) if variant.startswith("vmeanba-") else None)


def test_make_row_takes_pruning_only_with_the_prune_method():
    with pytest.raises(ValueError, match="pruning=PruningConfig\\(...\\) goes with method='prune' and only with it"):
        make_row("vmeanba/vmamba_t/x", "loss-aware", reduction=0.4, pruning=PruningConfig())
    with pytest.raises(ValueError, match="got method='prune', pruning=None"):
        make_row("vmeanba/vmamba_t/x", "prune")
    assert make_row("vmeanba/vmamba_t/x", "prune", pruning=PruningConfig()).method == "prune"
