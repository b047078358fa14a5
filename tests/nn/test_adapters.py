"""Tests of lowrank_vit/nn/adapters.py."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from lowrank_vit import compress, load_compressed, save_compressed
from lowrank_vit.config import recipe
from lowrank_vit.nn.adapters import TimmViTAdapter, get_adapter
from lowrank_vit.nn.factorized import FactorizedLinear
from tests.helpers import SMALL, assert_unchanged, build, cfg, make_images, make_vssm, qkv_biased, snapshot


@pytest.mark.parametrize("family", ["beit", "eva02-swiglu", "swinv2"])
def test_switch_keeps_the_function_and_is_reported(family):
    model, images = build(family)
    assert qkv_biased(model) and not any(m.qkv_bias_separate for m in qkv_biased(model))
    with torch.no_grad():
        before = model(images)
    switched = TimmViTAdapter().call_qkv_as_module(model)
    assert switched == qkv_biased(model) and all(m.qkv_bias_separate for m in switched)
    assert TimmViTAdapter().call_qkv_as_module(model) == []  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["beit", "eva02-swiglu", "swinv2"])
@pytest.mark.parametrize("name", ["loss-aware", "paper"])
def test_compress_factorizes_qkv_and_round_trips(family, name, tmp_path):
    model, images = build(family)
    dense = copy.deepcopy(model)
    compress(model, [images], recipe(name, reduction=0.3, calib_samples=24, progress=False))
    factorized = {n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert any(n.endswith("attn.qkv") for n in factorized), factorized
    if family == "eva02-swiglu":  # the SwiGLU's gate and value layers are compressible (the allocation decides)
        assert {n.rsplit(".", 1)[1] for n in TimmViTAdapter().compressible_layers(dense)} == {
            "qkv", "proj", "fc1_g", "fc1_x", "fc2"}
    with torch.no_grad():
        reference, out = dense(images), model(images)
        assert float((out - reference).norm() / reference.norm()) < 0.25
        attn = qkv_biased(model)[0]
        attn.q_bias.add_(1.0)  # the q bias still reaches the attention after qkv was factorized
        assert not torch.allclose(model(images), out)
        attn.q_bias.sub_(1.0)
    # saved without naming the arguments: the adapter reads BEiT's q/v biases as qkv_bias=True, its layer scale
    # (gamma_1), EVA's gated MLP with a norm inside, Swin V2's stages (each used to be refused, or rebuilt otherwise)
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), out, rtol=1e-5, atol=1e-6)


EVA_MLPS = {  # EVA's MLP options (eva02_tiny's own: a packed gated MLP, whose fc1 is twice fc2's input; no norm)
    "gated-packed": dict(swiglu_mlp=True, scale_mlp=False),
    "gated-two-layers-with-norm": dict(swiglu_mlp=True, scale_mlp=True),
    "plain-with-norm-and-layer-scale": dict(swiglu_mlp=False, scale_mlp=True, init_values=0.1),
    "plain": dict(swiglu_mlp=False, scale_mlp=False),
}


@pytest.mark.parametrize("options", sorted(EVA_MLPS))
def test_eva_mlp_options_are_read_from_its_blocks(options, tmp_path):
    """A small EVA saved without naming its arguments loads as the same function: whether its MLP is gated, holds
    a norm and has a layer scale is read from the blocks (the width from fc2 where fc1 packs gate and value)."""
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=7,
                              **EVA_MLPS[options], **SMALL).eval()
    images = make_images(4, channels=3, size=28, seed=1)
    spec = TimmViTAdapter().model_specs(model)[0]
    assert {key: spec.kwargs[key] for key in ("swiglu_mlp", "scale_mlp")} == {
        key: EVA_MLPS[options][key] for key in ("swiglu_mlp", "scale_mlp")}
    save_compressed(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "m")(images), model(images), rtol=1e-5, atol=1e-6)


RELATIVES = {  # timm families whose blocks the adapter finds by structure alone (random weights, small sizes)
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, **SMALL)),
    "clip-vit": ("vit_base_patch16_clip_224", dict(img_size=32, patch_size=8, **SMALL)),
    "relpos-vit": ("vit_relpos_small_patch16_224", dict(img_size=32, patch_size=8, **SMALL)),
    "xcit": ("xcit_tiny_12_p16_224", dict(img_size=32, patch_size=8, **SMALL)),
    "pit": ("pit_ti_224", dict(img_size=64, num_classes=5)),
    "maxvit": ("maxvit_tiny_tf_224", dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64), num_classes=5)),
    "mvitv2": ("mvitv2_tiny", dict(img_size=64, num_classes=5)),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(RELATIVES))
def test_relatives_compress_to_the_budget_and_round_trip(family, tmp_path):
    name, kwargs = RELATIVES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    images = make_images(8, channels=3, size=kwargs["img_size"], seed=1)
    report = compress(model, [images], recipe("loss-aware", reduction=0.4, calib_samples=8, progress=False))
    assert abs(report.reduction - 0.4) < 1e-3
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    save_compressed(model, tmp_path / "m", model_name=name, model_kwargs=kwargs)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "m")(images), model(images))


@pytest.mark.usefixtures("one_thread_module")
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


@pytest.mark.usefixtures("one_thread_module")
def test_conv_net_has_no_compressible_layer():
    model = TinyConvNet().eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"TinyConvNet has no compressible layer"):
        compress(model, [make_images(4, channels=3, size=16)], cfg())
    assert_unchanged(model, before)


def test_the_adapter_lists_the_scans_linears_per_block():
    model = make_vssm()
    adapter = get_adapter(model)
    blocks = adapter.layers_by_block(model)
    assert list(blocks) == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"]
    first = [name.removeprefix("layers.0.blocks.0.") for name in blocks["layers.0.blocks.0"]]
    assert first == ["op.in_proj", *[f"op.x_proj.{k}" for k in range(4)], *[f"op.dt_proj.{k}" for k in range(4)],
                     "op.out_proj", "mlp.fc1", "mlp.fc2"]
    assert list(adapter.scan_modules(model)) == [f"{b}.op" for b in blocks]
    assert adapter.attention_modules(model) == {}
    spec = adapter.model_specs(model)[0]
    rebuilt = adapter.build(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
