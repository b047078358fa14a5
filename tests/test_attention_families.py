"""timm's BEiT, EVA-02 and Swin V2: attention that adds its q and v biases inside ``F.linear(x, qkv.weight, bias)``
(reading the weight directly, past the module), and EVA-02's SwiGLU MLP (``fc1_g``, ``fc1_x``). The adapter switches
such attention to its ``qkv_bias_separate`` path (qkv called as a module, biases added after it: the same function),
so qkv can be calibrated and factorized, and the loss-aware pass, whose backward hooks autograd refuses on an output
changed in place, sees that change in one forward first and takes output-gradient hooks that give the same
statistics."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from lowrank_vit import compress, load_compressed, save_compressed
from lowrank_vit.config import recipe
from lowrank_vit.core.loss_aware import collect_loss_statistics
from lowrank_vit.nn.adapters import TimmViTAdapter
from lowrank_vit.nn.factorized import FactorizedLinear
from lowrank_vit.pipeline import plan_compression

from conftest import make_images

SMALL = dict(depth=2, embed_dim=32, num_heads=2, num_classes=5)
FAMILIES = {
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, **SMALL)),
    "eva02-swiglu": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, swiglu_mlp=True, scale_mlp=True,
                                                          **SMALL)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=4, embed_dim=16, depths=(1, 1),
                                               num_heads=(1, 2), window_size=4, num_classes=5)),
}


def build(family: str) -> tuple[nn.Module, torch.Tensor]:
    """A small model of the family with random weights, as trained ones are: timm starts Swin V2's post-norms and
    the q/v biases at zero, which would hide both the blocks and the biases."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        model.get_classifier().weight.normal_(0.0, 0.5)  # timm starts some heads near zero: no loss gradient then
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(("q_bias", "v_bias")):  # norm scales near 1, shifts near 0
                p.copy_(torch.randn_like(p) * 0.2 + float("norm" in pname and pname.endswith("weight")))
    size = kwargs["img_size"]
    return model, make_images(24, channels=3, size=size, seed=1)


def qkv_biased(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "q_bias", None) is not None]


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
    name_, kwargs = FAMILIES[family]
    save_compressed(model, tmp_path / "m", model_name=name_, model_kwargs=kwargs)
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), out)


def test_plan_leaves_the_model_as_it_was():
    model, images = build("beit")
    plan = plan_compression(model, [images], recipe("loss-aware", reduction=0.3, calib_samples=24, progress=False))
    assert plan.ranks and not any(m.qkv_bias_separate for m in qkv_biased(model))


def test_loss_statistics_without_backward_hooks_are_the_same():
    """BEiT's in-place bias add makes the pass fall back to output-gradient hooks; the same model with the q/v
    biases folded into a biased qkv layer (no in-place change, so backward hooks) gives the same statistics."""
    model, images = build("beit")
    TimmViTAdapter().call_qkv_as_module(model)
    folded = copy.deepcopy(model)
    for attn in qkv_biased(folded):
        qkv = nn.Linear(attn.qkv.in_features, attn.qkv.out_features, bias=True)
        with torch.no_grad():
            qkv.weight.copy_(attn.qkv.weight)
            qkv.bias.copy_(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        attn.qkv, attn.q_bias, attn.v_bias = qkv, None, None
    stats = {}
    for key, net in (("fallback", model), ("hooks", folded)):
        layers = TimmViTAdapter().compressible_layers(net)
        stats[key] = collect_loss_statistics(net, layers, [images], 24, progress=False, gram_space="auto",
                                             micro_batch=8)
    assert stats["fallback"].keys() == stats["hooks"].keys()
    widening = [n for n in stats["hooks"] if stats["hooks"][n].grad_range_gram is not None]
    assert any(n.endswith("attn.qkv") for n in widening)  # the layers whose G the backward hooks form
    for name, ours in stats["fallback"].items():
        theirs = stats["hooks"][name]
        for field in ("gram", "grad_gram", "grad_range_gram", "output_gram"):
            a, b = getattr(ours, field), getattr(theirs, field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9 * float(b.abs().max()), msg=(name, field))
        for field in ("grad_trace", "loss_scale", "input_trace"):
            a, b = getattr(ours, field), getattr(theirs, field)
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-6, abs=0)), (name, field)


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
