"""Tests of lowrank_vit/methods/compensate.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lowrank_vit import compress, count_params
from lowrank_vit.config import COMPENSATIONS, CompressionConfig, recipe
from lowrank_vit.core.decompose import weighted_error, whitened_svd, whitening
from lowrank_vit.methods.compensate import (
    Z_KINDS,
    CompensationProblem,
    SGDTask,
    ZKind,
    closed_form_z,
    diagonal_support,
    fit_sgd,
    get_z_kind,
    init_z_for_sgd,
    register_z_kind,
    svd_tail_z,
    z_param_count,
    z_spec,
)
from lowrank_vit.nn.factorized import Z_MODULES, ZModule, build_z, register_z_module
from lowrank_vit.pipeline import plan_compression
from tests.helpers import (
    WIDER,
    assert_all_finite,
    assert_round_trip,
    cfg,
    eq10,
    gram_of,
    make_images,
    make_tiny_vit,
    setup_problem,
    synthetic_layer,
)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("damping", [1e-4, 0.0])
@pytest.mark.parametrize("compensation", ["lowrank", "structured", "sparse"])
def test_dead_input_features(damping, compensation, calib_batches):
    model = make_tiny_vit()
    with torch.no_grad():
        # Feature 5 of the input of blocks.0.attn.qkv is always 0.
        model.blocks[0].norm1.weight[5] = 0.0
        model.blocks[0].norm1.bias[5] = 0.0
        # Hidden unit 7 of blocks.1.mlp: fc1 row 7 and its bias zero, so GELU(0) = 0 feeds fc2's input 7.
        model.blocks[1].mlp.fc1.weight[7] = 0.0
        model.blocks[1].mlp.fc1.bias[7] = 0.0
    report = compress(model, calib_batches, cfg(damping=damping, compensation=compensation, reduction=0.4))
    assert report.ranks["blocks.0.attn.qkv"] is not None and report.ranks["blocks.1.mlp.fc2"] is not None
    assert_all_finite(model, make_images(8))


def test_lowrank_z_rank_rounds_to_the_rank_multiple():
    # DeiT-B's shapes at the paper's 5%: Z ranks 28 (qkv), 19 (proj), 30 (fc1, fc2) without alignment.
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    assert [z_param_count("lowrank", k, m, 0.05) // (k + m) for k, m in shapes] == [28, 19, 30, 30]
    assert [z_param_count("lowrank", k, m, 0.05, rank_multiple=8) // (k + m) for k, m in shapes] == [32, 16, 32, 32]
    assert z_param_count("lowrank", 64, 64, 0.05, rank_multiple=8) // 128 == 1  # below the multiple: kept
    assert z_param_count("lowrank", 64, 64, 0.2, rank_multiple=8) // 128 == 6  # below the multiple: kept
    assert z_param_count("lowrank", 64, 64, 0.4, rank_multiple=8) // 128 == 16  # 12 and 20 round halves up
    assert z_param_count("lowrank", 64, 64, 0.65, rank_multiple=8) // 128 == 24
    for kind in ("diagonal", "sparse", "structured"):  # only ranks are aligned
        assert z_param_count(kind, 768, 768, 0.05, rank_multiple=8) == z_param_count(kind, 768, 768, 0.05)


@pytest.mark.parametrize("kind", ["lowrank", "diagonal", "sparse", "structured"])
def test_closed_form_reduces_residual_and_respects_budget(kind):
    images, W, H, R, problem = setup_problem()
    k, m = R.shape
    budget = z_param_count(kind, k, m, 0.1)
    z = closed_form_z(kind, problem, budget)
    assert sum(p.numel() for p in z.parameters()) == budget
    Z = z.dense().double()
    before, after = eq10(images, W, R, torch.zeros_like(R)), eq10(images, W, R, Z)
    assert after < 0.95 * before
    assert after == pytest.approx(weighted_error(Z - R, H, images.shape[0]), rel=1e-6)
    x = images[:3].float()
    assert torch.allclose(z.float()(x), x @ Z.float(), atol=1e-5)


@pytest.mark.parametrize("kind", ["diagonal", "sparse", "structured"])
def test_support_values_are_optimal(kind):
    """On its support the closed form is the exact least-squares solution: no perturbation of the values helps."""
    images, W, H, R, problem = setup_problem()
    z = closed_form_z(kind, problem, z_param_count(kind, *R.shape, 0.1))
    best = eq10(images, W, R, z.dense().double())
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        with torch.no_grad():
            saved = z.values.clone()
            z.values.add_(1e-3 * torch.randn(z.values.shape, generator=g, dtype=z.values.dtype))
            assert eq10(images, W, R, z.dense().double()) > best
            z.values.copy_(saved)


@pytest.mark.parametrize(("seed", "nnz"), [(3, 5), (4, 12), (5, 20)])
def test_sparse_support_is_the_entries_whose_single_fit_helps_most(seed, nnz):
    """The "sparse" kind keeps the entries that, each fitted alone, reduce eq. (10) the most: measured here by fitting
    every single entry of a small layer on its own (a heuristic for the joint choice, exact one entry at a time)."""
    images, W, H, R, problem = setup_problem(rank=2, k=8, m=6, n=64, seed=seed)
    z = closed_form_z("sparse", problem, nnz)
    reductions = torch.empty(R.shape, dtype=torch.float64)
    base = weighted_error(-R, H, images.shape[0])
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            Z = torch.zeros_like(R)
            Z[i, j] = float((H @ R)[i, j] / H[i, i])  # the best value of that entry alone
            reductions[i, j] = base - weighted_error(Z - R, H, images.shape[0])
    best = set(torch.topk(reductions.flatten(), nnz).indices.tolist())
    chosen = {int(r) * R.shape[1] + int(c) for r, c in zip(z.rows, z.cols, strict=True)}
    assert chosen == best


def test_lowrank_z_after_whitened_svd_equals_a_higher_rank_svd():
    """After an exact whitened SVD of rank r, a rank-q Z adds nothing beyond a rank r+q SVD."""
    images, W = synthetic_layer()
    H = gram_of(images, W)
    white = whitening(H, damping=0.0)
    d = whitened_svd(W, white)
    U, V = d.factors(6)
    R = W - U @ V.T
    z = closed_form_z("lowrank", CompensationProblem(R, white), 3 * sum(W.shape))
    U9, V9 = d.factors(9)
    err_z = weighted_error(U @ V.T + z.dense().double() - W, H, images.shape[0])
    assert err_z == pytest.approx(weighted_error(U9 @ V9.T - W, H, images.shape[0]), rel=1e-6)


@pytest.mark.parametrize("rank,q", [(6, 3), (35, 10)])  # the second runs past the basis: zero columns
def test_svd_tail_z_equals_the_second_svd(rank, q):
    """compress takes the low-rank Z from the whitened SVD's tail: the same Z as the closed form's own SVD."""
    images, W = synthetic_layer()
    H = gram_of(images, W)
    white = whitening(H, damping=1e-4)
    d = whitened_svd(W, white)
    U, V = d.factors(rank)
    R = W - U @ V.T
    budget = q * sum(W.shape)
    tail = svd_tail_z(d, rank, budget)
    assert tail.rank == q and sum(p.numel() for p in tail.parameters()) == budget
    expected = closed_form_z("lowrank", CompensationProblem(R, white), budget).dense().double()
    assert torch.allclose(tail.dense().double(), expected, atol=1e-8 * float(W.abs().max()))


@pytest.mark.slow
def test_closed_form_lowrank_matches_sgd_solver():
    """The paper's solver (Adam, lr 1e-3, 2000 steps, batch 64) reaches the closed form's loss within a few %."""
    images, W, H, R, problem = setup_problem()
    k, m = R.shape
    budget = z_param_count("lowrank", k, m, 0.1)
    exact = eq10(images, W, R, closed_form_z("lowrank", problem, budget).dense().double())
    z = init_z_for_sgd("lowrank", problem, budget, torch.Generator().manual_seed(0)).float()
    assert z.G.abs().sum() > 0 and z.Y.abs().sum() == 0  # never from G = Y = 0: both gradients would vanish
    x = images.float()
    weights = (1.0 / (images @ W).pow(2).sum(dim=(1, 2))).float()
    task = SGDTask(z, x, (images @ R).float(), weights)
    history = fit_sgd({"layer": task}, lr=1e-3, iterations=2000, batch_size=64, progress=False)
    sgd = eq10(images, W, R, z.dense().double())
    assert history["layer"][0] > history["layer"][-1]
    assert sgd == pytest.approx(exact, rel=0.05)
    assert sgd >= exact * (1 - 1e-6)  # the closed form is the optimum


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diagonal", "sparse", "structured"])
def test_sgd_trains_sparse_kinds_toward_closed_form(kind):
    images, W, H, R, problem = setup_problem()
    budget = z_param_count(kind, *R.shape, 0.1)
    exact = eq10(images, W, R, closed_form_z(kind, problem, budget).dense().double())
    z = init_z_for_sgd(kind, problem, budget, torch.Generator().manual_seed(0)).float()
    weights = (1.0 / (images @ W).pow(2).sum(dim=(1, 2))).float()
    fit_sgd({"l": SGDTask(z, images.float(), (images @ R).float(), weights)}, lr=1e-3, iterations=1500,
            batch_size=64, progress=False)
    assert eq10(images, W, R, z.dense().double()) == pytest.approx(exact, rel=0.1)


def test_diagonal_support_is_a_wrapped_band():
    rows, cols = diagonal_support(4, 6, 2)
    pairs = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert len(pairs) == 12
    assert {(j % 4, j) for j in range(6)} <= pairs and {((j + 1) % 4, j) for j in range(6)} <= pairs


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_sgd_solver_of_z_on_cuda_follows_the_cpu():
    """The paper's solver (Table 1's rows): Z fitted by Adam on eq. (10), every layer on the GPU, the same token
    samples and mini-batches as on the CPU, so the loss curves agree and fall."""
    dense = make_tiny_vit(**WIDER)
    cfg = recipe("paper", reduction=0.5, solver="sgd", sgd_iterations=60, calib_samples=64, progress=False)
    losses = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(dense).to(device)
        losses[device] = compress(model, [make_images(64, seed=1)], cfg).sgd_loss
        assert all(p.device.type == device for p in model.parameters())
    assert losses["cuda"].keys() == losses["cpu"].keys() and losses["cpu"]
    for name, curve in losses["cuda"].items():
        assert len(curve) == 60 and all(map(math.isfinite, curve)), name
        assert curve[-1] == pytest.approx(losses["cpu"][name][-1], rel=2e-2), name
    first, last = (sum(sum(c[s]) for c in losses["cuda"].values()) for s in (slice(0, 10), slice(-10, None)))
    assert last < first, (first, last)  # single mini-batches are noisy; ten of them over every layer fall


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
    from tests.helpers import randomize_affine_

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
