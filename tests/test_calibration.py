"""Calibration statistics are exact: the streamed Gram matrices, per-image weights and extras match a straightforward
float64 reference built from the same forward pass, whatever the product precision, block split or batch split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_vit import compress, get_adapter
from lowrank_vit.config import recipe
from lowrank_vit.core.calibration import (
    LayerStats,
    collect_statistics,
    output_energies,
    range_gram,
    symmetrize_upper,
    upper_gram_,
)
from lowrank_vit.core.decompose import (
    output_whitened_singular_values,
    weighted_error,
    whitened_singular_values,
    whitened_svd,
    whitening,
)
from lowrank_vit.methods.compensate import CompensationProblem, closed_form_z
from lowrank_vit.pipeline import plan_compression, statistics_space

from conftest import make_images, make_tiny_vit


def reference_statistics(model: nn.Module, layers: dict[str, nn.Linear], images: torch.Tensor) -> dict[str, dict]:
    """The textbook computation, one image at a time in float64: w_i = 1 / ||X_i W||^2, H = sum_i w_i X_i^T X_i."""
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    handles = [layer.register_forward_hook(
        lambda mod, inp, out, name=name: captured[name].append((inp[0].detach().clone(), out.detach().clone())))
        for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, layer in layers.items():
        (x, y), = captured[name]
        k = layer.in_features
        gram = torch.zeros(k, k, dtype=torch.float64)
        weights = []
        for i in range(images.shape[0]):
            xi = x[i].reshape(-1, k).double()
            yi = y[i].reshape(-1, layer.out_features).double() - layer.bias.detach().double()
            w = 1.0 / yi.pow(2).sum()
            weights.append(w)
            gram += w * xi.T @ xi
        out[name] = {"gram": gram, "weights": torch.stack(weights), "mean": x.double().mean(0)}
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest entry difference relative to the largest diagonal entry (the scale of a Gram matrix)."""
    return float((a - b).abs().max() / b.diagonal().abs().max())


@pytest.fixture(scope="module")
def model_and_layers():
    model = make_tiny_vit(embed_dim=48, mlp_ratio=4.0)  # fc2 input 192 wide
    return model, get_adapter(model).compressible_layers(model)


@pytest.mark.parametrize("precision, tolerance", [("float64", 1e-7), ("float32", 2e-6)])
def test_matches_float64_reference(model_and_layers, precision, tolerance):
    model, layers = model_and_layers
    images = make_images(12, seed=3)
    reference = reference_statistics(model, layers, images)
    batches = [images[:5], images[5:10], images[10:]]  # uneven batches: the last one is smaller
    stats = collect_statistics(model, layers, batches, 12, progress=False, gram_precision=precision, want_mean=True)
    for name, ref in reference.items():
        assert stats[name].num_images == 12
        assert stats[name].gram.dtype == torch.float64
        assert torch.equal(stats[name].gram, stats[name].gram.T), name  # exactly symmetric
        assert relative_error(stats[name].gram, ref["gram"]) < tolerance, name
        torch.testing.assert_close(stats[name].mean_input, ref["mean"], rtol=1e-6, atol=1e-7)
    for name, layer in layers.items():  # no hook left behind
        assert not layer._forward_hooks, name


def test_block_split_is_exact(monkeypatch, model_and_layers):
    # Force the block-triangular product on every layer (blocks of 16 on 48- and 192-wide inputs): same statistics.
    model, layers = model_and_layers
    images = make_images(8, seed=4)
    whole = collect_statistics(model, layers, [images], 8, progress=False)
    import lowrank_vit.core.calibration as calibration

    monkeypatch.setattr(calibration, "_GRAM_BLOCK", 16)
    split = collect_statistics(model, layers, [images[:3], images[3:]], 8, progress=False)
    for name in layers:
        assert relative_error(split[name].gram, whole[name].gram) < 1e-12, name


@pytest.mark.parametrize("k, block", [(10, 384), (50, 16), (64, 16), (100, 33)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upper_gram(k, block, dtype):
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(k), dtype=dtype)
    out = torch.full((k, k), float("nan"), dtype=dtype)  # what lies below the diagonal blocks must not matter
    upper_gram_(out, x, block)
    full = x.T @ x
    assert torch.allclose(torch.triu(out), torch.triu(full), rtol=1e-5 if dtype == torch.float32 else 1e-12)
    sym = symmetrize_upper(torch.triu(out))
    assert torch.equal(sym, sym.T)


def test_per_image_scale_invariance():
    # Eq. 5's weights normalise each image: scaling one image's input (no bias, no norm) leaves H unchanged.
    torch.manual_seed(0)
    layer = nn.Linear(12, 5, bias=False)
    model = nn.Sequential(nn.Flatten(1), layer)  # one 12-wide token per (3, 2, 2) image
    images = torch.randn(6, 3, 2, 2)
    scaled = images.clone()
    scaled[2] *= 2.0**12  # powers of two: the scaled forward is exact, so H must agree to rounding
    scaled[4] *= 2.0**-12
    a = collect_statistics(model, {"l": layer}, [images], 6, progress=False)["l"].gram
    b = collect_statistics(model, {"l": layer}, [scaled], 6, progress=False)["l"].gram
    assert relative_error(b, a) < 1e-9


def test_output_energies_are_float64_accurate():
    y = torch.randn(4, 197, 1536, generator=torch.Generator().manual_seed(0)) * 3 + 1
    bias = torch.randn(1536, generator=torch.Generator().manual_seed(1))
    energy, centered = output_energies(y, bias, 4)
    exact = (y.double() - bias.double()).pow(2).sum(dim=(1, 2))
    assert energy.dtype == torch.float64
    assert float(((energy - exact) / exact).abs().max()) < 1e-7
    assert torch.equal(centered, y - bias)
    huge, _ = output_energies(torch.full((2, 3, 4), 1e25), None, 2)  # float32 squares overflow: redone in float64
    assert torch.allclose(huge, torch.full((2,), 12 * 1e50, dtype=torch.float64), rtol=1e-6)


def test_float32_overflow_is_named():
    # Finite activations whose scaled float32 product overflows (huge inputs, tiny weights): a clear message.
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1e-30)
    model = nn.Sequential(nn.Flatten(1), layer)
    images = torch.full((2, 1, 2, 2), 1e18)
    with pytest.raises(ValueError, match=r"float32 Gram product of layer l's inputs overflows"):
        collect_statistics(model, {"l": layer}, [images], 2, progress=False, gram_precision="float32")
    assert not layer._forward_hooks
    stats = collect_statistics(model, {"l": layer}, [images], 2, progress=False, gram_precision="float64")
    assert torch.isfinite(stats["l"].gram).all()


def test_sgd_samples_and_weights():
    model = make_tiny_vit()
    layers = get_adapter(model).compressible_layers(model)
    images = make_images(6)
    stats = collect_statistics(model, layers, [images[:4], images[4:]], 6, progress=False, sample_tokens=5)
    for name, layer in layers.items():
        s = stats[name]
        assert s.samples.shape == (6, 5, layer.in_features) and s.samples.dtype == torch.float32
        assert s.sample_weights.shape == (6,) and torch.isfinite(s.sample_weights).all()
        assert (s.sample_weights > 0).all()
    # the kept tokens are a random subset of each image's tokens (every position can be drawn), not its first ones
    name = "blocks.0.attn.qkv"
    seen = []
    handle = layers[name].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    inputs, drawn = seen[0], stats[name].samples
    positions = [[int((inputs[i] - row).abs().sum(dim=1).argmin()) for row in drawn[i]] for i in range(6)]
    for i in range(6):
        assert torch.allclose(drawn[i], inputs[i, positions[i]], atol=1e-6) and len(set(positions[i])) == 5
    assert any(max(p) >= 5 for p in positions)


def test_bad_precision():
    model = make_tiny_vit()
    with pytest.raises(ValueError, match="gram_precision"):
        collect_statistics(model, get_adapter(model).compressible_layers(model), [make_images(2)], 2,
                           progress=False, gram_precision="bfloat16")


# --------------------------------------------------------------------------------------------------------------------
# gram_space="auto": wide-input layers from their output Gram


def random_gram(k: int, rows: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 0] *= 30.0  # an anisotropic spectrum, like activations
    return x.T @ x


@pytest.mark.parametrize("deficient", [False, True])
def test_range_gram_agrees_with_h_on_the_range_of_w(deficient):
    k, m = 40, 12
    H = random_gram(k, 60, seed=1)
    W = torch.randn(k, m, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if deficient:
        W[:, -1] = W[:, 0] - 2 * W[:, 1]  # rank 11
    G = range_gram(W, W.T @ H @ W, float(H.trace()))
    assert torch.equal(G, G.T)
    torch.testing.assert_close(W.T @ G @ W, W.T @ H @ W, rtol=1e-9, atol=1e-9 * float(H.diagonal().max()))
    assert float(G.trace()) == pytest.approx(float(H.trace()), rel=1e-12)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-9 * float(H.diagonal().max())


@pytest.mark.parametrize("deficient", [False, True])
def test_output_error_from_the_factored_range_basis(deficient):
    """The report's eq. (5) errors of an output-side layer, from Q, S and c without the (k x k) matrix: the same
    number as the formed range Gram for any delta, and H's own for a delta in the range of W."""
    from lowrank_vit.core.calibration import LayerStats, output_error

    k, m = 40, 12
    H = random_gram(k, 60, seed=5)
    g = torch.Generator().manual_seed(6)
    W = torch.randn(k, m, generator=g, dtype=torch.float64)
    if deficient:
        W[:, -1] = W[:, 0] - 2 * W[:, 1]
    stats = LayerStats(None, 7, output_gram=W.T @ H @ W, input_trace=float(H.trace()), range_weight=W)
    in_range = W @ torch.randn(m, m, generator=g, dtype=torch.float64)
    anywhere = torch.randn(k, m, generator=g, dtype=torch.float64)
    G = range_gram(W, W.T @ H @ W, float(H.trace()))
    assert output_error(stats, in_range) == pytest.approx(weighted_error(in_range, H, 7), rel=1e-8)
    assert output_error(stats, anywhere) == pytest.approx(weighted_error(anywhere, G, 7), rel=1e-8)
    assert stats.__dict__.get("_gram") is None  # the (k x k) matrix was never formed
    input_side = LayerStats(H, 7)
    assert output_error(input_side, anywhere) == weighted_error(anywhere, H, 7)


def test_range_gram_gives_the_same_decomposition_z_and_errors():
    k, m = 40, 12
    H = random_gram(k, 30, seed=3)  # fewer rows than features: H singular, as with few tokens
    W = torch.randn(k, m, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    G = range_gram(W, W.T @ H @ W, float(H.trace()))
    exact, surrogate = whitening(H, 1e-4), whitening(G, 1e-4)
    d_exact, d_surrogate = whitened_svd(W, exact), whitened_svd(W, surrogate)
    torch.testing.assert_close(d_surrogate.singular_values, d_exact.singular_values, rtol=1e-8, atol=1e-10)
    for rank in (1, 4, 9):
        U, V = d_exact.factors(rank)
        Us, Vs = d_surrogate.factors(rank)
        torch.testing.assert_close(Us @ Vs.T, U @ V.T, rtol=1e-7, atol=1e-9)
        residual = W - U @ V.T
        z = closed_form_z("lowrank", CompensationProblem(residual, exact), 2 * (k + m))
        zs = closed_form_z("lowrank", CompensationProblem(residual, surrogate), 2 * (k + m))
        torch.testing.assert_close(zs.G @ zs.Y.T, z.G @ z.Y.T, rtol=1e-6, atol=1e-8)
        delta = residual - z.G.detach() @ z.Y.detach().T
        assert weighted_error(delta, G, 5) == pytest.approx(weighted_error(delta, H, 5), rel=1e-6)  # Z is float32


def test_auto_space_statistics(model_and_layers):
    model, layers = model_and_layers
    images = make_images(10, seed=5)
    exact = collect_statistics(model, layers, [images[:6], images[6:]], 10, progress=False)
    auto = collect_statistics(model, layers, [images[:6], images[6:]], 10, progress=False, gram_space="auto")
    wide = [name for name, layer in layers.items() if layer.out_features < layer.in_features]
    assert wide and all(name.endswith("fc2") for name in wide)
    for name, layer in layers.items():
        if name not in wide:
            assert auto[name].output_gram is None and torch.equal(auto[name].gram, exact[name].gram), name
            continue
        W = layer.weight.detach().double().T
        M = W.T @ exact[name].gram @ W
        assert auto[name].output_gram.shape == (layer.out_features,) * 2
        # M comes from the float32 outputs X W of the forward: their rounding (~1e-7), not an estimate.
        assert relative_error(auto[name].output_gram, M) < 1e-6, name
        assert auto[name].input_trace == pytest.approx(float(exact[name].gram.trace()), rel=1e-7)
        assert relative_error(W.T @ auto[name].gram @ W, M) < 1e-6, name


@pytest.mark.parametrize("name", ["paper", "loss-aware"])
def test_auto_space_compresses_like_input_space(name):
    # The whole closed-form pipeline (the paper's whitened SVD, greedy ranks, low-rank Z; or the loss-aware SVD and
    # marginal ranks) and its report on both kinds of statistics.
    import copy

    model = make_tiny_vit(embed_dim=48, mlp_ratio=4.0)
    images = make_images(32, seed=6)
    results = {}
    for space in ("input", "auto"):
        compressed = copy.deepcopy(model)
        # float64 products: the two spaces are the same mathematics, so they agree to float64 rounding
        config = recipe(name, reduction=0.5, calib_samples=32, gram_space=space, progress=False,
                        gram_precision="float64")
        report = compress(compressed, [images[:16], images[16:]], config)
        plan = plan_compression(copy.deepcopy(model), [images[:16], images[16:]], config)
        results[space] = (report, compressed, plan)
    (report_in, model_in, plan_in), (report_auto, model_auto, plan_auto) = results["input"], results["auto"]
    assert [layer.rank for layer in report_auto.layers] == [layer.rank for layer in report_in.layers]
    assert plan_auto.ranks == plan_in.ranks == {layer.name: layer.rank for layer in report_in.layers}
    for a, b in zip(report_auto.layers, report_in.layers, strict=True):
        assert a.output_error == pytest.approx(b.output_error, rel=1e-5), a.name
    probe = make_images(4, seed=7)
    with torch.no_grad():
        assert torch.allclose(model_auto(probe), model_in(probe), atol=1e-5)


@pytest.mark.parametrize("settings, space", [
    ({}, "auto"),
    ({"gram_space": "input"}, "input"),
    ({"compensation": "none"}, "auto"),
    ({"solver": "sgd"}, "input"),  # the SGD-fitted Z is not confined to the range of W
    ({"decomposition": "mean"}, "input"),
    ({"compensation": "sparse"}, "input"),
    ({"decomposition": "asvd"}, "input"),
    ({"decomposition": "loss_aware", "allocation": "marginal", "compensation": "none"}, "auto"),
    ({"decomposition": "loss_aware", "compensation": "diagonal"}, "input"),  # diagonal Z needs H itself
])
def test_statistics_space_is_auto_only_where_exact(settings, space):
    assert statistics_space(recipe("paper", reduction=0.5, **settings)) == space


def test_output_whitened_singular_values():
    k, m = 40, 12
    H = random_gram(k, 30, seed=8)
    W = torch.randn(k, m, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = whitened_singular_values(W, H, 1e-3)
    got = output_whitened_singular_values(W, W.T @ H @ W, float(H.trace()), 1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # lazily built input-side matrix: the same spectrum again
    stats = LayerStats(gram=None, num_images=1, output_gram=W.T @ H @ W, input_trace=float(H.trace()), range_weight=W)
    torch.testing.assert_close(whitened_singular_values(W, stats.gram, 1e-3), expected, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="needs output_gram"):
        _ = LayerStats(gram=None, num_images=1).gram


def test_bad_gram_space():
    model = make_tiny_vit()
    with pytest.raises(ValueError, match="gram_space"):
        collect_statistics(model, get_adapter(model).compressible_layers(model), [make_images(2)], 2,
                           progress=False, gram_space="output")
