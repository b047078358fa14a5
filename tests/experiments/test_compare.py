"""Tests of experiments/compare.py."""

from __future__ import annotations

import pytest

from lowrank_vit.config import CompressionConfig
from lowrank_vit.repro.registry import (
    Experiment,
    PaperResult,
    get_experiment,
    tables,
)
from tests.helpers import COMPARE

COMPARE_METHODS = ("loss-aware", "ours", "plain", "mean", "asvd", "fwsvd", "comcat", "flar-svd", "svd-llm",
                   "svd-llm-update", "svd-llm-v2", "kfac-lems")


PEERS = {  # the peers' published recipes (docs/peers.md): (decomposition, allocation, compensation, refit)
    "flar-svd": ("flar", "flar", "none", False),
    "svd-llm": ("svd_llm", "uniform", "none", False),  # the published pipeline: whitening alone
    "svd-llm-update": ("svd_llm", "uniform", "none", True),
    "svd-llm-v2": ("svd_llm", "svd_llm_v2", "none", False),
    "kfac-lems": ("kfac", "lems", "none", False),
}


COMPARE_EXPECTED = [f"compare/{arch}/{method}-{pct}{suffix}" for arch in ("deit_s", "deit_b")
                    for method in COMPARE_METHODS for pct in (40, 50, 60) for suffix in ("", "-noft")] + \
    [f"compare/{arch}/comcat-search-{pct}{suffix}" for arch, pct in (("deit_s", 50), ("deit_b", 60))
     for suffix in ("", "-noft")]
COMCAT_SEARCH_BATCH = {"deit_s": 64, "deit_b": 16}  # its public run.sh: --batch-size-search


def test_compare_rows_are_registered_under_their_exact_names():
    assert [e.name for e in COMPARE] == COMPARE_EXPECTED  # 144 + 4 rows, in the table's order
    assert "compare" in tables()


@pytest.mark.parametrize("exp", COMPARE, ids=lambda e: e.name)
def test_compare_row_changes_only_the_decomposition(exp: Experiment):
    _, arch, variant = exp.name.split("/")
    noft = ["noft"] if variant.endswith("-noft") else []
    method, pct = variant.removesuffix("-noft").rsplit("-", 1)
    decomposition = {"ours": "whitened", "loss-aware": "loss_aware"}.get(method, method)
    assert exp.method == method and exp.reduction == pytest.approx(int(pct) / 100)
    named = method.split("-")[0] if method in PEERS or method == "comcat-search" else decomposition.replace("_", "-")
    assert named in exp.description.lower()
    for scale in ("full", "smoke"):
        cfg = exp.config(scale)
        c = cfg.compression
        if method == "comcat-search":  # COMCAT's own search at its published target and schedule
            assert (c.decomposition, c.allocation, c.compensation) == ("comcat", "comcat_search", "none")
            assert c.settings == {"search_rounds": 30, "search_batch_size": COMCAT_SEARCH_BATCH[arch]}
            assert (cfg.finetune is None) == (noft == ["noft"])
            CompressionConfig.from_dict(c.to_dict())
            continue
        if method in PEERS:  # the peer's own recipe, nothing of ours
            assert (c.decomposition, c.allocation, c.compensation, c.refit) == PEERS[method]
            assert c.reduction == pytest.approx(int(pct) / 100) and c.settings == {}
            assert (cfg.finetune is None) == (noft == ["noft"])
            CompressionConfig.from_dict(c.to_dict())
            continue
        assert c.decomposition == decomposition
        shared = ("marginal", "none") if method == "loss-aware" else ("greedy", "lowrank")
        assert (c.allocation, c.compensation, c.solver, c.z_fraction) == (*shared, "closed_form", 0.05)
        assert c.reduction == pytest.approx(int(pct) / 100) and c.target_params is None
        assert (cfg.finetune is None) == (noft == ["noft"])
        assert cfg.quantization is None
        CompressionConfig.from_dict(c.to_dict())  # valid at both scales


def test_compare_paper_numbers_only_where_a_paper_prints_them():
    from experiments.paper import TABLE2

    for exp in COMPARE:
        _, arch, variant = exp.name.split("/")
        if exp.method == "ours" and not variant.endswith("-noft"):
            pct = int(variant.split("-")[1])
            assert exp.paper == PaperResult(*TABLE2[arch][1 + (40, 50, 60).index(pct)])
            assert any("Table 2" in note for note in exp.notes)
        else:
            assert exp.paper == PaperResult(), exp.name
    assert get_experiment("compare/deit_b/ours-50").paper == PaperResult(43.3, 81.35)
    assert any("no Z" in n for n in get_experiment("compare/deit_s/comcat-50-noft").notes)
