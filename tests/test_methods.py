"""The comparison methods ASVD, FWSVD and COMCAT: each one's defining property, targets within 0.1% on tiny ViT,
DeiT and Swin models, save/load round trips, plan/compress agreement, and clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from lowrank_vit import (
    CompressionConfig,
    FactorizedLinear,
    compress,
    count_params,
    load_compressed,
    model_size_mib,
    quantize_,
    save_compressed,
)
from lowrank_vit.core.decompose import plain_svd
from lowrank_vit.core.fisher import row_fisher
from lowrank_vit.core.scaling import MeanAbsRecorder, asvd_scales, fisher_scales, row_scaled_svd
from lowrank_vit.methods.comcat import factorize_attention, head_decompositions, head_products, product_svd, unit_name
from lowrank_vit.nn.adapters import get_adapter, set_submodule
from lowrank_vit.nn.comcat import FactorizedAttention, attention_geometry
from lowrank_vit.pipeline import apply_plan_skeleton_, plan_compression

from conftest import make_images, make_tiny_vit

METHODS = ("asvd", "fwsvd", "comcat")

# Large enough that 0.1% of the target exceeds one rank step of the smallest unit (proj, or one COMCAT head).
ARCHS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4,
                                         num_classes=10)),
    "deit": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4,
                                                     num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                                  depths=(2, 2), num_heads=(2, 4), num_classes=10)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core machine. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make(arch: str, seed: int = 0, noisy_biases: bool = True) -> nn.Module:
    """A tiny timm model; biases made non-zero (timm initializes them to 0) so every bias path is exercised."""
    name, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    if noisy_biases:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "relative_position_bias_table" in pname:
                    p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_images(32, channels=3, size=32, seed=3)


@pytest.fixture(scope="module")
def labelled(images) -> list[tuple[torch.Tensor, torch.Tensor]]:
    labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(0))
    return [(images[i: i + 16], labels[i: i + 16]) for i in (0, 16)]


def cfg(**kwargs) -> CompressionConfig:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("reduction", 0.4)
    return CompressionConfig(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# ASVD


def test_asvd_alpha_zero_is_plain_svd_factors():
    torch.manual_seed(0)
    weight = torch.randn(12, 7, dtype=torch.float64)
    mean_abs = torch.rand(12, dtype=torch.float64) + 0.1
    scaled, plain = row_scaled_svd(weight, asvd_scales(mean_abs, 0.0)), plain_svd(weight)
    for a, b in zip(scaled.factors(4), plain.factors(4), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(scaled.singular_values, plain.singular_values)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0])
def test_asvd_scales_are_the_activation_magnitudes_to_the_power_alpha(alpha):
    """S_jj proportional to (mean_i |x_ij|)^alpha, normalized to mean 1 (alpha = 1 included: it is not plain SVD)."""
    mean_abs = torch.tensor([0.2, 1.0, 3.0, 0.7, 5.0], dtype=torch.float64)
    s = asvd_scales(mean_abs, alpha)
    expected = mean_abs.pow(alpha)
    torch.testing.assert_close(s, expected / expected.mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scales", [lambda v: asvd_scales(v, 0.5), fisher_scales])
def test_a_dead_row_gets_a_small_positive_scale_and_finite_factors(scales):
    """An input channel that is never active (ASVD: mean |x| = 0) or whose weights get no gradient (FWSVD: I_j = 0)
    is floored to a small positive scale, not zero: the factors divide by the scales and must stay finite."""
    importance = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    s = scales(importance)
    assert bool((s > 0).all()) and float(s[0]) < 0.01 * float(s[1:].min())
    U, V = row_scaled_svd(torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                          s).factors(2)
    assert bool(torch.isfinite(U).all() and torch.isfinite(V).all())


def test_asvd_alpha_zero_compresses_like_plain(labelled, images):
    models, reports = {}, {}
    for name, config in (("asvd", cfg(decomposition="asvd", asvd_alpha=0.0)), ("plain", cfg(decomposition="plain"))):
        models[name] = make("vit")
        reports[name] = compress(models[name], labelled, config)
    assert reports["asvd"].ranks == reports["plain"].ranks
    with torch.no_grad():
        assert torch.equal(models["asvd"](images[:4]), models["plain"](images[:4]))


def test_asvd_minimizes_the_scaled_error():
    """W_hat = S^-1 SVD_r(S W) is the best rank-r approximation in ||S (W - W_hat)||_F (Eckart-Young), and its tail
    energy is that error."""
    torch.manual_seed(1)
    weight = torch.randn(10, 8, dtype=torch.float64)
    scales = asvd_scales(torch.rand(10, dtype=torch.float64) * 5, 0.5)
    decomposition = row_scaled_svd(weight, scales)
    U, V = decomposition.factors(3)
    error = (scales[:, None] * (weight - U @ V.T)).pow(2).sum()
    total = (scales[:, None] * weight).pow(2).sum()
    assert torch.isclose(error / total, torch.tensor(decomposition.energy_loss(3), dtype=torch.float64))
    Up, Vp = plain_svd(weight).factors(3)
    assert error <= (scales[:, None] * (weight - Up @ Vp.T)).pow(2).sum()


def test_mean_abs_recorder_measures_inputs_and_removes_hooks():
    model = make("vit")
    layers = get_adapter(model).compressible_layers(model)
    seen = {}
    layer = layers["blocks.1.mlp.fc2"]

    def keep_input(module, inputs, output):
        seen["x"] = inputs[0].detach().clone()

    handle = layer.register_forward_hook(keep_input)
    images = make_images(3, channels=3, size=32)
    with MeanAbsRecorder(layers) as recorder, torch.no_grad():
        model(images)
    handle.remove()
    expected = seen["x"].reshape(-1, layer.in_features).abs().double().mean(dim=0)
    assert torch.allclose(recorder.mean_abs()["blocks.1.mlp.fc2"], expected)
    assert all(not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------------------------------
# FWSVD


def test_fwsvd_uniform_fisher_is_plain_svd_factors():
    torch.manual_seed(0)
    weight = torch.randn(9, 14, dtype=torch.float64)
    scaled, plain = row_scaled_svd(weight, fisher_scales(torch.full((9,), 0.37))), plain_svd(weight)
    for a, b in zip(scaled.factors(5), plain.factors(5), strict=True):
        assert torch.equal(a, b)


def test_fwsvd_weighs_each_row_by_the_square_root_of_its_fisher_information():
    """FWSVD minimizes sum_j I_j ||row_j(W - W_hat)||^2, i.e. ||diag(sqrt(I)) (W - W_hat)||_F^2: the row scales are
    sqrt(I_j) up to one factor, and the factorization at rank r minimizes that weighted error (no nearby rank-r
    weight does better)."""
    g = torch.Generator().manual_seed(3)
    info = torch.tensor([4.0, 1.0, 0.25, 9.0, 1.0, 16.0], dtype=torch.float64)
    scales = fisher_scales(info)
    torch.testing.assert_close(scales / scales[1], info.sqrt())
    weight = torch.randn(6, 8, generator=g, dtype=torch.float64)
    U, V = row_scaled_svd(weight, scales).factors(2)

    def weighted(w_hat: torch.Tensor) -> float:
        return float((info[:, None] * (weight - w_hat).pow(2)).sum())

    best = weighted(U @ V.T)
    for _ in range(20):
        a, b = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
        assert weighted((U + 0.05 * a) @ (V + 0.05 * b).T) > best  # another rank-2 weight


def test_fwsvd_uniform_fisher_compresses_like_plain(labelled, images, monkeypatch):
    def uniform_fisher(model, layers, *args, **kwargs):
        return {name: torch.full((layer.in_features,), 2.5, dtype=torch.float64) for name, layer in layers.items()}

    monkeypatch.setattr("lowrank_vit.methods.decompositions.row_fisher", uniform_fisher)
    models, reports = {}, {}
    for name in ("fwsvd", "plain"):
        models[name] = make("vit")
        reports[name] = compress(models[name], labelled, cfg(decomposition=name))
    assert reports["fwsvd"].ranks == reports["plain"].ranks
    with torch.no_grad():
        assert torch.equal(models["fwsvd"](images[:4]), models["plain"](images[:4]))


def test_row_fisher_is_the_summed_squared_gradient_of_each_input_row(labelled):
    model = make("vit")
    model.train()
    layers = get_adapter(model).compressible_layers(model)
    layers["blocks.0.attn.qkv"].weight.requires_grad_(False)
    fisher = row_fisher(model, layers, labelled, 32, progress=False)
    # the model is left as found: mode, flags, no .grad
    assert model.training and not layers["blocks.0.attn.qkv"].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    layer = layers["blocks.2.mlp.fc1"]
    expected = torch.zeros(layer.in_features, dtype=torch.float64)
    for images, labels in labelled:
        loss = nn.functional.cross_entropy(model(images), labels)
        (grad,) = torch.autograd.grad(loss, [layer.weight])
        expected += grad.double().pow(2).sum(dim=0)  # weight is (out, in): a row of W = weight^T is an input
    assert torch.allclose(fisher["blocks.2.mlp.fc1"], expected, rtol=1e-5)


@pytest.mark.parametrize("batches,match", [
    ("tensors", "labelled calibration batches.*bare image tensor"),
    ("dicts", "labelled calibration batches.*dict without labels"),
    ("generator", "one-shot iterator"),
])
def test_fwsvd_without_labels_is_a_clear_error(batches, match, images):
    model = make("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = {"tensors": [images[:16]], "dicts": [{"image": images[:16]}],
            "generator": ((images[:16], torch.zeros(16, dtype=torch.long)) for _ in range(1))}[batches]
    with pytest.raises(ValueError, match=match):
        compress(model, data, cfg(decomposition="fwsvd"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())


def test_fwsvd_accepts_dict_batches_with_labels(images):
    model = make("vit")
    data = [{"image": images[:16], "label": torch.arange(16) % 10}]
    report = compress(model, data, cfg(decomposition="fwsvd", calib_samples=16))
    assert report.params_after == count_params(model)


# --------------------------------------------------------------------------------------------------------------------
# COMCAT


def test_product_svd_is_the_svd_of_the_product():
    torch.manual_seed(0)
    left, right = torch.randn(17, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    decomposition = product_svd(left, right)
    full = torch.linalg.svdvals(left @ right.T)
    assert torch.allclose(decomposition.singular_values, full[:4])
    U, V = decomposition.factors(4)
    assert torch.allclose(U @ V.T, left @ right.T)
    U, V = decomposition.factors(2)
    assert torch.isclose((left @ right.T - U @ V.T).pow(2).sum(), full[2:].pow(2).sum())


def full_rank(name: str, attn: nn.Module) -> FactorizedAttention:
    return factorize_attention(name, attn, head_decompositions({name: attn}), {})


def test_full_rank_ranks_default_to_head_dim():
    model = make("vit")
    module = full_rank("blocks.0.attn", model.blocks[0].attn)
    assert module.qk_ranks == module.vo_ranks == (16, 16, 16, 16)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_comcat_full_rank_reproduces_every_attention_output(arch):
    """Each attention module alone, with its block's shifted-window mask for Swin; q, k, v and proj biases
    non-zero, so the dropped k bias, the augmented q bias row and the folded v bias are all exercised."""
    model = make(arch)
    torch.manual_seed(1)
    for name, attn in get_adapter(model).attention_modules(model).items():
        block = model.get_submodule(name.rsplit(".", 1)[0])
        factorized = full_rank(name, attn)
        tokens = 16 if arch == "swin" else 17 + (arch == "deit")
        kwargs = {"mask": block.attn_mask} if arch == "swin" and block.attn_mask is not None else {}
        batch = 2 * kwargs["mask"].shape[0] if kwargs else 8  # Swin: whole images of windows, batch-major
        x = torch.randn(batch, tokens, attention_geometry(attn).dim)
        with torch.no_grad():
            assert torch.allclose(factorized(x, **kwargs), attn(x, **kwargs), atol=1e-5), name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_comcat_full_rank_reproduces_the_logits(arch, images):
    model = make(arch)
    with torch.no_grad():
        reference = model(images[:4])
        for name, attn in get_adapter(model).attention_modules(model).items():
            set_submodule(model, name, full_rank(name, attn))
        assert torch.allclose(model(images[:4]), reference, atol=1e-5)
    assert not get_adapter(model).attention_modules(model)


def test_comcat_k_bias_cancels_and_q_bias_does_not():
    """Only b_Q W_K^T x_j depends on the key: changing b_K leaves the attention unchanged, changing b_Q does not."""
    model = make("vit")
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        reference = attn(x)
        attn.qkv.bias[64:128] += 3.0  # every k bias
        assert torch.allclose(attn(x), reference, atol=1e-5)
        assert torch.allclose(full_rank("a", attn)(x), reference, atol=1e-5)
        attn.qkv.bias[:64] += 3.0
        assert not torch.allclose(attn(x), reference, atol=1e-3)
        assert torch.allclose(full_rank("a", attn)(x), attn(x), atol=1e-5)


def test_head_products_are_the_heads_bilinear_forms():
    model = make("vit")
    attn = model.blocks[1].attn
    products = head_products(attn)
    x = torch.randn(5, 64, dtype=torch.float64)
    qkv = nn.functional.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double())
    q, k = qkv[:, :64].reshape(5, 4, 16), qkv[:, 64:128].reshape(5, 4, 16)
    left, right = products["qk.2"]
    scores = attn.scale * q[:, 2] @ k[:, 2].T
    augmented = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    from_product = augmented @ left @ right.T @ x.T
    # equal up to terms constant along the key axis (x_i W_Q b_K^T + b_Q b_K^T), which the softmax cancels
    assert torch.allclose(torch.softmax(from_product, -1), torch.softmax(scores, -1), atol=1e-10)


def test_comcat_rejects_attention_it_cannot_factor(images):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True,
                              **ARCHS["vit"][1]).eval()
    with pytest.raises(ValueError, match="q_norm"):
        compress(model, [images], cfg(decomposition="comcat"))
    assert not any(isinstance(m, FactorizedAttention) for m in model.modules())


def test_comcat_allocates_ranks_per_head(labelled):
    model = make("vit")
    report = compress(model, labelled, cfg(decomposition="comcat", reduction=0.5))
    heads = [lr for lr in report.layers if ".qk." in lr.name or ".vo." in lr.name]
    assert len(heads) == 4 * 2 * 4
    assert {lr.name for lr in heads} >= {unit_name("blocks.0.attn", "qk", 3), unit_name("blocks.3.attn", "vo", 0)}
    assert all(1 <= lr.rank <= 16 for lr in heads)
    for name, attn in get_adapter(model).attention_modules(model, include_factorized=True).items():
        assert isinstance(attn, FactorizedAttention)
        assert list(attn.qk_ranks) == [report.ranks[unit_name(name, "qk", h)] for h in range(4)]
    # the MLP layers are plain-SVD FactorizedLinears
    assert {n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)} <= \
        {f"blocks.{i}.mlp.{fc}" for i in range(4) for fc in ("fc1", "fc2")}


# --------------------------------------------------------------------------------------------------------------------
# Every method: targets, plan agreement, save/load


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_target_within_0_1_percent(method, arch, labelled, images):
    model = make(arch)
    before = count_params(model)
    report = compress(model, labelled, cfg(decomposition=method, reduction=0.4))
    assert report.params_after == count_params(model)
    assert abs(count_params(model) - 0.6 * before) <= 0.001 * 0.6 * before
    with torch.no_grad():
        assert torch.isfinite(model(images[:2])).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_plan_agrees_with_compress(method, allocation, labelled):
    config = cfg(decomposition=method, allocation=allocation, compensation="none")
    plan = plan_compression(make("vit"), labelled, config)
    model = make("vit")
    report = compress(model, labelled, config)
    assert plan.params_after == report.params_after == count_params(model)
    skeleton = apply_plan_skeleton_(make("vit"), plan)
    assert count_params(skeleton) == plan.params_after
    assert {n: type(m) for n, m in skeleton.named_modules()} == {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("method,arch", [(m, "vit") for m in METHODS] + [("comcat", "deit"), ("comcat", "swin")])
def test_save_load_round_trip(method, arch, labelled, images, tmp_path):
    model = make(arch)
    compress(model, labelled, cfg(decomposition=method))
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(images[:4]), model(images[:4]))
    assert count_params(loaded) == count_params(model)


def test_comcat_quantized_round_trip(labelled, images, tmp_path):
    """quantize_ reaches COMCAT's head factors (not only the MLP's U, V, Z), and the codes survive save/load."""
    model = make("vit")
    compress(model, labelled, cfg(decomposition="comcat"))
    record = quantize_(model, bits=4)
    assert {"blocks.0.attn.q_weight", "blocks.0.attn.o_weight"} <= set(record)
    assert torch.unique(model.blocks[0].attn.q_weight[0]).numel() <= 16  # one channel on a 4-bit grid
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(loaded(images[:4]), model(images[:4]), atol=1e-5)
    assert model_size_mib(loaded) == model_size_mib(model)


def test_load_rejects_a_mismatched_attention_spec(labelled, tmp_path):
    import json

    model = make("vit")
    compress(model, labelled, cfg(decomposition="comcat"))
    save_compressed(model, tmp_path / "m")
    plan_file = tmp_path / "m" / "lowrank_vit.json"
    plan = json.loads(plan_file.read_text())
    plan["attention"]["blocks.0.attn"]["num_heads"] = 8
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="blocks.0.attn has num_heads=8"):
        load_compressed(tmp_path / "m")


def test_asvd_alpha_is_validated():
    with pytest.raises(ValueError, match="asvd_alpha"):
        CompressionConfig(reduction=0.5, decomposition="asvd", asvd_alpha=-0.5)
    assert CompressionConfig(reduction=0.5, decomposition="asvd").resolved_settings() == {"asvd_alpha": 0.5}
    assert CompressionConfig(reduction=0.5, decomposition="comcat").resolved_settings() == {}
    with pytest.raises(ValueError, match=r"^setting 'asvd_alpha'=0.7 belongs to decomposition 'asvd', not to "):
        CompressionConfig(reduction=0.5, decomposition="comcat", asvd_alpha=0.7)  # would be silently ignored


def test_tiny_conftest_vit_works_with_every_method():
    """The 27k-parameter conftest model (one image size, one channel): every method runs end to end."""
    images = make_images(16)
    data = [(images, torch.arange(16) % 10)]
    for method in METHODS:
        model = make_tiny_vit()
        report = compress(model, data, cfg(decomposition=method, reduction=0.3))
        assert report.params_after == count_params(model)
