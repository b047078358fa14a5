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
from lowrank_vit.nn.factorized import Z_MODULES, ZModule, build_z, register_z_module
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
    assert COMPENSATIONS == tuple(Z_KINDS) and COMPENSATIONS[0] == "none"
    assert set(Z_MODULES) == {name for name, kind in Z_KINDS.items() if kind.fitted} == set(Z_KINDS) - {"none"}
    assert all(Z_MODULES[name] is kind.module for name, kind in Z_KINDS.items() if kind.fitted)
    assert Z_KINDS["none"].module is None and not Z_KINDS["none"].fitted
    with pytest.raises(ValueError, match="unknown compensation kind 'nope'; registered: none, lowrank"):
        get_z_kind("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_z_kind(type("Again", (ZKind,), {"name": "lowrank"}))
    with pytest.raises(ValueError, match="unknown compensation kind 'nope' in layer spec"):
        build_z(4, 4, {"kind": "nope"})
    assert z_param_count("none", 8, 8, 0.1) == 0 and z_spec("none", 8, 8, 0) is None
    assert [name for name, kind in Z_KINDS.items() if kind.is_more_rank] == ["none", "lowrank"]
    assert [name for name, kind in Z_KINDS.items() if kind.folds] == ["none", "lowrank"]


def _problem(k: int, m: int, seed: int) -> CompensationProblem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    return CompensationProblem(torch.randn(k, m, generator=g, dtype=torch.float64), whitening(X.T @ X / 200, 0.0))


FITTED = [name for name, kind in Z_KINDS.items() if kind.fitted]


@pytest.mark.parametrize("kind", FITTED)
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


@pytest.mark.parametrize("kind", FITTED)
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


# --------------------------------------------------------------------------------------------------------------------
# A new kind of Z is one module and one kind, in one file: nothing else in the library changes


class ColumnZ(ZModule):
    """A toy form for the test: Z non-zero on a few whole output columns, ``Z(x)[..., cols] = x @ values``."""

    kind = "toy-columns"
    kinds = ("toy-columns",)
    spec_fields = ("columns",)
    quantize_axes = {"values": 1}  # (k, c): one scale per kept output column

    def __init__(self, in_features: int, out_features: int, columns: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.register_buffer("cols", torch.zeros(columns, dtype=torch.long))
        self.values = torch.nn.Parameter(torch.zeros(in_features, columns))

    @classmethod
    def from_spec(cls, in_features, out_features, spec):
        return cls(in_features, out_features, int(spec["columns"]))

    def forward(self, x):
        return (x @ self.values) @ torch.nn.functional.one_hot(self.cols, self.out_features).to(x.dtype)

    def dense(self):
        return torch.zeros(self.values.shape[0], self.out_features, dtype=self.values.dtype).index_copy(
            1, self.cols, self.values)

    def spec(self):
        return {"kind": self.kind, "columns": self.cols.numel()}


class ColumnKind(ZKind):
    """Fitted exactly: on a whole column j, eq. (10)'s optimum is the residual's column R[:, j] (any H > 0); the
    columns kept are those with the largest error ``R[:, j]^T H R[:, j]``."""

    name = "toy-columns"
    module = ColumnZ

    def param_count(self, k, m, budget, rank_multiple):
        return max(1, int(budget // k)) * k

    def shape(self, k, m, z_params):
        return {"columns": z_params // k}

    def fit(self, problem, z_params):
        R, H = problem.residual, problem.white.gram
        k, m = R.shape
        cols = torch.topk(((H @ R) * R).sum(0), z_params // k).indices.sort().values
        z = ColumnZ(k, m, cols.numel())
        with torch.no_grad():
            z.cols.copy_(cols)
            z.values.copy_(R[:, cols])
        return z


@pytest.fixture
def toy_kind():
    """ColumnZ and ColumnKind registered for one test, then removed (the registries are module globals)."""
    register_z_module(ColumnZ)
    register_z_kind(ColumnKind)
    yield "toy-columns"
    del Z_KINDS["toy-columns"], Z_MODULES["toy-columns"]


def test_a_kind_whose_module_is_not_registered_is_refused():
    """A kind registered without its module would compress and save a model that cannot be loaded: refused."""
    with pytest.raises(ValueError, match="register its module ColumnZ with lowrank_vit.nn.factorized"):
        register_z_kind(ColumnKind)
    assert "toy-columns" not in Z_KINDS


def test_a_new_z_kind_registered_from_one_file_compresses_saves_loads_quantizes_and_exports(toy_kind, tmp_path):
    """The two classes above, registered, are all a new Z needs: the config accepts the name, compress fits it,
    the report counts its parameters, save/load rebuild it from its spec, PTQ quantizes its values per column, Table
    4's size counts its index buffer, fold leaves it alone and ONNX export writes its export form with the same
    logits. The model has random non-zero biases and LayerNorm parameters (no default left in place)."""
    from lowrank_vit import load_compressed, model_size_mib, quantize_, save_compressed
    from lowrank_vit.io.export import export_onnx, onnx_logits
    from lowrank_vit.io.surgery import fold_lowrank_z_

    from conftest import randomize_affine_

    images = make_images(48, seed=5)
    model = randomize_affine_(make_tiny_vit(seed=4), seed=4)
    config = CompressionConfig(reduction=0.4, decomposition="whitened", allocation="greedy", compensation=toy_kind,
                               z_fraction=0.1, calib_samples=48, progress=False)
    report = compress(model, [images], config)
    zs = [m for m in model.modules() if isinstance(m, ColumnZ)]
    assert zs and report.params_after == count_params(model)
    # each Z is its layer's exact residual on the columns it kept: the fitted layer's error there is zero
    layer = next(m for m in model.modules() if getattr(m, "z", None) is zs[0])
    assert torch.equal(zs[0].dense()[:, zs[0].cols], zs[0].values.detach())
    assert fold_lowrank_z_(model) == [] and layer.z is zs[0]
    directory = save_compressed(model, tmp_path / "toy")
    loaded = load_compressed(directory)
    x = images[:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    index_bits = sum(z.cols.numel() for z in zs) * 32
    dense_bits = model_size_mib(model, bits=16) * 8 * 2**20
    assert dense_bits == sum(p.numel() for p in model.parameters()) * 16 + index_bits
    record = quantize_(loaded, bits=8)
    assert {name for name in record if name.endswith(".z.values")} == {
        f"{fqn}.values" for fqn, m in loaded.named_modules() if isinstance(m, ColumnZ)}
    assert all(record[name]["axis"] == 1 for name in record if name.endswith(".z.values"))
    path = export_onnx(model, tmp_path / "toy.onnx", (1, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(onnx_logits(path, x), model(x), rtol=1e-4, atol=1e-4)
