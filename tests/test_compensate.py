"""Layer-wise error compensation (Section 3.3, eq. 10): closed forms and the paper's SGD solver."""

from __future__ import annotations

import pytest
import torch

from lowrank_vit.core.decompose import plain_svd, weighted_error, whitened_svd, whitening
from lowrank_vit.methods.compensate import (
    CompensationProblem,
    SGDTask,
    closed_form_z,
    diagonal_support,
    fit_sgd,
    init_z_for_sgd,
    svd_tail_z,
    z_param_count,
)

from test_decompose import gram_of, synthetic_layer


def setup_problem(rank: int = 6, k: int = 32, m: int = 24, n: int = 256, tokens: int = 8, seed: int = 0):
    images, W = synthetic_layer(k=k, m=m, tokens=tokens, n=n, seed=seed)
    H = gram_of(images, W)
    U, V = plain_svd(W).factors(rank)  # plain SVD leaves a residual that Z can reduce
    R = W - U @ V.T
    return images, W, H, R, CompensationProblem(R, whitening(H, damping=0.0))


def eq10(images, W, R, Z) -> float:
    num = (images @ (Z.detach() - R)).pow(2).sum(dim=(1, 2))
    den = (images @ W).pow(2).sum(dim=(1, 2))
    return float((num / den).mean())


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


def test_factors_from_a_start_index():
    d = plain_svd(synthetic_layer()[1])
    U, V = d.factors(9)
    U_head, V_head = d.factors(4)
    U_tail, V_tail = d.factors(5, start=4)
    assert torch.allclose(U_head @ V_head.T + U_tail @ V_tail.T, U @ V.T, atol=1e-10)
    with pytest.raises(ValueError, match="start"):
        d.factors(2, start=-1)


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
