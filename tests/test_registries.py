"""The allocation policies and the kinds of Z are registries that match the config's choices; every registered kind
of correction Z behaves the same way from the outside: its parameter count is what its
module holds, its spec rebuilds it, its fit lowers eq. (10), and a model compressed with it plans, saves, loads and
quantizes like any other (the Z-kind half of the registry's conformance test)."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit import compress, count_params
from lowrank_vit.config import ALLOCATIONS, COMPENSATIONS, CompressionConfig
from lowrank_vit.core.allocate import POLICIES, Policy, get_policy, register_policy
from lowrank_vit.core.decompose import whitening
from lowrank_vit.methods.compensate import (
    Z_KINDS,
    CompensationProblem,
    ZKind,
    closed_form_z,
    get_z_kind,
    init_z_for_sgd,
    register_z_kind,
    z_param_count,
    z_spec,
)
from lowrank_vit.nn.factorized import Z_MODULES, build_z
from lowrank_vit.pipeline import plan_compression

from conftest import assert_round_trip, make_images, make_tiny_vit


def test_allocation_policies_match_the_config_choices():
    assert tuple(POLICIES) == ALLOCATIONS
    assert [name for name, policy in POLICIES.items() if policy.records_trace] == \
        ["marginal", "integer", "lems", "flar", "svd_llm_v2"]
    assert [name for name, policy in POLICIES.items() if policy.needs_probe] == ["lems", "flar"]
    with pytest.raises(ValueError, match="unknown allocation 'nope'; registered: uniform"):
        get_policy("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_policy(Policy("greedy", POLICIES["greedy"].curve, POLICIES["greedy"].run))


def test_z_kinds_match_the_config_choices_and_the_modules():
    assert COMPENSATIONS == ("none", *Z_KINDS)
    assert set(Z_MODULES) == set(Z_KINDS)
    assert all(Z_MODULES[name] is kind.module for name, kind in Z_KINDS.items())
    with pytest.raises(ValueError, match="unknown compensation kind 'nope'; registered: none, lowrank"):
        get_z_kind("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_z_kind(type("Again", (ZKind,), {"name": "lowrank"}))
    with pytest.raises(ValueError, match="unknown compensation kind 'nope' in layer spec"):
        build_z(4, 4, {"kind": "nope"})
    assert z_param_count("none", 8, 8, 0.1) == 0 and z_spec("none", 8, 8, 0) is None
    assert [name for name, kind in Z_KINDS.items() if kind.is_more_rank] == ["lowrank"]


def _problem(k: int, m: int, seed: int) -> CompensationProblem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    return CompensationProblem(torch.randn(k, m, generator=g, dtype=torch.float64), whitening(X.T @ X / 200, 0.0))


@pytest.mark.parametrize("kind", list(Z_KINDS))
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_every_z_kind_conforms(kind, shape):
    k, m = shape
    problem = _problem(k, m, seed=len(kind))
    budget = z_param_count(kind, k, m, 0.1)
    z = closed_form_z(kind, problem, budget)
    assert isinstance(z, Z_KINDS[kind].module)
    assert 0 < budget <= 0.1 * k * m  # within the layer's z_fraction of its dense weight
    assert sum(p.numel() for p in z.parameters()) == budget  # what the allocation counted is what is held
    rebuilt = build_z(k, m, z_spec(kind, k, m, budget))
    assert z.spec() == rebuilt.spec() == z_spec(kind, k, m, budget)
    rebuilt.load_state_dict(z.state_dict())
    torch.testing.assert_close(rebuilt.dense(), z.dense())
    H, R = problem.white.gram, problem.residual
    before = float(torch.trace(R.T @ H @ R))
    delta = R - z.dense().double()
    assert float(torch.trace(delta.T @ H @ delta)) < before  # the fit lowers eq. (10)
    start = init_z_for_sgd(kind, problem, budget, torch.Generator().manual_seed(0))
    assert start.spec() == z.spec()


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(Z_KINDS))
def test_compress_with_every_z_kind_plans_saves_loads_and_quantizes(kind, tmp_path):
    images = make_images(32, seed=11)
    config = CompressionConfig(reduction=0.5, decomposition="whitened", allocation="greedy", compensation=kind,
                               z_fraction=0.1, calib_samples=32, progress=False)
    plan = plan_compression(make_tiny_vit(seed=2), [images], config)
    model = make_tiny_vit(seed=2)
    report = compress(model, [images], config)
    assert plan.ranks == report.ranks and plan.params_after == report.params_after == count_params(model)
    assert all(layer.output_error <= layer.output_error_lowrank + 1e-12 for layer in report.layers)
    assert_round_trip(model, tmp_path / kind, images[:4])
