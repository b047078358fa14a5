"""Property-based tests (Hypothesis) of the mathematics over generated shapes and spectra: each property is checked
against an independent truth (Eckart-Young's optimum computed apart, a competitor that must not win, brute force,
the quantization grid's half step, parameter counts from the shapes), never against the code itself."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lowrank_vit.core.allocate import allocate_greedy, allocate_marginal, allocate_uniform  # noqa: E402
from lowrank_vit.core.budget import LayerBudget  # noqa: E402
from lowrank_vit.core.decompose import (  # noqa: E402
    energy_loss_curve,
    energy_tail_curve,
    plain_svd,
    two_sided_svd,
    whitened_svd,
    whitening,
)
from lowrank_vit.core.latency import knapsack  # noqa: E402
from lowrank_vit.nn.factorized import FactorizedLinear, LowRankZ  # noqa: E402
from lowrank_vit.nn.quantize import quantize_tensor  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)  # seeded: the suite repeats


@st.composite
def problems(draw):
    """A weight of generated shape and spectrum (geometric decay or a cliff), and a Gram of correlated inputs."""
    k = draw(st.integers(2, 12))
    m = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    decay = draw(st.floats(0.05, 1.0))
    g = torch.Generator().manual_seed(seed)
    p = min(k, m)
    P, _ = torch.linalg.qr(torch.randn(k, p, generator=g, dtype=torch.float64))
    R, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    spectrum = decay ** torch.arange(p, dtype=torch.float64) * draw(st.floats(0.1, 100.0))
    W = (P * spectrum) @ R.T
    X = torch.randn(3 * k, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    Y = torch.randn(3 * m, m, generator=g, dtype=torch.float64)
    rank = draw(st.integers(1, p))
    return W, X.T @ X, Y.T @ Y + 0.1 * torch.eye(m, dtype=torch.float64), rank


def _best_rank_r_error(M: torch.Tensor, rank: int) -> float:
    """Eckart-Young, computed apart: the squared Frobenius error of the best rank-r approximation of M."""
    s = torch.linalg.svdvals(M)
    return float(s[rank:].pow(2).sum())


@SETTINGS
@given(problems())
def test_whitened_svd_is_the_weighted_optimum_and_never_loses_to_plain_svd(problem):
    W, H, _, rank = problem
    white = whitening(H, 1e-3)
    U, V = whitened_svd(W, white).factors(rank)
    delta = W - U @ V.T
    error = float(torch.trace(delta.T @ white.gram @ delta))
    assert error == pytest.approx(_best_rank_r_error(white.apply(W), rank), rel=1e-6, abs=1e-9)
    Up, Vp = plain_svd(W).factors(rank)
    plain = W - Up @ Vp.T
    assert error <= float(torch.trace(plain.T @ white.gram @ plain)) * (1 + 1e-9) + 1e-12


@SETTINGS
@given(problems())
def test_two_sided_svd_minimizes_the_kronecker_error_and_its_tail_is_that_error(problem):
    W, H, G, rank = problem
    A, B = whitening(H, 1e-3), whitening(G, 1e-3)
    decomposition = two_sided_svd(W, A, B)
    U, V = decomposition.factors(rank)
    delta = W - U @ V.T
    error = float(torch.trace(delta.T @ A.gram @ delta @ B.gram))
    assert error == pytest.approx(float(decomposition.energy_tails()[rank]), rel=1e-6, abs=1e-9)
    Uw, Vw = whitened_svd(W, A).factors(rank)  # one-sided: a competitor that must not do better
    other = W - Uw @ Vw.T
    assert error <= float(torch.trace(other.T @ A.gram @ other @ B.gram)) * (1 + 1e-9) + 1e-12


@SETTINGS
@given(st.lists(st.floats(0.0, 1e3), min_size=1, max_size=20))
def test_energy_curves_run_from_everything_to_nothing_without_rising(values):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    tail, loss = energy_tail_curve(s), energy_loss_curve(s)
    assert tail.numel() == s.numel() + 1 and float(tail[-1]) == 0.0
    assert float(tail[0]) == pytest.approx(float((s ** 2).sum()))
    assert bool((tail[1:] <= tail[:-1] + 1e-9).all()) and bool((loss[1:] <= loss[:-1] + 1e-12).all())
    assert float(loss[0]) == (1.0 if float(tail[0]) > 0 else 0.0)


@st.composite
def allocation_problems(draw):
    layers = []
    for i in range(draw(st.integers(2, 4))):
        k, m = draw(st.integers(4, 14)), draw(st.integers(4, 14))
        values = sorted(draw(st.lists(st.floats(0.01, 10.0), min_size=min(k, m), max_size=min(k, m))), reverse=True)
        z = draw(st.sampled_from([0, k + m]))
        layers.append(LayerBudget(f"l{i}", k, m, z, energy_tail_curve(torch.tensor(values, dtype=torch.float64))))
    smallest = sum(layer.params(1) if layer.max_rank >= 1 else layer.dense_params for layer in layers)
    full = sum(layer.dense_params for layer in layers)
    budget = draw(st.integers(smallest, full - 1))
    return layers, budget, draw(st.sampled_from([1, 2, 4]))


@SETTINGS
@given(allocation_problems())
def test_every_allocation_fits_its_budget_and_respects_each_layers_ceiling(problem):
    layers, budget, multiple = problem
    for allocation in (allocate_uniform(layers, budget, multiple),
                       allocate_greedy(layers, budget, rank_multiple=multiple),
                       allocate_marginal(layers, budget, multiple)):
        spent = sum(layer.params(allocation.ranks[layer.name]) for layer in layers)
        assert spent == allocation.params <= budget
        for layer in layers:
            rank = allocation.ranks[layer.name]
            assert rank is None or 1 <= rank <= layer.max_rank


@SETTINGS
@given(st.lists(st.lists(st.tuples(st.integers(0, 5), st.floats(0.0, 1.0)), min_size=1, max_size=3),
                min_size=1, max_size=4), st.integers(0, 12))
def test_knapsack_equals_brute_force_on_whole_costs(groups, budget):
    import itertools

    combos = [c for c in itertools.product(*(range(len(g)) for g in groups))
              if sum(g[i][0] for g, i in zip(groups, c, strict=True)) <= budget]
    options = [[(float(cost), loss) for cost, loss in g] for g in groups]
    if not combos:
        with pytest.raises(ValueError):
            knapsack(options, budget, resolution=max(budget, 1))
        return
    best = min(sum(g[i][1] for g, i in zip(groups, c, strict=True)) for c in combos)
    picks = knapsack(options, budget, resolution=max(budget, 1))
    assert sum(g[i][1] for g, i in zip(groups, picks, strict=True)) == pytest.approx(best, abs=1e-12)


@SETTINGS
@given(st.integers(1, 9), st.integers(1, 9), st.integers(2, 8), st.sampled_from([None, 0, 1]),
       st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_quantization_stays_within_half_a_step_and_keeps_zeros_exact(rows, cols, bits, axis, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude
    w[0, 0] = 0.0
    q = quantize_tensor(w, bits, axis)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2 ** bits - 1
    step = q.scale if axis is None else q.scale.view([-1 if d == axis else 1 for d in range(2)])
    error = (q.dequantize() - w).abs()
    assert bool((error <= 0.5 * step * (1 + 1e-5) + 1e-6 * magnitude).all())
    assert float(q.dequantize()[0, 0]) == 0.0


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 10), st.integers(0, 6), st.booleans())
def test_a_factorized_layer_holds_exactly_the_parameters_its_shape_says(k, m, rank, z_rank, bias):
    z = LowRankZ(k, m, z_rank) if z_rank else None
    layer = FactorizedLinear(k, m, rank, bias=bias, z=z)
    expected = (k + m) * (rank + z_rank) + (m if bias else 0)
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert layer.dense_weight().shape == (k, m) and math.isfinite(float(layer.dense_weight().detach().sum()))
