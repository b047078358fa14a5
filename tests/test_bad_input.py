"""Bad input gets a clear exception that names the problem; degenerate calibration data is handled numerically.

Covers CompressionConfig validation, ``compress`` on impossible targets, unsupported or already-compressed models
and malformed calibration data (and that a failed calibration leaves the model exactly as it was), and rank-deficient
Gram matrices (a single constant image, dead input features) that must still give a finite compressed model.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from lowrank_vit import CompressionConfig, FactorizedLinear, compress, count_params, get_adapter

from conftest import make_images, make_tiny_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with other jobs OpenMP's
    spin-waiting can turn a 0.1 s compression into several seconds. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def cfg(**kwargs) -> CompressionConfig:
    kwargs.setdefault("progress", False)
    if "target_params" not in kwargs:
        kwargs.setdefault("reduction", 0.3)
    return CompressionConfig(**kwargs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """No hook left behind, no layer swapped, every tensor bit-identical to ``before``."""
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name or 'root'}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name or 'root'}"
        assert not isinstance(module, FactorizedLinear), f"{name} was swapped although compress failed"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed although compress failed"


def assert_all_finite(model: nn.Module, images: torch.Tensor) -> None:
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"parameter {name} is not finite"
    for name, b in model.named_buffers():
        if b.is_floating_point():
            assert torch.isfinite(b).all(), f"buffer {name} is not finite"
    with torch.no_grad():
        out = model(images)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------------
# CompressionConfig


@pytest.mark.parametrize("reduction", [0, 1, -0.1, 1.5, 0.0, 1.0, float("nan")])
def test_config_reduction_out_of_range(reduction):
    with pytest.raises(ValueError, match=r"reduction must lie strictly between 0 and 1"):
        CompressionConfig(reduction=reduction, progress=False)


@pytest.mark.parametrize("reduction", ["0.5", True, [0.5]])
def test_config_reduction_not_a_number(reduction):
    with pytest.raises(ValueError, match=r"reduction must be a number"):
        CompressionConfig(reduction=reduction, progress=False)


def test_config_both_reduction_and_target():
    with pytest.raises(ValueError, match=r"exactly one of reduction .* target_params .* target_speedup"):
        CompressionConfig(reduction=0.3, target_params=10_000, progress=False)


def test_config_neither_reduction_nor_target():
    with pytest.raises(ValueError, match=r"exactly one of reduction .* target_params .* target_speedup"):
        CompressionConfig(progress=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("decomposition", "svd"),
        ("decomposition", "Whitened"),
        ("allocation", "random"),
        ("compensation", "dense"),
        ("compensation", None),
        ("solver", "adam"),
    ],
)
def test_config_unknown_choice(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is not one of"):
        CompressionConfig(reduction=0.3, progress=False, **{field: value})


@pytest.mark.parametrize("target", [1000.5, 1e6, "20000", True])
def test_config_target_params_not_integer(target):
    with pytest.raises(ValueError, match=r"target_params must be an integer"):
        CompressionConfig(target_params=target, progress=False)


@pytest.mark.parametrize("target", [0, -5])
def test_config_target_params_not_positive(target):
    with pytest.raises(ValueError, match=r"target_params must be positive"):
        CompressionConfig(target_params=target, progress=False)


_NUMBERS = {  # field: (its rule, values just inside it, values outside it)
    "gamma": ("be a finite number > 0", [1e-9, 80], [0, -1.0]),
    "sgd_lr": ("be a finite number > 0", [1e-9], [0.0, -1e-3]),
    "damping": ("be a finite number >= 0", [0, 1e-4], [-1e-9]),
    "refit_damping": ("be a finite number >= 0", [0.0, 1e-2], [-1e-9]),
    "asvd_alpha": ("be a finite number >= 0", [0, 2.0], [-0.5]),
    "z_fraction": ("lie in [0, 0.5)", [0.0, 0.499], [0.5, -0.01]),
    "grad_fraction": ("lie in (0, 1]", [1e-3, 1], [0.0, 1.01]),
}
_ANY_NUMBER_FIELD_REFUSES = [float("nan"), float("inf"), -float("inf"), True, "0.1", None]
_LOSS_AWARE = {"decomposition": "loss_aware", "allocation": "marginal", "compensation": "none"}


_OWNERS = {  # the choice whose own settings hold the field (the others are the config's shared fields)
    "gamma": {"allocation": "greedy"}, "asvd_alpha": {"decomposition": "asvd"},
    "sgd_lr": {"decomposition": "whitened", "compensation": "lowrank", "solver": "sgd"},
    "grad_fraction": _LOSS_AWARE, "refit_damping": _LOSS_AWARE, "z_fraction": {"compensation": "none"},
}


def _config_for(field: str, value) -> CompressionConfig:
    # each field with the choice it belongs to (z_fraction 0 needs no Z): the companions, not what is tested
    return CompressionConfig(reduction=0.3, progress=False, **_OWNERS.get(field, {}), **{field: value})


def _value(config: CompressionConfig, field: str):
    return config.resolved_settings()[field] if field in config.resolved_settings() else getattr(config, field)


@pytest.mark.parametrize("field", sorted(_NUMBERS))
def test_config_numbers_refuse_what_their_rule_excludes_and_keep_its_edges(field):
    """Every real-valued field, table-driven: its edge values pass; values past them, NaN, infinities, bools,
    strings and None get one ValueError that names the field and the rule (not a TypeError from a comparison)."""
    rule, inside, outside = _NUMBERS[field]
    for value in inside:
        assert _value(_config_for(field, value), field) == value
    for value in [*outside, *_ANY_NUMBER_FIELD_REFUSES]:
        with pytest.raises(ValueError, match=rf"^{field} must {re.escape(rule)}, got "):
            _config_for(field, value)


def test_config_z_kind_needs_a_z_budget_and_recipes_are_named():
    from lowrank_vit.config import recipe

    with pytest.raises(ValueError, match=r"compensation='lowrank' needs z_fraction > 0"):
        CompressionConfig(reduction=0.3, progress=False, compensation="lowrank", z_fraction=0.0)
    with pytest.raises(ValueError, match=r"unknown recipe 'magic'; known: loss-aware, "):
        recipe("magic", reduction=0.3)


@pytest.mark.parametrize("field", ["calib_samples", "rank_multiple"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_config_counts_not_positive_integer(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer"):
        CompressionConfig(reduction=0.3, progress=False, **{field: value})


def test_config_unknown_field_via_from_dict():
    with pytest.raises(ValueError, match=r"unknown CompressionConfig field\(s\): bogus"):
        CompressionConfig.from_dict({"reduction": 0.3, "bogus": 1})


def test_compress_unknown_override_with_config(tiny_vit, calib_batches):
    before = snapshot(tiny_vit)
    with pytest.raises(ValueError, match=r"unknown CompressionConfig field\(s\): bogus"):
        compress(tiny_vit, calib_batches, cfg(), bogus=1)
    assert_unchanged(tiny_vit, before)


def test_compress_override_validated(tiny_vit, calib_batches):
    with pytest.raises(ValueError, match=r"reduction must lie strictly between 0 and 1"):
        compress(tiny_vit, calib_batches, cfg(), reduction=1.2)


def test_compress_without_any_config(tiny_vit, calib_batches):
    with pytest.raises(ValueError, match=r"exactly one of reduction .* target_params .* target_speedup"):
        compress(tiny_vit, calib_batches)


# --------------------------------------------------------------------------------------------------------------------
# compress: impossible targets and unsupported models


@pytest.mark.parametrize("extra", [0, 1, 1_000_000])
def test_target_not_below_model_size(tiny_vit, calib_batches, extra):
    size = count_params(tiny_vit)
    before = snapshot(tiny_vit)
    with pytest.raises(ValueError, match=rf"target_params={size + extra:,} is not below the model's {size:,}"):
        compress(tiny_vit, calib_batches, cfg(target_params=size + extra))
    assert_unchanged(tiny_vit, before)


def test_target_below_rank_one_everywhere(tiny_vit, calib_batches):
    before = snapshot(tiny_vit)
    with pytest.raises(ValueError, match=r"target is unreachable: even rank 1 in every compressible layer"):
        compress(tiny_vit, calib_batches, cfg(target_params=100))
    assert_unchanged(tiny_vit, before)


def _rank_one_everywhere_total(model: nn.Module) -> int:
    """Parameter count of ``model`` with every block linear at rank 1 and no Z (compensation="none")."""
    layers = get_adapter(model).compressible_layers(model).values()
    return count_params(model) - sum(m.in_features * m.out_features - (m.in_features + m.out_features) for m in layers)


def test_target_at_and_just_below_rank_one_everywhere(calib_batches):
    smallest = _rank_one_everywhere_total(make_tiny_vit())
    with pytest.raises(ValueError, match=r"target is unreachable"):
        compress(make_tiny_vit(), calib_batches, cfg(target_params=smallest - 1, compensation="none"))
    model = make_tiny_vit()
    report = compress(model, calib_batches, cfg(target_params=smallest, compensation="none"))
    assert set(report.ranks.values()) == {1}
    assert count_params(model) == smallest


def test_reduction_too_small_to_remove_anything(tiny_vit, calib_batches):
    # round((1 - 1e-9) * n) == n: the target leaves the compressible layers as they are.
    with pytest.raises(ValueError, match=r"nothing to compress"):
        compress(tiny_vit, calib_batches, cfg(reduction=1e-9))


def test_sequential_of_linears_has_no_compressible_layer():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Sequential has no compressible layer"):
        compress(model, [torch.randn(4, 8)], cfg())
    assert_unchanged(model, before)


class TinyConvNet(nn.Module):
    """A ResNet-like conv net: a stem, a residual block, pooling and a linear head (no attn/mlp blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def test_conv_net_has_no_compressible_layer():
    model = TinyConvNet().eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"TinyConvNet has no compressible layer"):
        compress(model, [make_images(4, channels=3, size=16)], cfg())
    assert_unchanged(model, before)


def test_second_compress_of_fully_compressed_model(tiny_vit, calib_batches):
    report = compress(tiny_vit, calib_batches, cfg(reduction=0.4))
    assert all(rank is not None for rank in report.ranks.values())
    before = snapshot(tiny_vit)
    with pytest.raises(ValueError, match=r"already compressed"):
        compress(tiny_vit, calib_batches, cfg(reduction=0.3))
    after = tiny_vit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_second_compress_of_partly_compressed_model(tiny_vit, calib_batches):
    report = compress(tiny_vit, calib_batches, cfg(reduction=0.02))
    dense = [name for name, rank in report.ranks.items() if rank is None]
    assert dense and len(dense) < len(report.ranks), "precondition: the allocation left some layers dense"
    with pytest.raises(ValueError, match=r"already compressed"):
        compress(tiny_vit, calib_batches, cfg(reduction=0.1))


def test_non_finite_weights_rejected(tiny_vit, calib_batches):
    with torch.no_grad():
        tiny_vit.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer blocks\.1\.mlp\.fc1 has NaN or inf weights"):
        compress(tiny_vit, calib_batches, cfg())


# --------------------------------------------------------------------------------------------------------------------
# compress: malformed calibration data


def _nan_images(n: int = 8) -> torch.Tensor:
    images = make_images(n)
    images[n // 2, 0, 3, 4] = float("nan")
    return images


def _inf_images(n: int = 8) -> torch.Tensor:
    images = make_images(n)
    images[1, 0, 0, 0] = float("-inf")
    return images


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


def test_calibration_data_not_iterable(tiny_vit):
    with pytest.raises(TypeError, match=r"not iterable"):
        compress(tiny_vit, 42, cfg())


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


def test_failure_inside_model_forward_leaves_no_hooks(tiny_vit):
    # The second batch has the wrong channel count: the patch embedding raises inside the forward pass, after the
    # first batch was recorded by the hooks.
    before = snapshot(tiny_vit)
    with pytest.raises(RuntimeError, match=r"channels"):
        compress(tiny_vit, [make_images(8), make_images(8, channels=3)], cfg())
    assert_unchanged(tiny_vit, before)
    assert not tiny_vit.training


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


def test_overflowing_images_raise(tiny_vit):
    # Finite but huge pixels overflow to inf inside the model: caught by the activation check, not silently used.
    images = make_images(4) * 1e30
    assert torch.isfinite(images).all()
    before = snapshot(tiny_vit)
    with pytest.raises(ValueError, match=r"non-finite activations"):
        compress(tiny_vit, [images], cfg())
    assert_unchanged(tiny_vit, before)


# --------------------------------------------------------------------------------------------------------------------
# Rank-deficient Gram matrices


@pytest.mark.parametrize("decomposition", ["whitened", "mean", "plain"])
@pytest.mark.parametrize("compensation", ["none", "lowrank", "diagonal", "sparse", "structured"])
def test_single_constant_image(decomposition, compensation):
    model = make_tiny_vit()
    tokens = model.patch_embed.num_patches + 1
    assert model.embed_dim > tokens, "precondition: fewer tokens than features, so every Gram matrix is singular"
    image = torch.full((1, 1, 28, 28), 0.7)  # every patch identical
    report = compress(model, [image], cfg(decomposition=decomposition, compensation=compensation, reduction=0.4))
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert_all_finite(model, make_images(4))
    for layer in report.layers:
        for value in (layer.energy_loss, layer.output_error_lowrank, layer.output_error):
            assert math.isfinite(value), f"{layer.name}: non-finite report value"


@pytest.mark.parametrize("damping", [1e-4, 0.0])
def test_constant_zero_image_without_damping(damping):
    model = make_tiny_vit()
    compress(model, [torch.zeros(1, 1, 28, 28)], cfg(damping=damping, reduction=0.4))
    assert_all_finite(model, make_images(4))


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


def test_entirely_dead_layer_input(calib_batches):
    # Every input feature of blocks.0.attn.qkv is zero: its Gram matrix is exactly 0 (and so is its output energy).
    model = make_tiny_vit()
    with torch.no_grad():
        model.blocks[0].norm1.weight.zero_()
        model.blocks[0].norm1.bias.zero_()
    compress(model, calib_batches, cfg(reduction=0.4))
    assert_all_finite(model, make_images(8))
