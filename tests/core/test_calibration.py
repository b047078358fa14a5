"""Tests of lowrank_vit/core/calibration.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_vit import FactorizedLinear, compress, get_adapter
from lowrank_vit.core.calibration import (
    collect_statistics,
    output_energies,
    range_gram,
    symmetrize_upper,
    upper_gram_,
)
from lowrank_vit.core.decompose import (
    weighted_error,
    whitened_svd,
    whitening,
)
from lowrank_vit.methods.compensate import CompensationProblem, closed_form_z
from tests.helpers import (
    assert_unchanged,
    cfg,
    make_images,
    make_tiny_vit,
    pipeline_cfg,
    random_gram,
    small_vit,
    snapshot,
)


def _nan_images(n: int = 8) -> torch.Tensor:
    images = make_images(n)
    images[n // 2, 0, 3, 4] = float("nan")
    return images


def _inf_images(n: int = 8) -> torch.Tensor:
    images = make_images(n)
    images[1, 0, 0, 0] = float("-inf")
    return images


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    ("data", "error", "pattern"),
    [
        pytest.param([_nan_images()], ValueError, r"calibration batch 0 contains NaN or inf", id="nan"),
        pytest.param([_inf_images()], ValueError, r"calibration batch 0 contains NaN or inf", id="inf"),
        pytest.param([make_images(8), _nan_images()], ValueError, r"calibration batch 1 contains NaN or inf",
                     id="nan-second-batch"),
        pytest.param([], ValueError, r"calibration data is empty", id="empty-list"),
        pytest.param(iter(()), ValueError, r"calibration data is empty", id="empty-iterator"),
        pytest.param([make_images(4)[:0]], ValueError, r"calibration data is empty", id="zero-image-batch"),
        pytest.param([make_images(8)[:, 0]], ValueError, r"calibration batch 0 has shape \(8, 28, 28\); "
                     r"expected \(B, C, H, W\)", id="3d-batch"),
        pytest.param([make_images(8)[None]], ValueError, r"has shape \(1, 8, 1, 28, 28\); expected \(B, C, H, W\)",
                     id="5d-batch"),
        pytest.param([(make_images(8) * 100).to(torch.int64)], ValueError,
                     r"calibration batch 0 has dtype torch\.int64; expected floating-point", id="int64-images"),
        pytest.param([(make_images(8) * 100).clamp(0, 255).to(torch.uint8)], ValueError,
                     r"has dtype torch\.uint8; expected floating-point", id="uint8-images"),
        pytest.param(["not an image"], TypeError, r"calibration batch must be an image tensor.*got str",
                     id="string-batch"),
        pytest.param("images.npy", TypeError, r"calibration batch must be an image tensor.*got str",
                     id="string-iterable"),
        pytest.param([None], TypeError, r"calibration batch must be an image tensor.*got NoneType", id="none-batch"),
        pytest.param([{"label": torch.zeros(8)}], TypeError, r"calibration batch must be an image tensor.*got dict",
                     id="dict-without-image"),
    ],
)
def test_bad_calibration_data(tiny_vit, data, error, pattern):
    before = snapshot(tiny_vit)
    with pytest.raises(error, match=pattern):
        compress(tiny_vit, data, cfg())
    assert_unchanged(tiny_vit, before)


@pytest.mark.usefixtures("one_thread_module")
def test_calibration_data_not_iterable(tiny_vit):
    with pytest.raises(TypeError, match=r"not iterable"):
        compress(tiny_vit, 42, cfg())


@pytest.mark.usefixtures("one_thread_module")
def test_failure_in_second_batch_leaves_no_hooks_and_model_unchanged(tiny_vit):
    tiny_vit.train()  # compress puts the model in eval mode for the pass; the mode must come back
    before = snapshot(tiny_vit)
    seen = []

    class Recording:
        """Iterable that records how many batches were drawn, so we know batch 0 went through the forward."""

        def __iter__(self):
            seen.append(0)
            yield make_images(8)
            seen.append(1)
            yield _nan_images()
            seen.append(2)  # never reached
            yield make_images(8)

    with pytest.raises(ValueError, match=r"calibration batch 1 contains NaN or inf"):
        compress(tiny_vit, Recording(), cfg())
    assert seen == [0, 1]
    assert_unchanged(tiny_vit, before)
    assert tiny_vit.training


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("recipe_name", ["loss-aware", "paper", "vanilla"])
def test_layer_the_model_never_calls_is_named_after_the_first_batch(recipe_name):
    # An attention that computes q, k, v with F.linear on attn.qkv.weight (as timm's BEiT did before its
    # qkv_bias_separate path, which compress now switches on) never calls the module, and a factorized replacement
    # would be ignored: say so after the first batch, not after the whole calibration set, and leave the model as it
    # was.
    from torch.nn import functional as F

    from lowrank_vit.config import recipe

    model = make_tiny_vit(img_size=32, patch_size=8, in_chans=3, num_classes=5)
    attn = model.blocks[0].attn

    def reads_the_weight(x, *args, **kwargs):
        B, N, C = x.shape
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(*qkv.unbind(0))
        return attn.proj(out.transpose(1, 2).reshape(B, N, C))

    attn.forward = reads_the_weight
    before = snapshot(model)
    seen = []

    def batches():
        for index in range(3):
            seen.append(index)
            yield make_images(4, channels=3, size=32, seed=index)

    with pytest.raises(ValueError, match=r"layer blocks\.0\.attn\.qkv was never called by the calibration forward "
                                         r"pass.*F\.linear on layer\.weight"):
        compress(model, batches(), recipe(recipe_name, reduction=0.2, progress=False, calib_samples=12))
    assert seen == [0]
    assert_unchanged(model, before)


@pytest.mark.usefixtures("one_thread_module")
def test_failure_inside_model_forward_leaves_no_hooks(tiny_vit):
    # The second batch has the wrong channel count: the patch embedding raises inside the forward pass, after the
    # first batch was recorded by the hooks.
    before = snapshot(tiny_vit)
    with pytest.raises(RuntimeError, match=r"channels"):
        compress(tiny_vit, [make_images(8), make_images(8, channels=3)], cfg())
    assert_unchanged(tiny_vit, before)
    assert not tiny_vit.training


@pytest.mark.usefixtures("one_thread_module")
def test_non_finite_activations_raise_from_hook(tiny_vit, calib_batches):
    # Finite images and finite block weights, but a NaN in the patch embedding: the hook itself must raise.
    with torch.no_grad():
        tiny_vit.patch_embed.proj.bias[3] = float("nan")
    before = snapshot(tiny_vit)
    with pytest.raises(ValueError, match=r"non-finite activations \(NaN or inf\) reach layer blocks\.0\.attn\.qkv"):
        compress(tiny_vit, calib_batches, cfg())
    for name, module in tiny_vit.named_modules():
        assert not module._forward_hooks, name
    after = tiny_vit.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key].nan_to_num(), value.nan_to_num()), key
    assert not any(isinstance(m, FactorizedLinear) for m in tiny_vit.modules())


@pytest.mark.usefixtures("one_thread_module")
def test_overflowing_images_raise(tiny_vit):
    # Finite but huge pixels overflow to inf inside the model: caught by the activation check, not silently used.
    images = make_images(4) * 1e30
    assert torch.isfinite(images).all()
    before = snapshot(tiny_vit)
    with pytest.raises(ValueError, match=r"non-finite activations"):
        compress(tiny_vit, [images], cfg())
    assert_unchanged(tiny_vit, before)


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


def test_bad_gram_space():
    model = make_tiny_vit()
    with pytest.raises(ValueError, match="gram_space"):
        collect_statistics(model, get_adapter(model).compressible_layers(model), [make_images(2)], 2,
                           progress=False, gram_space="output")


def test_calibration_uses_calib_samples_and_accepts_labelled_batches(small_images):
    labels = torch.zeros(len(small_images), dtype=torch.long)
    batches = [(small_images[i: i + 8], labels[i: i + 8]) for i in range(0, 48, 8)]
    seen = []

    class Counting(list):
        def __iter__(self):
            for b in super().__iter__():
                seen.append(len(b[0]))
                yield b

    compress(small_vit(), Counting(batches), pipeline_cfg(reduction=0.5, calib_samples=20))
    assert seen == [8, 8, 8]  # stops once 20 images were used; the third batch is cut to 4


def test_hooks_are_removed_and_mode_restored(small_images):
    model = small_vit().train()
    compress(model, [small_images], pipeline_cfg(reduction=0.5))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_float32_gram_products_match_float64(small_images):
    """float32 per-batch products summed in float64: the same compression to a few parts per million."""
    reports = {}
    for precision in ("float64", "float32"):
        model = small_vit()
        reports[precision] = compress(model, [small_images[i: i + 8] for i in range(0, 48, 8)],
                                      pipeline_cfg(reduction=0.5, gram_precision=precision))
    exact, fast = reports["float64"], reports["float32"]
    assert exact.ranks == fast.ranks
    for a, b in zip(exact.layers, fast.layers, strict=True):
        assert b.output_error == pytest.approx(a.output_error, rel=1e-3, abs=1e-7)
