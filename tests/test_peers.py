"""The peer methods of docs/peers.md (FLAR-SVD, SVD-LLM, SVD-LLM v2, KFAC-SVD with LEMS), each checked against an
independent truth: scikit-learn's Ledoit-Wolf intensity, formulas written out, exhaustive search, direct least
squares and eigendecompositions."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_vit import compress
from lowrank_vit.config import RECIPES, CompressionConfig, recipe
from lowrank_vit.core.budget import LayerBudget
from lowrank_vit.core.calibration import LayerStats
from lowrank_vit.core.covariance import (
    cholesky_whitening,
    clipped_token_scale,
    ledoit_wolf_intensity,
    shrink_to_identity,
)
from lowrank_vit.core.decompose import plain_svd, whitened_svd, whitening
from lowrank_vit.core.likelihood import Gaussian
from lowrank_vit.core.probe import Probe
from lowrank_vit.core.search import (
    allocate_integer,
    allocate_svd_llm_v2,
    candidate_ranks,
    layer_kind,
    scale_to_budget,
    search_grid,
    smallest_passing,
    svd_llm_v2_keeps,
)
from lowrank_vit.methods.decompositions import get_method, svd_llm_update
from lowrank_vit.pipeline import plan_compression

from conftest import DenseHeadViT, make_images, make_tiny_vit

PEER_RECIPES = ["flar-svd", "svd-llm", "svd-llm-update", "svd-llm-v2", "kfac-lems"]


def random_spd(n: int, g: torch.Generator, extra: int = 3) -> torch.Tensor:
    X = torch.randn(n + extra, n, generator=g, dtype=torch.float64)
    return X.T @ X / (n + extra)


def sym_power(S: torch.Tensor, power: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(S)
    return (evecs * evals.pow(power)) @ evecs.T


def w_hat(decomposition, rank: int) -> torch.Tensor:
    U, V = decomposition.factors(rank)
    return U @ V.T


# ------------------------------------------------------------------------------------------------ covariance


@pytest.mark.parametrize("n, p, seed", [(50, 5, 0), (200, 12, 1), (8, 20, 2), (3, 7, 3), (30, 30, 4), (1000, 3, 5)])
def test_ledoit_wolf_intensity_matches_sklearn(n, p, seed):
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + rng.standard_normal(p)  # correlated, not centred
    gram_sum = torch.from_numpy(X.T @ X)
    fourth_sum = float((np.linalg.norm(X, axis=1) ** 4).sum())
    expected = ledoit_wolf_shrinkage(X, assume_centered=True)
    assert ledoit_wolf_intensity(gram_sum, fourth_sum, n) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_ledoit_wolf_intensity_of_a_scaled_identity_is_zero_and_needs_a_sample():
    # S = c I is already the target (sklearn returns 0 there too); no samples at all is an error
    assert ledoit_wolf_intensity(4.0 * torch.eye(3, dtype=torch.float64), 3 * 4.0 ** 2, 4) == 0.0
    with pytest.raises(ValueError, match="at least one sample"):
        ledoit_wolf_intensity(torch.eye(3), 1.0, 0)


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_shrink_to_identity_is_the_written_out_formula(a):
    S = random_spd(6, torch.Generator().manual_seed(1))
    p = S.shape[0]
    expected = (1 - a) * S + a * float(torch.trace(S)) / p * torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(shrink_to_identity(S, a), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a", [-0.1, 1.5, float("nan")])
def test_shrink_to_identity_rejects_intensities_outside_0_1(a):
    with pytest.raises(ValueError, match="intensity"):
        shrink_to_identity(torch.eye(3), a)


@pytest.mark.parametrize("seed", range(3))
def test_cholesky_whitening_of_an_spd_gram_is_its_exact_cholesky_factor(seed):
    S = random_spd(7, torch.Generator().manual_seed(seed))
    white = cholesky_whitening(S)
    assert white.triangular
    torch.testing.assert_close(white.gram, S)  # nothing shifted
    torch.testing.assert_close(white.root, torch.from_numpy(np.linalg.cholesky(S.numpy()).T))
    torch.testing.assert_close(white.root.T @ white.root, S, rtol=1e-10, atol=1e-12)


def test_cholesky_whitening_shifts_a_slightly_indefinite_gram():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 3, generator=g, dtype=torch.float64)
    S = B @ B.T - 1e-9 * torch.eye(6, dtype=torch.float64)  # rank 3, then just below PSD
    assert float(torch.linalg.eigvalsh(S)[0]) < 0
    white = cholesky_whitening(S)
    shift = white.gram - S  # a positive multiple of the identity, about |lambda_min| + a few 1e-6 of the mean diagonal
    c = float(shift[0, 0])
    torch.testing.assert_close(shift, c * torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    lowest = -float(torch.linalg.eigvalsh(S)[0])
    assert lowest < c <= lowest + 4 * 1e-6 * float(torch.diagonal(S).mean()) + 1e-12
    assert float(torch.linalg.eigvalsh(white.gram)[0]) > 0
    torch.testing.assert_close(white.root.T @ white.root, white.gram, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(white.root, torch.triu(white.root))


def test_cholesky_whitening_rejects_zero_nan_and_indefinite_grams():
    with pytest.raises(ValueError, match="is zero"):
        cholesky_whitening(torch.zeros(4, 4))
    bad = torch.eye(4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cholesky_whitening(bad)
    indefinite = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive definite.*; use X"):
        cholesky_whitening(indefinite, attempts=1, alternative="use X")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("low, high", [(0.1, 10.0), (0.5, 2.0), (1.0, 1.0)])
def test_clipped_token_scale_matches_a_loop_over_rows_and_tokens(seed, low, high):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(3, 2, 4, 5, generator=g) * 10.0 ** (4 * torch.rand(3, 2, 4, 1, generator=g) - 2)
    grad[0, 0, 1] = 0.0  # dead tokens keep their gradient and do not count in the mean
    grad[1, 1, 3] = 0.0
    grad[2] = 0.0  # a row with no live token at all
    scale = clipped_token_scale(grad, low, high)
    assert scale.shape == (3, 8, 1)
    flat = grad.reshape(3, 8, 5).double()
    for i in range(3):
        norms = [float(flat[i, t].norm()) for t in range(8)]
        live = [v for v in norms if v > 1e-10]
        m = sum(live) / len(live) if live else 0.0
        for t, v in enumerate(norms):
            expected = min(max(v, low * m), high * m) / v if v > 1e-10 else 1.0
            assert float(scale[i, t, 0]) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ allocation


def random_choices(seed: int):
    rng = np.random.default_rng(seed)
    choices = []
    for _ in range(int(rng.integers(2, 5))):
        options = [(r, int(rng.integers(1, 200)), float(10.0 ** rng.uniform(-6, 2)))  # errors over 8 decades
                   for r in range(1, int(rng.integers(2, 6)) + 1)]
        dense = max(p for _, p, _ in options) + int(rng.integers(0, 100))
        choices.append(options + [(None, dense, 0.0)])
    smallest = sum(min(p for _, p, _ in options) for options in choices)
    largest = sum(max(p for _, p, _ in options) for options in choices)
    return choices, int(rng.integers(smallest, largest + 1))


@pytest.mark.parametrize("seed", range(60))
def test_allocate_integer_finds_the_brute_force_optimum(seed):
    choices, budget = random_choices(seed)
    names = [f"l{i}" for i in range(len(choices))]
    best = min(sum(e for _, _, e in combo) for combo in itertools.product(*choices)
               if sum(p for _, p, _ in combo) <= budget)
    allocation = allocate_integer(choices, names, budget)
    picked = [next(o for o in options if o[0] == allocation.ranks[name])
              for name, options in zip(names, choices, strict=True)]
    assert allocation.params == sum(p for _, p, _ in picked) <= budget
    assert sum(e for _, _, e in picked) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert allocation.trace[0]["objective"] == pytest.approx(best, rel=1e-6, abs=1e-12)


def test_allocate_integer_is_exact_when_errors_span_many_magnitudes():
    # brute force: "a" dense and "b" at rank 1 (152 parameters, error 1e-6) beats every other affordable pair
    choices = [[(1, 59, 4.0), (2, 73, 1e-5), (3, 30, 2e-6), (None, 74, 0.0)],
               [(1, 78, 1e-6), (2, 56, 0.03), (3, 99, 1e-5), (None, 100, 0.0)]]
    assert allocate_integer(choices, ["a", "b"], 172).ranks == {"a": None, "b": 1}


def test_allocate_integer_rejects_an_infeasible_budget():
    choices = [[(1, 10, 1.0), (None, 20, 0.0)], [(1, 15, 1.0), (None, 30, 0.0)]]
    with pytest.raises(ValueError, match="no feasible allocation"):
        allocate_integer(choices, ["a", "b"], 24)
    assert allocate_integer(choices, ["a", "b"], 25).ranks == {"a": 1, "b": 1}  # the same problem, just feasible


def budget_layer(k: int, m: int, z: int = 0, name: str = "layer") -> LayerBudget:
    p = min(k, m)
    tail = torch.linspace(1.0, 0.0, p + 1, dtype=torch.float64)
    return LayerBudget(name, k, m, z_params=z, energy_losses=tail)


@pytest.mark.parametrize("k, m, floor, ceiling, multiple", [
    (64, 192, 0.1, 0.95, 8), (32, 96, 0.1, 0.95, 8), (8, 8, 0.1, 0.95, 8), (100, 37, 0.2, 0.9, 4),
    (384, 1536, 0.1, 0.95, 8), (5, 300, 0.1, 0.95, 1), (64, 64, 0.5, 1.0, 8),
])
def test_candidate_ranks_are_the_aligned_ranks_between_floor_and_ceiling(k, m, floor, ceiling, multiple):
    layer = budget_layer(k, m)
    eq = k * m // (k + m)
    window = [r for r in range(1, layer.max_rank + 1) if r >= math.floor(floor * eq) and r < math.floor(ceiling * eq)]
    aligned = [r for r in window if r % multiple == 0]
    assert window  # each case has a non-empty window
    assert candidate_ranks(layer, floor, ceiling, multiple) == (aligned or window)


def test_candidate_ranks_hand_checked():
    # 64 x 192: equal-cost rank 48, floor 4.8 -> 4, ceiling 45.6 -> below 45, multiples of 8
    assert candidate_ranks(budget_layer(64, 192), 0.1, 0.95, 8) == [8, 16, 24, 32, 40]
    # 8 x 8: equal-cost rank 4, no multiple of 8 below 3: every rank in [1, 3)
    assert candidate_ranks(budget_layer(8, 8), 0.1, 0.95, 8) == [1, 2]


@pytest.mark.parametrize("k, m, z, step", [(64, 192, 0, 8), (32, 96, 0, 8), (8, 8, 0, 8), (40, 40, 200, 4),
                                           (6, 6, 0, 8)])
def test_search_grid_is_the_multiples_below_the_max_rank(k, m, z, step):
    layer = budget_layer(k, m, z)
    affordable = [r for r in range(1, k * m) if r * (k + m) + z < k * m]
    multiples = [r for r in affordable if r % step == 0]
    assert search_grid(layer, step) == (multiples or affordable)


@pytest.mark.parametrize("seed", range(10))
def test_smallest_passing_equals_a_linear_scan(seed):
    rng = np.random.default_rng(seed)
    grid = sorted(rng.choice(np.arange(1, 200), size=int(rng.integers(1, 30)), replace=False).tolist())
    for threshold in [0, *grid, grid[-1] + 1, *rng.integers(0, 210, size=5).tolist()]:
        calls: list[int] = []

        def passes(r, t=threshold, seen=calls):
            seen.append(r)
            return r >= t

        expected = next((r for r in grid if r >= threshold), None)  # the linear scan
        assert smallest_passing(grid, passes) == expected
        assert len(calls) <= math.ceil(math.log2(len(grid) + 1))  # a binary search, not a scan


@pytest.mark.parametrize("seed", range(8))
def test_scale_to_budget_fits_aligns_and_leaves_no_affordable_step(seed):
    rng = np.random.default_rng(seed)
    step = int(rng.choice([1, 4, 8]))
    shapes = [(32, 96), (32, 32), (128, 32), (96, 32), (16, 200), (64, 64)]
    layers = [budget_layer(k, m, name=f"l{i}") for i, (k, m) in enumerate(shapes[: int(rng.integers(2, 7))])]
    searched = {}
    for layer in layers:
        grid = search_grid(layer, step)
        searched[layer.name] = None if rng.random() < 0.2 else int(rng.choice(grid))
    full = sum(layer.dense_params for layer in layers)
    # the smallest model the rule reaches: the layers left dense, every other one at its grid's first rank
    smallest = sum(layer.dense_params if searched[layer.name] is None else layer.params(min(step, layer.max_rank))
                   for layer in layers)
    if smallest >= full:
        return
    budget = int(rng.integers(smallest, full))
    ranks, total = scale_to_budget(layers, searched, budget, step)
    assert total == sum(layer.params(ranks[layer.name]) for layer in layers) <= budget
    for layer in layers:
        r = ranks[layer.name]
        if searched[layer.name] is None:  # FLAR-SVD's rule: what its search left dense stays dense
            assert r is None
        if r is None:
            continue
        assert 1 <= r <= layer.max_rank and (r % step == 0 or r < step)
        up = (r // step + 1) * step  # the next rank of the grid: unaffordable or too large
        assert up > layer.max_rank or total + (up - r) * layer.rank_step > budget


def test_scale_to_budget_hand_checked_keeps_the_dense_layer_and_scales_the_others():
    # 32x96 (128 a rank) searched at 16, 64x64 (128 a rank) at 24, a 32x32 layer left dense (1,024): with 4,096
    # parameters, one factor c < 1 on both searched ranks (multiples of 8) gives 8 and 16: 1,024 + 128 x 24 = 4,096
    layers = [budget_layer(32, 96, name="a"), budget_layer(64, 64, name="b"), budget_layer(32, 32, name="c")]
    ranks, total = scale_to_budget(layers, {"a": 16, "b": 24, "c": None}, 4096, 8)
    assert ranks == {"a": 8, "b": 16, "c": None} and total == 4096
    # one parameter less than the dense layer plus both at rank 8: the published rule cannot meet it
    with pytest.raises(ValueError, match="the 1 layer.*left dense.*1 parameters more.*threshold"):
        scale_to_budget(layers, {"a": 16, "b": 24, "c": None}, 1024 + 128 * 16 - 1, 8)


def test_svd_llm_v2_keeps_follow_the_published_formula():
    losses, f = [2.0, 5.0, 40.0, 1.5], 0.6
    scores = [1 / math.log(value + 1e-12) for value in losses]
    expected = [1 - len(losses) * (1 - f) * s / sum(scores) for s in scores]
    keeps = svd_llm_v2_keeps(losses, f)
    assert keeps == pytest.approx(expected, rel=1e-12)
    assert sum(1 - k for k in keeps) / len(keeps) == pytest.approx(1 - f, rel=1e-12)  # mean compression kept
    assert keeps[2] > keeps[1] > keeps[0] > keeps[3]  # the larger the loss, the more is kept


@pytest.mark.parametrize("losses", [[0.5, 0.9], [0.0, 0.5], [0.2, 0.3, 0.7], [1.0 - 1e-12, 3.0]])
def test_svd_llm_v2_falls_back_to_uniform_where_the_scores_are_invalid(losses):
    # the scores' sum is negative (every L < 1) or infinite (log(L + 1e-12) = 0): the published fallback keeps f0
    assert svd_llm_v2_keeps(losses, 0.4) == [0.4] * len(losses)


def test_svd_llm_v2_keeps_a_negative_score_when_the_sum_is_valid():
    # one L below 1 (a negative score) beside larger ones: the published code keeps the formula (no fallback), so that
    # layer keeps more than its share
    keeps = svd_llm_v2_keeps([0.5, 1.5, 2.0], 0.5)
    scores = [1 / math.log(v + 1e-12) for v in (0.5, 1.5, 2.0)]
    assert sum(scores) > 0 and keeps[0] > 1.0
    assert keeps == pytest.approx([1 - 3 * 0.5 * sc / sum(scores) for sc in scores], rel=1e-12)


@pytest.mark.parametrize("name, kind", [
    ("blocks.3.attn.qkv", "blocks.attn.qkv"), ("layers.0.blocks.1.mlp.fc2", "layers.blocks.mlp.fc2"),
    ("blocks.11.mlp.fc1", "blocks.mlp.fc1"), ("head", "head"),
    ("stages.2.blocks.10.attn.proj", "stages.blocks.attn.proj"),
])
def test_layer_kind_drops_the_indices(name, kind):
    assert layer_kind(name) == kind


def test_svd_llm_v2_falls_back_to_uniform_on_small_losses_and_says_so():
    # tails of 1e-6 of the squared spectrum: every discarded singular value about 1.8e-4, so every L < 1 and the
    # scores' sum is negative: the kind falls back to the uniform ratio, and the trace names it
    small = [replace(budget_layer(32, 96, name=f"blocks.{i}.attn.qkv"),
                     energy_losses=torch.linspace(1e-6, 0.0, 33, dtype=torch.float64)) for i in range(2)]
    budget = sum(layer.dense_params for layer in small) // 2
    allocation = allocate_svd_llm_v2(small, budget)
    assert allocation.trace[0]["uniform_fallback_kinds"] == ["blocks.attn.qkv"]
    assert len(set(allocation.ranks.values())) == 1 and allocation.params <= budget  # one shape: equal ranks
    # the same tails at full scale: L > 1, valid scores, equal kept fractions because the layers are equal, and no
    # fallback reported
    large = [budget_layer(32, 96, name=f"blocks.{i}.attn.qkv") for i in range(2)]
    allocation = allocate_svd_llm_v2(large, budget)
    assert allocation.trace[0]["uniform_fallback_kinds"] == []
    assert len({t["kept_fraction"] for t in allocation.trace[1:]}) == 1


def test_truncation_loss_is_the_first_power_sum_of_the_discarded_singular_values():
    from lowrank_vit.core.decompose import energy_tail_curve
    from lowrank_vit.core.search import truncation_loss

    s = torch.tensor([9.0, 4.0, 2.5, 1.0, 0.25], dtype=torch.float64)
    layer = LayerBudget("blocks.0.mlp.fc1", 5, 40, 0, energy_tail_curve(s))
    assert truncation_loss(layer, 2) == pytest.approx(2.5 + 1.0 + 0.25, rel=1e-12)
    assert truncation_loss(layer, 0) == pytest.approx(16.75, rel=1e-12)
    assert truncation_loss(layer, 5) == 0.0


def test_svd_llm_v2_allocation_scores_the_first_power_losses_at_the_uniform_fraction():
    """The kept fractions the allocation records are the formula on the first-power losses at f0 (a group of two
    layers of one shape, large singular values so that every L > 1)."""
    from lowrank_vit.core.decompose import energy_tail_curve
    from lowrank_vit.core.search import truncation_loss

    g = torch.Generator().manual_seed(0)
    layers = []
    for i in range(2):
        s = torch.sort(torch.rand(32, generator=g, dtype=torch.float64) * 50 * (1 + i), descending=True)[0]
        layers.append(LayerBudget(f"blocks.{i}.attn.qkv", 32, 96, 0, energy_tail_curve(s)))
    budget = sum(layer.dense_params for layer in layers) // 2
    allocation = allocate_svd_llm_v2(layers, budget)
    f0 = allocation.trace[0]["uniform_kept_fraction"]
    reference = math.floor(f0 * 24)  # the equal-cost rank of 32 x 96 is 24
    hand = [sum(math.sqrt(float(a - b)) for a, b in zip(layer.energy_losses[reference:-1],
                                                          layer.energy_losses[reference + 1:], strict=True))
            for layer in layers]
    assert hand == pytest.approx([truncation_loss(layer, reference) for layer in layers], rel=1e-9)
    assert [t["kept_fraction"] for t in allocation.trace[1:]] == pytest.approx(svd_llm_v2_keeps(hand, f0), rel=1e-9)
    assert allocation.trace[0]["uniform_fallback_kinds"] == [] and allocation.params <= budget


# -------------------------------------------------------------------------------------------- decompositions


@pytest.mark.parametrize("seed, n, k, m", [(0, 40, 6, 9), (1, 60, 10, 4), (2, 25, 8, 8)])
def test_svd_llm_update_is_the_least_squares_output_factor(seed, n, k, m):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    W = torch.randn(k, m, generator=g, dtype=torch.float64)
    decomposition = plain_svd(W)
    for scale in (1.0, 1 / n):  # any positive scale of the Gram
        for r in range(1, min(k, m) + 1):
            result = svd_llm_update(W, decomposition, scale * X.T @ X, r)
            Ur = decomposition.factors(r)[0]
            expected = Ur @ torch.linalg.lstsq(X @ Ur, X @ W).solution
            torch.testing.assert_close(w_hat(result, r), expected, rtol=1e-8, atol=1e-8)


def kfac_reference(W, H, G, a, b, rank):
    k, m = W.shape
    Hs = (1 - a) * H + a * float(torch.diagonal(H).mean()) * torch.eye(k, dtype=torch.float64)
    Gs = (1 - b) * G + b * float(torch.diagonal(G).mean()) * torch.eye(m, dtype=torch.float64)
    P, s, Rh = torch.linalg.svd(sym_power(Hs, 0.5) @ W @ sym_power(Gs, 0.5))
    best = sym_power(Hs, -0.5) @ (P[:, :rank] * s[:rank]) @ Rh[:rank] @ sym_power(Gs, -0.5)
    return s, best


@pytest.mark.parametrize("k, m", [(6, 9), (9, 5)])  # both sides of the narrow-side computation
@pytest.mark.parametrize("a, b, loss_scale", [(None, None, 1.0), (0.3, 0.2, 1.0), (0.0, 0.5, 2.5)])
def test_kfac_is_the_two_sided_minimizer_on_shrunk_grams(k, m, a, b, loss_scale):
    g = torch.Generator().manual_seed(k * 10 + m)
    H, G = random_spd(k, g), random_spd(m, g)
    W = torch.randn(k, m, generator=g, dtype=torch.float64)
    settings = {} if a is None else {"input_shrinkage": a, "grad_shrinkage": b}
    a, b = (0.1, 0.7) if a is None else (a, b)  # KFAC-SVD's published defaults for vision
    cfg = CompressionConfig(reduction=0.5, decomposition="kfac", allocation="lems", settings=settings)
    stats = LayerStats(gram=H / loss_scale, num_images=1, grad_gram=G, loss_scale=loss_scale, tokens=1.0)
    method = get_method("kfac")
    decomposition, _ = method.decompose(W, stats, None, cfg)
    p = min(k, m)
    s_ref, _ = kfac_reference(W, H, G, a, b, 1)
    torch.testing.assert_close(decomposition.singular_values[:p], s_ref[:p], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(method.spectrum(W, stats, None, cfg)[:p], s_ref[:p], rtol=1e-8, atol=1e-10)
    for r in range(1, p + 1):
        torch.testing.assert_close(w_hat(decomposition, r), kfac_reference(W, H, G, a, b, r)[1], rtol=1e-7, atol=1e-9)


def flar_stats(X: torch.Tensor, loss_scale: float) -> LayerStats:
    return LayerStats(gram=X.T @ X / loss_scale, num_images=4, loss_scale=loss_scale,
                      fourth_moment=float(X.norm(dim=1).pow(4).sum()), rows=X.shape[0])


@pytest.mark.parametrize("seed", range(3))
def test_flar_without_shrinkage_is_the_undamped_whitened_svd(seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(50, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 7, generator=g, dtype=torch.float64)
    W = torch.randn(7, 11, generator=g, dtype=torch.float64)
    stats = flar_stats(X, 3.0)
    cfg = CompressionConfig(reduction=0.5, decomposition="flar", allocation="flar", settings={"shrinkage": "none"})
    decomposition, _ = get_method("flar").decompose(W, stats, None, cfg)
    reference = whitened_svd(W, whitening(stats.gram, 0.0))
    s = decomposition.singular_values
    torch.testing.assert_close(s / s[0], reference.singular_values / reference.singular_values[0])
    # in the units of the raw token Gram summed over the calibration's own tokens (the 50 rows), as SVD-LLM's code sums
    # it, whatever scale the pooled Gram was kept in
    torch.testing.assert_close(s, reference.singular_values * 3.0 ** 0.5)
    for r in range(1, 8):
        torch.testing.assert_close(w_hat(decomposition, r), w_hat(reference, r), rtol=1e-9, atol=1e-10)


def test_svd_llm_losses_in_units_of_loss_tokens_when_given():
    # SVD-LLM v2's loss_tokens: the same spectrum rescaled to a Gram summed over 200 tokens instead of the 50 seen
    g = torch.Generator().manual_seed(7)
    X = torch.randn(50, 7, generator=g, dtype=torch.float64)
    W = torch.randn(7, 11, generator=g, dtype=torch.float64)
    stats = flar_stats(X, 3.0)
    own = CompressionConfig(reduction=0.5, decomposition="svd_llm", allocation="svd_llm_v2")
    given = CompressionConfig(reduction=0.5, decomposition="svd_llm", allocation="svd_llm_v2",
                              settings={"loss_tokens": 200})
    s_own = get_method("svd_llm").decompose(W, stats, None, own)[0].singular_values
    s_given = get_method("svd_llm").decompose(W, stats, None, given)[0].singular_values
    torch.testing.assert_close(s_given, s_own * (200 / 50) ** 0.5)
    torch.testing.assert_close(s_own.pow(2).sum(), (X @ W).pow(2).sum())  # the raw sum's units: ||X W||^2


@pytest.mark.parametrize("n", [5, 40])  # fewer tokens than features, and more
def test_flar_shrinks_the_raw_gram_by_sklearns_ledoit_wolf_intensity(n):
    from sklearn.covariance import ledoit_wolf_shrinkage

    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    W = torch.randn(8, 6, generator=g, dtype=torch.float64)
    stats = flar_stats(X, 7.0)
    cfg = CompressionConfig(reduction=0.5, decomposition="flar", allocation="flar")
    decomposition, _ = get_method("flar").decompose(W, stats, None, cfg)
    a = ledoit_wolf_shrinkage(X.numpy(), assume_centered=True)
    assert 0 < a < 1
    S = X.T @ X
    shrunk = (1 - a) * S + a * float(torch.trace(S)) / 8 * torch.eye(8, dtype=torch.float64)
    reference = whitened_svd(W, whitening(shrunk, 0.0))
    torch.testing.assert_close(decomposition.singular_values, reference.singular_values, rtol=1e-8, atol=1e-10)
    for r in range(1, 7):
        torch.testing.assert_close(w_hat(decomposition, r), w_hat(reference, r), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", PEER_RECIPES)
def test_peer_recipes_build(name):
    cfg = recipe(name, reduction=0.5)
    assert (cfg.decomposition, cfg.allocation) == {
        "flar-svd": ("flar", "flar"), "svd-llm": ("svd_llm", "uniform"), "svd-llm-update": ("svd_llm", "uniform"),
        "svd-llm-v2": ("svd_llm", "svd_llm_v2"), "kfac-lems": ("kfac", "lems")}[name]
    # SVD-LLM's published pipeline is its whitened truncation alone; the sequential update is its own recipe
    assert cfg.refit == (name == "svd-llm-update")


@pytest.mark.parametrize("name, settings, word", [
    ("kfac-lems", {"nope": 1}, "nope"),
    ("kfac-lems", {"grad_shrinkage": 1.5}, "grad_shrinkage"),
    ("kfac-lems", {"input_shrinkage": -0.1}, "input_shrinkage"),
    ("kfac-lems", {"clip_low": 2.0}, "clip_low"),
    ("kfac-lems", {"clip_high": 0.5}, "clip_high must be at least 1"),
    ("kfac-lems", {"rank_ceiling": 0.05}, "rank_ceiling must lie in \\(rank_floor"),
    ("flar-svd", {"threshold": float("nan")}, "threshold"),
    ("svd-llm-v2", {"loss_tokens": 0}, "loss_tokens"),
    ("kfac-lems", {"rank_floor": 0}, "rank_floor"),
    ("kfac-lems", {"rank_step": 0}, "rank_step"),
    ("flar-svd", {"rank_step": 0}, "rank_step"),
    ("flar-svd", {"shrinkage": "x"}, "shrinkage"),
    ("flar-svd", {"threshold": -1.0}, "threshold"),
    ("flar-svd", {"grad_shrinkage": 0.5}, "grad_shrinkage"),  # KFAC's setting, not FLAR's
    ("svd-llm", {"shrinkage": "none"}, "shrinkage"),
])
def test_bad_settings_raise_naming_the_setting(name, settings, word):
    with pytest.raises(ValueError, match=word):
        recipe(name, reduction=0.5, settings=settings)


def test_settings_of_the_chosen_methods_are_accepted():
    cfg = recipe("kfac-lems", reduction=0.5, settings={"grad_shrinkage": 0.3, "rank_floor": 0.2})
    assert cfg.settings == {"grad_shrinkage": 0.3, "rank_floor": 0.2}
    recipe("flar-svd", reduction=0.5, settings={"shrinkage": "none", "rank_step": 4})


@pytest.mark.parametrize("allocation", ["lems", "flar"])
def test_probing_allocations_reject_whole_module_decompositions(allocation):
    with pytest.raises(ValueError, match="comcat"):
        CompressionConfig(reduction=0.5, decomposition="comcat", allocation=allocation)


# ------------------------------------------------------------------------------------------------ end to end


def labelled_batches():
    images = make_images(64, seed=3)
    labels = torch.arange(64) % 10
    return images, [(images[:32], labels[:32]), (images[32:], labels[32:])]


def tiny_model(name: str) -> nn.Module:
    model = make_tiny_vit()
    return model


@pytest.mark.parametrize("name", PEER_RECIPES)
def test_peer_recipes_compress_a_tiny_vit_as_planned(name):
    images, batches = labelled_batches()
    cfg = recipe(name, reduction=0.5, calib_samples=64, progress=False)
    plan = plan_compression(tiny_model(name), batches, cfg)
    model = tiny_model(name)
    report = compress(model, batches, cfg)
    assert plan.ranks == report.ranks
    assert any(rank is not None for rank in report.ranks.values())
    assert plan.params_after == report.params_after <= report.target_params
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


def factorized_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input tokens every factorized layer of ``model`` sees on ``images`` (float64, flattened to rows)."""
    from lowrank_vit import FactorizedLinear

    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            handles.append(module.register_forward_hook(
                lambda _, args, __, name=name: inputs.__setitem__(name, args[0].detach().double().flatten(0, -2))))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return inputs


def test_svd_llm_refit_is_the_least_squares_fit_to_each_layers_compressed_inputs():
    # SVD-LLM's update: for the inputs X_c the refitted model gives a layer, W_hat = U_r lstsq(X_c U_r, X_c W) with
    # U_r the input-side factor of the plain compression (same ranks); so it fits X_c W no worse than that one
    images, batches = labelled_batches()
    dense = dict(make_tiny_vit().named_modules())
    built = {}
    for refit in (True, False):
        model = make_tiny_vit()
        compress(model, batches, recipe("svd-llm", reduction=0.5, calib_samples=64, progress=False, refit=refit))
        built[refit] = model
    plain = dict(built[False].named_modules())
    inputs = factorized_inputs(built[True], images)
    assert inputs and inputs.keys() == factorized_inputs(built[False], images).keys()
    for name, X in inputs.items():
        refitted = dict(built[True].named_modules())[name]
        W = dense[name].weight.detach().double().T
        U = plain[name].U.detach().double()
        assert refitted.U.shape == U.shape  # the same rank
        expected = U @ torch.linalg.lstsq(X @ U, X @ W).solution
        fitted = refitted.dense_weight().detach().double()
        target = (X @ W).norm()
        assert float((X @ (fitted - expected)).norm() / target) < 1e-6, name
        refit_error = float((X @ (fitted - W)).norm() / target)
        plain_error = float((X @ (plain[name].dense_weight().detach().double() - W)).norm() / target)
        assert refit_error <= plain_error + 1e-6, name


@pytest.mark.parametrize("seed", range(6))
def test_the_integer_policy_is_never_worse_than_the_marginal_one_on_the_same_curves(seed):
    """Both allocations fit the budget; the integer program's is the exact optimum of the summed losses, so the
    marginal (Lagrangian) allocation, another feasible point, can only tie or lose."""
    from lowrank_vit.core.allocate import allocate_marginal
    from lowrank_vit.core.decompose import energy_tail_curve
    from lowrank_vit.core.search import IntegerSettings, allocate_integer_on_curves

    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (k, m) in enumerate([(12, 36), (12, 12), (36, 12), (12, 36), (20, 8)]):
        s = torch.sort(torch.rand(min(k, m), generator=g, dtype=torch.float64) * 10.0 ** (i % 3), descending=True)[0]
        layers.append(LayerBudget(f"l{i}", k, m, 0, energy_tail_curve(s)))
    budget = int(sum(layer.dense_params for layer in layers) * (0.3 + 0.1 * (seed % 4)))
    exact = allocate_integer_on_curves(layers, budget, IntegerSettings())
    lagrangian = allocate_marginal(layers, budget)
    assert exact.params <= budget and lagrangian.params <= budget
    total = lambda a: sum(layer.loss(a.ranks[layer.name]) for layer in layers)  # noqa: E731
    assert total(exact) <= total(lagrangian) * (1 + 1e-9) + 1e-12


class _StubProbe:
    """What LEMS asks of a probe, with sensitivities fixed by hand (KL = 1 / (1 + layer index))."""

    def __init__(self) -> None:
        self.calls, self.asked = 0, []

    def kl(self, ranks, temperature):
        self.calls += 1
        self.asked.append(dict(ranks))
        (name, _), = ranks.items()
        return 1.0 / (1 + int(name[1:]))


def test_lems_is_the_brute_force_optimum_of_its_error_model_and_never_probes_a_layer_without_ranks():
    from lowrank_vit.core.decompose import energy_loss_curve
    from lowrank_vit.core.search import LemsSettings, allocate_lems

    g = torch.Generator().manual_seed(3)
    layers = []
    for i, (k, m) in enumerate([(16, 48), (16, 16), (48, 16), (1, 1)]):
        s = torch.sort(torch.rand(min(k, m), generator=g, dtype=torch.float64), descending=True)[0]
        layers.append(LayerBudget(f"l{i}", k, m, 0, energy_loss_curve(s)))
    budget = sum(layer.dense_params for layer in layers) // 2
    settings = LemsSettings(rank_step=2)
    probe = _StubProbe()
    allocation = allocate_lems(layers, budget, settings, probe)
    assert [list(a) for a in probe.asked] == [["l0"], ["l1"], ["l2"]]  # the 1 x 1 layer has no rank to measure
    options = []
    for i, layer in enumerate(layers[:3]):
        eq = layer.dense_params // layer.rank_step
        floor = max(1, math.floor(0.1 * eq))
        ranks = [r for r in range(floor, min(math.floor(0.95 * eq), layer.max_rank + 1)) if r % 2 == 0]
        kl = 1.0 / (1 + i)
        options.append([(r, layer.params(r), kl * layer.loss(r) / max(layer.loss(floor), 1e-6)) for r in ranks]
                       + [(None, layer.dense_params, 0.0)])
    room = budget - layers[3].dense_params
    best = min((sum(e for _, _, e in combo), combo) for combo in itertools.product(*options)
               if sum(p for _, p, _ in combo) <= room)
    assert allocation.ranks["l3"] is None
    assert [allocation.ranks[f"l{i}"] for i in range(3)] == [r for r, _, _ in best[1]]


def test_the_probing_peers_measure_a_models_output_where_it_has_no_classifier_head():
    """FLAR-SVD's feature error and LEMS's divergence read the model's output itself when there is no head: on a
    dense map model both compress (no IndexError, no refusal), and LEMS's divergence under the Gaussian likelihood is
    half the squared distance of the outputs per image, computed here by hand."""
    images = make_images(8)
    for name in ("flar-svd", "kfac-lems"):
        model = DenseHeadViT(as_dict=False)
        report = compress(model, [images], CompressionConfig(reduction=0.5, progress=False, **RECIPES[name]))
        assert report.config["likelihood"] == "gaussian" and report.params_after <= report.target_params
    model = DenseHeadViT(as_dict=False)
    layer = "backbone.blocks.0.mlp.fc1"
    layers = {layer: model.get_submodule(layer)}
    probe = Probe(model, layers, lambda name, rank: torch.zeros_like(layers[name].weight.T), [images], None,
                  torch.device("cpu"), Gaussian())
    with torch.no_grad():
        dense = model(images)
        weight = layers[layer].weight.data.clone()
        layers[layer].weight.data.zero_()
        cut = model(images)
        layers[layer].weight.data.copy_(weight)
    expected = 0.5 * float((cut.double() - dense.double()).square().sum()) / images.shape[0]
    assert probe.kl({layer: 1}) == pytest.approx(expected, rel=1e-5)
    assert probe.feature_error({layer: 1}) == pytest.approx(
        float((cut - dense).square().sum() / cut.square().sum()), rel=1e-5)


def test_flar_held_out_probe_measures_the_images_after_the_calibration_set(monkeypatch):
    """With held_out_probe the search's forwards run on the probe_images that follow the calib_samples images, in a
    plan and in a compression alike; the statistics stop at calib_samples (the same ranks as calibrating on those
    images alone, with the same probe)."""
    import lowrank_vit.pipeline as pipeline

    seen: list[torch.Tensor] = []

    class Spy(Probe):
        def __init__(self, model, layers, reconstruct, images, *args, **kwargs):
            seen.append(torch.cat(images))
            super().__init__(model, layers, reconstruct, images, *args, **kwargs)

    monkeypatch.setattr(pipeline, "Probe", Spy)
    images = make_images(96, seed=11)
    batches = [images[i: i + 40] for i in range(0, 96, 40)]  # the split falls inside a batch
    cfg = recipe("flar-svd", reduction=0.5, calib_samples=64, progress=False,
                 settings={"probe_images": 32, "held_out_probe": True})
    plan = plan_compression(make_tiny_vit(), batches, cfg)
    report = compress(make_tiny_vit(), batches, cfg)
    assert len(seen) == 2 and all(torch.equal(s, images[64:]) for s in seen)
    assert plan.ranks == report.ranks
    # the statistics read the first 64 images only: other images after them change nothing but the probe's, so
    # with the probe's own images put back the ranks are the same
    seen.clear()
    same = [images[:40], images[40:64], images[64:]]
    assert plan_compression(make_tiny_vit(), same, cfg).ranks == plan.ranks
    with pytest.raises(ValueError, match="held_out_probe.*96 images"):
        compress(make_tiny_vit(), [images[:80]], cfg)
