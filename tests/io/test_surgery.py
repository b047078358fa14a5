"""Tests of lowrank_vit/io/surgery.py."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_vit import (
    CompressionConfig,
    LowRankZ,
    RowSparseZ,
    SparseZ,
    compress,
    count_params,
    fold_lowrank_z_,
    load_compressed,
    quantize_,
    save_compressed,
)
from lowrank_vit.nn.adapters import get_adapter
from lowrank_vit.nn.factorized import FactorizedLinear
from tests.helpers import (
    CLASSIC_METHODS,
    FIXTURES,
    PLAN,
    QKV,
    TINY_VIT,
    DenseHeadViT,
    _compressed_at,
    compressed_vit,
    edit_plan,
    loss_aware_cfg,
    make,
    make_images,
    make_tiny_vit,
    make_vssm,
    method_cfg,
    refit_cfg,
    saved_cfg,
    vssm_images,
)

FIXTURE = FIXTURES / "checkpoint_v1"


def test_a_checkpoint_of_the_flat_package_loads_and_computes_the_same_logits():
    model = load_compressed(FIXTURE)
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert len(layers) == 8 and any(layer.z is not None for layer in layers)
    with torch.no_grad():
        logits = model(make_images(4, seed=13))
    expected = load_file(str(FIXTURE / "expected_logits.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def _saved_plan(tmp_path):
    from lowrank_vit import CompressionConfig, compress, save_compressed

    model = make_tiny_vit(seed=1)
    compress(model, [make_images(16, seed=2)], CompressionConfig(reduction=0.3, calib_samples=16, progress=False))
    directory = save_compressed(model, tmp_path / "m")
    return directory, directory / "lowrank_vit.json"


@pytest.mark.usefixtures("offline")
def test_a_layer_spec_that_cannot_be_built_names_the_plan_file(tmp_path):
    """A plan whose layer spec lacks a field the layer needs: the error names the file to look at."""
    from lowrank_vit import load_compressed

    directory, plan_file = _saved_plan(tmp_path)
    plan = json.loads(plan_file.read_text())
    name = next(iter(plan["layers"]))
    del plan["layers"][name]["bias"]
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(ValueError) as info:
        load_compressed(directory)
    assert str(info.value).startswith(f"{plan_file} is malformed: layer {name}:")


@pytest.mark.usefixtures("offline")
def test_a_saved_attention_the_model_lacks_is_refused_naming_the_architecture(tmp_path):
    from lowrank_vit import load_compressed

    directory, plan_file = _saved_plan(tmp_path)
    plan = json.loads(plan_file.read_text())
    plan["attention"] = {"blocks.9.attn": {}}
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(ValueError) as info:
        load_compressed(directory)
    assert str(info.value) == (f"saved attention blocks.9.attn does not exist in {plan['architecture']}: "
                               f"mismatched model")


@pytest.mark.usefixtures("offline")
def test_the_rebuild_check_builds_the_name_it_is_given(tmp_path):
    """``check_rebuildable(model, model_name, model_kwargs)`` answers for those arguments, as save_compressed with
    them does: a distilled DeiT's name has tensors this ViT lacks (refused, named), a plain ViT name with these
    arguments rebuilds it."""
    from lowrank_vit import save_compressed
    from lowrank_vit.io.surgery import check_rebuildable

    model = _compressed_at()
    check_rebuildable(model, "vit_small_patch16_224", TINY_VIT)
    save_compressed(model, tmp_path / "ok", model_name="vit_small_patch16_224", model_kwargs=TINY_VIT)
    prefix = f"timm.create_model('deit_tiny_distilled_patch16_224', **{TINY_VIT}) does not rebuild this model"
    for check in (lambda: check_rebuildable(model, "deit_tiny_distilled_patch16_224", TINY_VIT),
                  lambda: save_compressed(model, tmp_path / "no", model_name="deit_tiny_distilled_patch16_224",
                                          model_kwargs=TINY_VIT)):
        with pytest.raises(ValueError) as info:
            check()
        assert prefix in str(info.value)


@pytest.mark.usefixtures("offline")
def test_save_compressed_says_what_to_pass_once(tmp_path):
    """A name that builds another model: the rebuild's message already says to pass model_name= and model_kwargs=,
    and is not told twice; a name timm does not know gets that remedy added."""
    from lowrank_vit import save_compressed

    model = make_tiny_vit()
    with pytest.raises(ValueError) as info:
        save_compressed(model, tmp_path / "never-written", model_name="deit_tiny_distilled_patch16_224",
                        model_kwargs=TINY_VIT)
    assert str(info.value).endswith("), so it could not be loaded again: pass model_name= and model_kwargs= that "
                                    "build it")
    with pytest.raises(ValueError) as info:
        save_compressed(model, tmp_path / "never-written", model_name="no_such_model_xyz", model_kwargs=TINY_VIT)
    assert str(info.value).startswith("save_compressed: nothing was written: cannot rebuild timm model "
                                      "'no_such_model_xyz'")
    assert str(info.value).endswith("; pass model_name= and model_kwargs= that build this model")
    assert str(info.value).count("model_kwargs=") == 1
    assert not (tmp_path / "never-written").exists()


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0), "meta"])
def test_a_saved_model_loads_onto_any_spelling_of_a_device(device, tmp_path):
    """``map_location`` as torch spells devices ("cpu:0" is ``str(torch.device("cpu", 0))``): the model loads there,
    with the weights it was saved with (it used to be called a corrupted file)."""
    from lowrank_vit.io.surgery import load_compressed, save_compressed

    model = _compressed_at()
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m", map_location=device)
    assert {p.device.type for p in loaded.parameters()} == {torch.device(device).type}
    if torch.device(device).type == "cpu":
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="device"):  # torch's own refusal of an unknown device, not "corrupted"
        load_compressed(tmp_path / "m", map_location="gpu")


@pytest.mark.usefixtures("offline")
def test_a_rebuild_with_every_tensor_that_computes_otherwise_is_refused(tmp_path):
    """A ViT built with ReLU instead of GELU: the arguments read from its modules rebuild every tensor by name and
    shape, yet another function. Saving without arguments refuses it, says why and writes nothing; with the
    arguments that build it, it saves and loads as itself."""
    model = make_tiny_vit(act_layer="relu")
    images = make_images(3, channels=1, size=28, seed=2)
    with pytest.raises(ValueError) as info:
        save_compressed(model, tmp_path / "m")
    message = str(info.value)
    assert message.startswith("save_compressed: nothing was written: timm.create_model('vit_tiny_patch16_224', ")
    assert "rebuilds every tensor of this model but computes something else (outputs up to " in message
    assert message.endswith("so it could not be loaded again as it is: pass model_name= and model_kwargs= that "
                            "build it")
    assert not (tmp_path / "m").exists()
    save_compressed(model, tmp_path / "m", model_kwargs={**TINY_VIT, "act_layer": "relu"})
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "m")(images), model(images), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("offline")
def test_the_rebuild_check_compares_the_tensors_inside_an_output_object(tmp_path, monkeypatch):
    """A model whose forward returns an object (as transformers' do): its tensors are compared, at any depth, so a
    ViT built with ReLU is still refused; an output without any tensor proves nothing and is refused too."""
    import types

    from timm.models.vision_transformer import VisionTransformer

    forward = VisionTransformer.forward
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, x: types.SimpleNamespace(
        extra={"logits": forward(self, x)}, name="out"))
    model = make_tiny_vit(act_layer="relu")
    with pytest.raises(ValueError, match=r"computes something else \(outputs up to "):
        save_compressed(model, tmp_path / "m")
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, x: types.SimpleNamespace(name="out"))
    with pytest.raises(ValueError, match=r"computes something else \(its output \(SimpleNamespace\) holds no tensor"):
        save_compressed(make_tiny_vit(), tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.usefixtures("offline")
def test_the_first_candidate_that_rebuilds_the_model_and_computes_the_same_is_saved(tmp_path, monkeypatch):
    """The adapter's candidates in order: one timm refuses, one that misses a block, one that computes otherwise,
    then the right one: the last is saved. Without it, nothing is written and the first candidate's refusal is the
    message. A model in training mode is left in it by the check (which runs it in eval mode)."""
    from lowrank_vit.nn.adapters import ModelSpec, TimmViTAdapter

    model = make_tiny_vit(act_layer="relu").train()
    right = {**TINY_VIT, "act_layer": "relu"}
    wrong = [{**right, "no_such_option": 1}, {**right, "depth": 1}, TINY_VIT]
    for candidates in (wrong, [*wrong, right]):
        specs = [ModelSpec("vit_tiny_patch16_224", kwargs) for kwargs in candidates]
        monkeypatch.setattr(TimmViTAdapter, "model_specs", lambda self, m, specs=specs: specs)
        if candidates is wrong:
            with pytest.raises(ValueError) as info:
                save_compressed(model, tmp_path / "m")
            assert str(info.value).startswith("save_compressed: nothing was written: cannot rebuild timm model "
                                              "'vit_tiny_patch16_224' with ")
            assert "no_such_option" in str(info.value) and not (tmp_path / "m").exists()
        else:
            save_compressed(model, tmp_path / "m")
    assert all(module.training for module in model.modules())
    assert json.loads((tmp_path / "m" / "lowrank_vit.json").read_text())["model_kwargs"] == right


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", ["pvt_v2_b0", "tiny_vit_5m_224"])
def test_families_whose_blocks_are_not_read_save_as_timm_builds_them_by_name(name, tmp_path):
    """PVT-v2 has a head count per stage: its first block's, read as one count for all, rebuilt every tensor and
    another attention. TinyViT's blocks have no norm1, and reading them raised. Both, built by name with their
    classes changed, save without arguments (the architecture's defaults with the classes read, kept because they
    compute the same) and load as the same function."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    save_compressed(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "m")(images), model(images), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("offline")
def test_a_model_the_plan_does_not_rebuild_shows_its_first_three_differences():
    """The refusal counts every difference and shows the first three (the message stays one readable line)."""
    from lowrank_vit.io.surgery import check_rebuildable

    model = make_tiny_vit(seed=0)
    missing = [f"missing {name}" for name in model.state_dict() if name.startswith("blocks.1.")]
    with pytest.raises(ValueError) as info:
        check_rebuildable(model, "vit_tiny_patch16_224", {**TINY_VIT, "depth": 1})
    assert len(missing) > 3
    assert f"does not rebuild this model ({len(missing)} difference(s): {', '.join(missing[:3])}), so it could " \
           f"not be loaded again" in str(info.value)


def test_saving_a_model_leaves_the_global_random_stream_alone(compressed_by_40, tmp_path):
    """save_compressed checks that the plan rebuilds the model, building the skeleton on the meta device (no memory,
    no initialization). Built for real it would draw every initial weight from torch's global generator, so a
    seeded run that saves a checkpoint midway would continue with other random numbers than one that does not (and a
    large model would cost its full memory and seconds of initialization just to be checked)."""
    torch.manual_seed(5)
    expected = torch.rand(8)
    torch.manual_seed(5)
    save_compressed(compressed_by_40, tmp_path / "saved")
    assert torch.equal(torch.rand(8), expected)


def test_loss_aware_model_save_load_round_trip(tmp_path):
    images = make_images(32, seed=2)
    model = make_tiny_vit()
    compress(model, [images], loss_aware_cfg(reduction=0.5))
    save_compressed(model, tmp_path / "m", model_name="vit_tiny_patch16_224",
                    model_kwargs=dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=10))
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:4]), model(images[:4]))


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("method,arch",
                         [(m, "vit") for m in CLASSIC_METHODS] + [("comcat", "deit"), ("comcat", "swin")])
def test_method_save_load_round_trip(method, arch, labelled, method_images, tmp_path):
    model = make(arch)
    compress(model, labelled, method_cfg(decomposition=method))
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(method_images[:4]), model(method_images[:4]))
    assert count_params(loaded) == count_params(model)


def test_refit_model_save_load_round_trip(tmp_path):
    images = make_images(32, seed=2)
    model = make_tiny_vit()
    compress(model, [images], refit_cfg(reduction=0.5))
    save_compressed(model, tmp_path / "m", model_name="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    loaded = load_compressed(tmp_path / "m")
    assert loaded.__class__ is model.__class__
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:4]), model(images[:4]))


WEIGHTS = "model.safetensors"


PLAN_KEYS = {"format", "version", "architecture", "model_kwargs", "layers", "quantization", "metadata"}


Z_TYPES = {"none": type(None), "lowrank": LowRankZ, "diagonal": SparseZ, "sparse": SparseZ, "structured": RowSparseZ}


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.eval()(images)


def assert_same_model(loaded: nn.Module, original: nn.Module, images: torch.Tensor) -> None:
    assert type(loaded) is type(original)
    assert not loaded.training
    specs = {n: m.spec() for n, m in original.named_modules() if isinstance(m, FactorizedLinear)}
    assert specs, "the original model should hold factorized layers"
    assert {n: m.spec() for n, m in loaded.named_modules() if isinstance(m, FactorizedLinear)} == specs
    for name, module in original.named_modules():
        if isinstance(module, FactorizedLinear):
            assert type(loaded.get_submodule(name).z) is type(module.z)
    ref = logits(original, images)
    out = logits(loaded, images)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), float((out - ref).abs().max())


@pytest.mark.usefixtures("one_thread_module")
def test_fold_lowrank_z_keeps_the_function_and_the_parameter_count(tmp_path):
    model = compressed_vit(compensation="lowrank")
    images = make_images(4, seed=7)
    ref, params = logits(model, images), count_params(model)
    z_ranks = {
        n: m.rank + m.z.rank
        for n, m in model.named_modules()
        if isinstance(m, FactorizedLinear) and isinstance(m.z, LowRankZ)
    }
    assert z_ranks
    assert sorted(fold_lowrank_z_(model)) == sorted(z_ranks)
    folded = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert all(folded[n].z is None and folded[n].rank == r for n, r in z_ranks.items())
    assert count_params(model) == params
    assert torch.allclose(logits(model, images), ref, atol=1e-5, rtol=0)
    save_compressed(model, tmp_path / "folded")
    assert_same_model(load_compressed(tmp_path / "folded"), model, images)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("recipe_name", ["paper", "loss-aware"])
def test_fold_keeps_the_function_of_a_model_with_non_zero_biases(recipe_name):
    """Random non-zero biases and LayerNorm affine parameters (a fresh timm model has zero biases, on which a fold
    that wrote a zero or stale bias would pass), a low-rank Z in every factorized layer, with the paper's recipe and
    with the default's bias correction (which moves the biases itself): folding keeps the logits."""
    from lowrank_vit.config import recipe
    from tests.helpers import randomize_affine_

    model = randomize_affine_(make_tiny_vit(seed=2), seed=5)
    biases = [m.bias.detach().clone() for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    assert all(float(b.abs().min()) > 0 for b in biases)
    compress(
        model,
        [(make_images(32, seed=9), torch.arange(32) % 10)],
        recipe(recipe_name, reduction=0.5, compensation="lowrank", calib_samples=32, progress=False),
    )
    images = make_images(4, seed=7)
    ref = logits(model, images)
    assert fold_lowrank_z_(model)
    assert torch.allclose(logits(model, images), ref, atol=1e-5, rtol=0)
    for module in model.modules():  # and the biases are what the function needs: zeroing them changes it
        if isinstance(module, FactorizedLinear) and module.bias is not None:
            module.bias.data.zero_()
    assert not torch.allclose(logits(model, images), ref, atol=1e-3, rtol=0)


@pytest.mark.usefixtures("one_thread_module")
def test_fold_lowrank_z_refuses_a_quantized_model():
    model = compressed_vit(compensation="lowrank")
    quantize_(model, 8)
    with pytest.raises(ValueError, match="fold first"):
        fold_lowrank_z_(model)


def tiny_swin() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=5,
    ).eval()


def tiny_distilled_deit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    # num_classes=10: with timm's 1000 classes the two heads hold most of the parameters, too many to reach -40%.
    return timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=10,
    ).eval()


@pytest.mark.usefixtures("one_thread_module")
def test_in_process_round_trip(tmp_path):
    model = compressed_vit()
    images = make_images(8, seed=5)
    before = logits(model, images)
    out = save_compressed(model, tmp_path / "saved")
    assert out == tmp_path / "saved"
    loaded = load_compressed(out)
    assert_same_model(loaded, model, images)
    assert torch.equal(logits(model, images), before), "saving must not change the model"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.usefixtures("one_thread_module")
def test_resave_of_loaded_model_is_identical(tmp_path):
    model = compressed_vit()
    save_compressed(model, tmp_path / "a")
    save_compressed(load_compressed(tmp_path / "a"), tmp_path / "b")
    assert json.loads((tmp_path / "a" / PLAN).read_text()) == json.loads((tmp_path / "b" / PLAN).read_text())
    first, second = load_file(str(tmp_path / "a" / WEIGHTS)), load_file(str(tmp_path / "b" / WEIGHTS))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("compensation", ["none", "lowrank", "diagonal", "sparse", "structured"])
def test_round_trip_every_compensation(tmp_path, compensation):
    model = compressed_vit(compensation=compensation)
    save_compressed(model, tmp_path)
    plan = json.loads((tmp_path / PLAN).read_text())
    for spec in plan["layers"].values():
        assert (spec["z"] is None) == (compensation == "none")
        if spec["z"] is not None:
            assert spec["z"]["kind"] == compensation
    loaded = load_compressed(tmp_path)
    for module in loaded.modules():
        if isinstance(module, FactorizedLinear):
            assert isinstance(module.z, Z_TYPES[compensation])
    assert_same_model(loaded, model, make_images(8, seed=5))


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize("compensation", ["lowrank", "sparse", "structured"])
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_quantized(tmp_path, compensation, bits):
    model = compressed_vit(compensation=compensation)
    record = quantize_(model, bits=bits)
    images = make_images(8, seed=5)
    before = logits(model, images)
    save_compressed(model, tmp_path)

    plan = json.loads((tmp_path / PLAN).read_text())
    assert plan["quantization"] == record
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        keys = set(f.keys())
        for name in record:
            assert name not in keys, f"{name} stored as floats although quantized"
            codes = f.get_tensor(f"{name}:codes")
            assert codes.dtype == torch.uint8
            assert int(codes.max()) <= 2**bits - 1
            assert f"{name}:scale" in keys and f"{name}:zero_point" in keys

    loaded = load_compressed(tmp_path)
    after = logits(loaded, images)
    assert torch.allclose(after, before, atol=1e-5, rtol=0), float((after - before).abs().max())
    assert loaded.lowrank_vit_quantization == record
    for name in record:
        assert torch.allclose(loaded.get_parameter(name), model.get_parameter(name), atol=1e-6, rtol=0), name


@pytest.mark.usefixtures("one_thread_module")
def test_round_trip_quantized_including_dense(tmp_path):
    model = compressed_vit()
    quantize_(model, bits=8, include_dense=True)
    assert "head.weight" in model.lowrank_vit_quantization
    images = make_images(8, seed=5)
    save_compressed(model, tmp_path)
    assert torch.allclose(logits(load_compressed(tmp_path), images), logits(model, images), atol=1e-5, rtol=0)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="tiny-28px-1ch"),
        pytest.param(
            {"img_size": 32, "patch_size": 4, "in_chans": 3, "depth": 3, "embed_dim": 24, "num_heads": 3}, id="32px-3ch"
        ),
        pytest.param({"img_size": (28, 35), "num_classes": 3}, id="non-square"),
        pytest.param({"mlp_ratio": 2.0, "qkv_bias": False}, id="mlp2-no-qkv-bias"),
        pytest.param({"class_token": False, "global_pool": "avg"}, id="no-cls-avgpool"),
        pytest.param({"reg_tokens": 2}, id="register-tokens"),
        pytest.param({"no_embed_class": True}, id="no-embed-class"),
    ],
)
def test_round_trip_custom_vit(tmp_path, overrides):
    model = make_tiny_vit(**overrides)
    in_chans = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    images = torch.nn.functional.interpolate(make_images(16, channels=in_chans), size=(height, width))
    compress(model, [images], saved_cfg())
    save_compressed(model, tmp_path)
    kwargs = json.loads((tmp_path / PLAN).read_text())["model_kwargs"]
    assert kwargs["img_size"] == [height, width]
    assert kwargs["in_chans"] == in_chans
    assert kwargs["embed_dim"] == model.embed_dim
    assert kwargs["depth"] == len(model.blocks)
    assert_same_model(load_compressed(tmp_path), model, images[:4])


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"init_values": 1e-5}, id="layerscale"),
        pytest.param({"qk_norm": True}, id="qk-norm"),
        pytest.param({"pre_norm": True}, id="pre-norm"),
        pytest.param({"fc_norm": True}, id="fc-norm"),
        pytest.param({"pos_embed": "none"}, id="no-pos-embed"),
    ],
)
def test_round_trip_vit_constructor_overrides(tmp_path, overrides):
    model = make_tiny_vit(**overrides)
    images = make_images(16)
    compress(model, [images], saved_cfg())
    save_compressed(model, tmp_path)
    assert_same_model(load_compressed(tmp_path), model, images[:4])


@pytest.mark.usefixtures("one_thread_module")
def test_round_trip_no_qkv_bias_partly_dense(tmp_path):
    model = make_tiny_vit(qkv_bias=False)
    images = make_images(32)
    report = compress(model, [images], saved_cfg(reduction=0.02))
    assert report.ranks["blocks.0.attn.qkv"] is not None, "precondition: first qkv factorized"
    assert report.ranks["blocks.1.attn.qkv"] is None, "precondition: a later qkv left dense"
    save_compressed(model, tmp_path)
    assert_same_model(load_compressed(tmp_path), model, images[:4])


@pytest.mark.usefixtures("one_thread_module")
def test_round_trip_swin(tmp_path):
    model = tiny_swin()
    images = make_images(16, channels=3, size=32)
    report = compress(model, [images], saved_cfg(reduction=0.3))
    assert any(name.startswith("layers.1.") for name, r in report.ranks.items() if r is not None)
    save_compressed(model, tmp_path)
    kwargs = json.loads((tmp_path / PLAN).read_text())["model_kwargs"]
    assert kwargs["depths"] == [1, 1] and kwargs["num_heads"] == [1, 2] and kwargs["window_size"] == 4
    assert_same_model(load_compressed(tmp_path), model, images[:4])


@pytest.mark.usefixtures("one_thread_module")
def test_round_trip_distilled_deit(tmp_path):
    model = tiny_distilled_deit()
    images = make_images(16, channels=3, size=32)
    compress(model, [images], saved_cfg(reduction=0.3))
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    assert loaded.dist_token is not None and loaded.head_dist is not None
    assert_same_model(loaded, model, images[:4])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def timm_relative(architecture: str, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(architecture, pretrained=False, num_classes=5, **kwargs).eval()


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    "architecture, kwargs",
    [  # timm relatives whose options the spec reads under other names, or not at all
        pytest.param(
            "swin_tiny_patch4_window7_224",
            dict(
                img_size=32, patch_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=((4, 4), (2, 2))
            ),
            id="swin-window-per-stage",
        ),
        pytest.param(
            "cait_xxs24_224",
            dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2),
            id="cait-class-attention-blocks",
        ),
        pytest.param(
            "vit_small_patch16_rope_224",
            dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2),
            id="eva-rope-vit",
        ),
        pytest.param("vit_tiny_r_s16_p8_224", dict(img_size=32, depth=1), id="hybrid-resnet-stem"),
    ],
)
def test_round_trip_timm_relatives(tmp_path, architecture, kwargs):
    try:
        model = timm_relative(architecture, **kwargs)
    except TypeError as exc:  # some timm releases (1.0.29) take one window size for every Swin stage; 1.0.31 takes more
        if isinstance(kwargs.get("window_size", (0,))[0], tuple):
            import timm

            pytest.skip(f"this timm ({timm.__version__}) cannot build {architecture} with {kwargs}: {exc}")
        raise
    images = make_images(8, channels=3, size=32)
    compress(model, [images], saved_cfg(reduction=0.2))
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    save_compressed(model, tmp_path)
    assert_same_model(load_compressed(tmp_path), model, images[:4])


@pytest.mark.usefixtures("one_thread_module")
def test_save_refuses_a_model_its_plan_would_not_rebuild(tmp_path):
    # One block's MLP is narrower than the others: no timm.create_model call builds that, so a saved checkpoint could
    # never be loaded. The save must say so and write nothing, whether the arguments are read or given.
    model = compressed_vit()
    block = model.blocks[1].mlp
    block.fc1, block.fc2 = nn.Linear(block.fc1.in_features, 8), nn.Linear(8, block.fc2.out_features)
    target = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match=r"nothing was written.*does not rebuild this model.*blocks\.1\.mlp\.fc1"
        r".*pass model_name= and model_kwargs=",
    ):
        save_compressed(model, target)
    with pytest.raises(
        ValueError,
        match=r"nothing was written: saved layer blocks\.0\.attn\.qkv .* mismatched model; "
        r"pass model_name= and model_kwargs=",
    ):
        save_compressed(model, target, model_name="vit_tiny_patch16_224", model_kwargs={"depth": 2})
    assert not target.exists()


@pytest.mark.usefixtures("one_thread_module")
def test_save_refuses_arguments_timm_rejects(tmp_path):
    model = compressed_vit()
    with pytest.raises(
        ValueError,
        match=r"nothing was written: cannot rebuild timm model 'vit_tiny_patch16_224'.*"
        r"no_such_option",
    ):
        save_compressed(model, tmp_path / "out", model_name="vit_tiny_patch16_224", model_kwargs={"no_such_option": 1})
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.slow
def test_round_trip_in_a_new_process(tmp_path):
    """Save here, load in a fresh interpreter (nothing shared but the files), compare the logits there written."""
    vit = compressed_vit()
    quantized = compressed_vit(seed=1, compensation="sparse")
    quantize_(quantized, bits=8)
    swin = tiny_swin()
    compress(swin, [make_images(16, channels=3, size=32)], saved_cfg(reduction=0.3))
    cases = {
        "vit": (vit, make_images(8, seed=7)),
        "quantized": (quantized, make_images(8, seed=8)),
        "swin": (swin, make_images(8, channels=3, size=32, seed=9)),
    }
    expected = {}
    for name, (model, images) in cases.items():
        save_compressed(model, tmp_path / name)
        save_file({"images": images}, str(tmp_path / f"{name}-images.safetensors"))
        expected[name] = logits(model, images)

    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path

        import torch
        from safetensors.torch import load_file, save_file

        from lowrank_vit import load_compressed

        root = Path(sys.argv[1])
        for name in sys.argv[2:]:
            model = load_compressed(root / name)
            assert not model.training
            images = load_file(str(root / f"{name}-images.safetensors"))["images"]
            with torch.no_grad():
                out = model(images)
            save_file({"logits": out.contiguous()}, str(root / f"{name}-logits.safetensors"))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), *cases],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name, ref in expected.items():
        out = load_file(str(tmp_path / f"{name}-logits.safetensors"))["logits"]
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (name, float((out - ref).abs().max()))


@pytest.mark.usefixtures("one_thread_module")
def test_directory_contents_and_plan(tmp_path):
    model = make_tiny_vit()
    report = compress(model, [make_images(32)], saved_cfg())
    save_compressed(model, tmp_path, metadata={"report": report.to_dict(), "note": "tiny"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PLAN, WEIGHTS])

    plan = json.loads((tmp_path / PLAN).read_text())
    assert set(plan) == PLAN_KEYS
    assert plan["format"] == "lowrank_vit"
    assert plan["version"] == 1
    assert plan["architecture"] == "vit_tiny_patch16_224"
    kwargs = plan["model_kwargs"]
    expected = {
        "img_size": [28, 28],
        "patch_size": 7,
        "in_chans": 1,
        "num_classes": 10,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
    }
    assert {k: kwargs.get(k) for k in expected} == expected
    factorized = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert set(plan["layers"]) == set(factorized)
    for name, spec in plan["layers"].items():
        assert set(spec) == {"in_features", "out_features", "rank", "bias", "z"}
        assert spec["rank"] == report.ranks[name] == factorized[name].rank
        assert (spec["in_features"], spec["out_features"]) == (
            factorized[name].in_features,
            factorized[name].out_features,
        )
    assert plan["quantization"] == {}
    assert plan["metadata"]["note"] == "tiny"
    assert plan["metadata"]["report"]["params_after"] == report.params_after


@pytest.mark.usefixtures("one_thread_module")
def test_weights_are_safetensors_not_pickle(tmp_path):
    model = compressed_vit(compensation="sparse")
    save_compressed(model, tmp_path)
    raw = (tmp_path / WEIGHTS).read_bytes()
    assert not raw.startswith(b"\x80"), "pickle protocol header"
    assert not raw.startswith(b"PK"), "zip archive (torch.save format)"
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "lowrank_vit"}
    state = model.state_dict()
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "lowrank_vit"}
        assert set(f.keys()) == set(state) == set(header) - {"__metadata__"}
        for key in sorted(state):
            assert torch.equal(f.get_tensor(key), state[key]), key
    # The plan is plain JSON text.
    json.loads((tmp_path / PLAN).read_text(encoding="utf-8"))


@pytest.mark.usefixtures("one_thread_module")
def test_save_leaves_other_user_files_alone(tmp_path):
    user_files = {
        "notes.txt": b"my notes\n",
        "sub/data.bin": bytes(range(256)),
        "model.safetensors.bak": b"older weights",
        ".hidden": b"x",
    }
    for rel, content in user_files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    model = compressed_vit()
    save_compressed(model, tmp_path)
    save_compressed(model, tmp_path)  # overwriting its own files is fine too
    for rel, content in user_files.items():
        assert (tmp_path / rel).read_bytes() == content, rel
    names = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert names == set(user_files) | {PLAN, WEIGHTS}, "no temporary or extra file may be left behind"
    assert_same_model(load_compressed(tmp_path), model, make_images(4))


@pytest.mark.usefixtures("one_thread_module")
def test_save_creates_nested_directory(tmp_path):
    model = compressed_vit()
    save_compressed(model, tmp_path / "a" / "b" / "c")
    assert_same_model(load_compressed(str(tmp_path / "a" / "b" / "c")), model, make_images(4))


@pytest.mark.usefixtures("one_thread_module")
def test_overwrite_with_another_model(tmp_path):
    save_compressed(compressed_vit(seed=0, reduction=0.4), tmp_path)
    second = compressed_vit(seed=1, reduction=0.6)
    save_compressed(second, tmp_path)
    assert_same_model(load_compressed(tmp_path), second, make_images(4))


@pytest.mark.usefixtures("one_thread_module")
def test_failed_save_keeps_previous_model(tmp_path):
    first = compressed_vit(seed=0, reduction=0.4)
    save_compressed(first, tmp_path)
    second = compressed_vit(seed=1, reduction=0.6)
    with pytest.raises(TypeError, match=r"not JSON serializable"):
        save_compressed(second, tmp_path, metadata={"report": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PLAN, WEIGHTS])
    assert_same_model(load_compressed(tmp_path), first, make_images(4))


@pytest.mark.usefixtures("one_thread_module")
def test_save_rejects_model_without_compressible_layers(tmp_path):
    with pytest.raises(ValueError, match=r"has no compressible layer"):
        save_compressed(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("one_thread_module")
def test_save_needs_architecture_name(tmp_path):
    model = compressed_vit()
    model.pretrained_cfg = {}
    model.default_cfg = {}
    with pytest.raises(ValueError, match=r"cannot tell which timm architecture .* pass model_name="):
        save_compressed(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("one_thread_module")
def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no saved model at .*does-not-exist"):
        load_compressed(tmp_path / "does-not-exist")


@pytest.mark.usefixtures("one_thread_module")
def test_load_path_is_a_file(saved):
    with pytest.raises(FileNotFoundError, match=r"not a directory"):
        load_compressed(saved / WEIGHTS)


@pytest.mark.usefixtures("one_thread_module")
def test_load_directory_without_plan(saved):
    (saved / PLAN).unlink()
    with pytest.raises(FileNotFoundError, match=rf"not a lowrank_vit model directory: {PLAN} is missing"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
def test_load_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{PLAN} is missing"):
        load_compressed(tmp_path)


@pytest.mark.usefixtures("one_thread_module")
def test_load_directory_without_weights(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=rf"incomplete: {WEIGHTS} is missing"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x00\x01garbage{{{", id="binary"),
        pytest.param(b'{"format": "lowrank_vit", "version": 1,', id="truncated-json"),
        pytest.param(b"", id="empty"),
        pytest.param("plan ÿ".encode("latin-1"), id="not-utf8"),
    ],
)
def test_load_corrupted_plan(saved, garbage):
    (saved / PLAN).write_bytes(garbage)
    with pytest.raises(ValueError, match=rf"{PLAN} is corrupted"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        pytest.param(lambda p: p.update(format="other"), r"not a lowrank_vit plan", id="wrong-format"),
        pytest.param(lambda p: p.pop("format"), r"not a lowrank_vit plan", id="no-format"),
        pytest.param(lambda p: p.update(version=2), r"format version 2, this library reads 1", id="future-version"),
        pytest.param(lambda p: p.pop("layers"), r"malformed: 'layers' is missing", id="no-layers"),
        pytest.param(lambda p: p.pop("model_kwargs"), r"malformed: 'model_kwargs' is missing", id="no-kwargs"),
        pytest.param(
            lambda p: p.update(architecture="no_such_vit"),
            r"cannot rebuild timm model 'no_such_vit'",
            id="unknown-architecture",
        ),
        pytest.param(lambda p: p["model_kwargs"].update(bogus_kwarg=1), r"cannot rebuild timm model", id="bad-kwarg"),
    ],
)
def test_load_invalid_plan(saved, change, pattern):
    edit_plan(saved, change)
    with pytest.raises(ValueError, match=pattern):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
def test_load_plan_that_is_a_list(saved):
    (saved / PLAN).write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"not a lowrank_vit plan"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda raw: b"this is not a safetensors file at all" * 4, id="garbage"),
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated-half"),
        pytest.param(lambda raw: raw[:-1], id="truncated-one-byte"),
        pytest.param(lambda raw: raw[:5], id="truncated-header-length"),
        pytest.param(lambda raw: raw[: 8 + int.from_bytes(raw[:8], "little")], id="header-only"),
        pytest.param(lambda raw: b"", id="empty"),
        pytest.param(lambda raw: raw[:8] + b"\x00" * 32 + raw[40:], id="garbled-header"),
    ],
)
def test_load_corrupted_weights(saved, data):
    path = saved / WEIGHTS
    path.write_bytes(data(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"{WEIGHTS} is corrupted"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
def test_load_weights_with_nan(saved):
    tensors = load_file(str(saved / WEIGHTS))
    tensors["blocks.0.attn.qkv.U"][0, 0] = float("nan")
    save_file(tensors, str(saved / WEIGHTS))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.U contains NaN or inf"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
def test_load_weights_missing_a_tensor(saved):
    tensors = load_file(str(saved / WEIGHTS))
    del tensors["blocks.1.mlp.fc2.V"]
    save_file(tensors, str(saved / WEIGHTS))
    with pytest.raises(ValueError, match=r"does not match the plan's model: missing \['blocks\.1\.mlp\.fc2\.V'\]"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        pytest.param(
            lambda p: p["layers"]["blocks.0.attn.qkv"].update(in_features=48),
            r"saved layer blocks\.0\.attn\.qkv \(48->96\) does not match .*mismatched model",
            id="in-features",
        ),
        pytest.param(
            lambda p: p["layers"]["blocks.1.mlp.fc1"].update(out_features=64),
            r"saved layer blocks\.1\.mlp\.fc1 \(32->64\) does not match .*mismatched model",
            id="out-features",
        ),
        pytest.param(
            lambda p: p["layers"].update({"blocks.7.attn.qkv": p["layers"].pop("blocks.0.attn.qkv")}),
            r"saved layer blocks\.7\.attn\.qkv does not exist in vit_tiny_patch16_224: mismatched model",
            id="nonexistent-block",
        ),
        pytest.param(
            lambda p: p["layers"].update({"blocks.0.attn.nope": p["layers"].pop("blocks.0.attn.qkv")}),
            r"saved layer blocks\.0\.attn\.nope does not exist",
            id="nonexistent-layer",
        ),
        pytest.param(
            lambda p: p["layers"].update({"blocks.0.norm1": p["layers"].pop("blocks.0.attn.qkv")}),
            r"saved layer blocks\.0\.norm1 .* does not match LayerNorm.*mismatched model",
            id="not-a-linear",
        ),
        pytest.param(
            lambda p: p["layers"]["blocks.0.attn.proj"].update(rank=1),
            r"blocks\.0\.attn\.proj\.U has shape \(32, \d+\), the model expects \(32, 1\): mismatched model",
            id="rank",
        ),
        pytest.param(
            lambda p: p["layers"]["blocks.0.attn.proj"].update(z={"kind": "magic"}),
            r"unknown compensation kind 'magic'",
            id="z-kind",
        ),
        pytest.param(
            lambda p: p["layers"]["blocks.0.attn.proj"].update(z=None),
            r"does not match the plan's model: .*unexpected \['blocks\.0\.attn\.proj\.z\.",
            id="z-dropped",
        ),
        pytest.param(
            lambda p: p["layers"].pop("blocks.1.mlp.fc2"),
            r"does not match the plan's model: missing \['blocks\.1\.mlp\.fc2\.weight'\]",
            id="layer-dropped",
        ),
        pytest.param(
            lambda p: p["model_kwargs"].update(embed_dim=48),
            r"does not match Linear\(in_features=48.*mismatched model",
            id="embed-dim",
        ),
        pytest.param(
            lambda p: p["model_kwargs"].update(depth=3),
            r"does not match the plan's model: missing \['blocks\.2\.",
            id="depth",
        ),
        pytest.param(
            lambda p: p["quantization"].update({"blocks.0.attn.qkv.U": {"bits": 8, "axis": 1}}),
            r"lacks the quantized codes of blocks\.0\.attn\.qkv\.U",
            id="quantization-record",
        ),
    ],
)
def test_load_mismatched_plan(saved, change, pattern):
    edit_plan(saved, change)
    with pytest.raises(ValueError, match=pattern):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: p["layers"]["blocks.0.attn.qkv"].pop("rank"), id="layer-spec-missing-rank"),
        pytest.param(lambda p: p.update(layers=["blocks.0.attn.qkv"]), id="layers-not-a-mapping"),
    ],
)
def test_load_malformed_layer_specs(saved, change):
    edit_plan(saved, change)
    with pytest.raises(ValueError, match=r"lowrank_vit\.json|layer"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        pytest.param(lambda p: p.update(metadata="oops"), r"'metadata' is not a dict", id="metadata-not-a-dict"),
        pytest.param(
            lambda p: p["layers"][QKV].update(rank=-5),
            rf"layer {QKV}: 'rank' must be a positive integer, not -5",
            id="negative-rank",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(rank=0),
            rf"layer {QKV}: 'rank' must be a positive integer, not 0",
            id="zero-rank",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(in_features=-32),
            rf"layer {QKV}: 'in_features' must be a positive integer, not -32",
            id="negative-in-features",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(out_features=True),
            rf"layer {QKV}: 'out_features' must be a positive integer, not True",
            id="bool-out-features",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(z={"kind": "lowrank", "rank": -1}),
            rf"layer {QKV} z: 'rank' must be a positive integer, not -1",
            id="z-negative-rank",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(z={"kind": "lowrank"}),
            rf"layer {QKV} z: 'rank' must be a positive integer, not None",
            id="z-missing-rank",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(z={"kind": "sparse", "nnz": 0}),
            rf"layer {QKV} z: 'nnz' must be a positive integer, not 0",
            id="z-zero-nnz",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(z={"kind": "structured", "rows": "3"}),
            rf"layer {QKV} z: 'rows' must be a positive integer, not '3'",
            id="z-string-rows",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(z={"rank": 1}),
            rf"layer {QKV}: unknown compensation kind None; known: lowrank, sparse, diagonal, structured",
            id="z-no-kind",
        ),
        pytest.param(
            lambda p: p["layers"][QKV].update(z=["lowrank", 1]), rf"layer {QKV} has a bad 'z' entry", id="z-not-a-dict"
        ),
        pytest.param(
            lambda p: p.update(attention={"blocks.0.attn": "separate"}),
            r"'attention' must map module names to specs",
            id="attention-spec-not-a-dict",
        ),
        pytest.param(
            lambda p: p.update(attention=["blocks.0.attn"]),
            r"'attention' must map module names to specs",
            id="attention-not-a-mapping",
        ),
    ],
)
def test_load_plan_with_bad_fields(saved, change, pattern):
    """A hand-damaged plan is refused by read_plan, naming the file, the layer and the field, before the rebuild
    (where a negative size was a bare RuntimeError from torch.zeros, and a non-dict metadata an AttributeError in
    the CLI)."""
    edit_plan(saved, change)
    with pytest.raises(ValueError, match=rf"{re.escape(str(saved / PLAN))} is malformed: {pattern}"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
def test_save_refuses_a_layer_that_would_not_load(tmp_path):
    model = make_tiny_vit()
    model.blocks[0].attn.proj = FactorizedLinear(32, 32, 0)
    with pytest.raises(
        ValueError,
        match=r"nothing was written: this model's plan is malformed: layer "
        r"blocks\.0\.attn\.proj: 'rank' must be a positive integer, not 0",
    ):
        save_compressed(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.usefixtures("one_thread_module")
def test_load_weights_of_a_different_model(tmp_path, saved):
    # Same architecture name, different embed_dim (and different ranks): every shape is wrong.
    other = make_tiny_vit(embed_dim=48, num_heads=3)
    compress(other, [make_images(32)], saved_cfg())
    save_compressed(other, tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / WEIGHTS, saved / WEIGHTS)
    with pytest.raises(ValueError, match=r"has shape .* the model expects .*: mismatched model"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
def test_load_weights_of_a_model_with_other_ranks(tmp_path, saved):
    # Same dense shapes, different allocation: the factors' shapes disagree with the plan's ranks.
    other = make_tiny_vit()
    compress(other, [make_images(32)], saved_cfg(reduction=0.6))
    save_compressed(other, tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / WEIGHTS, saved / WEIGHTS)
    with pytest.raises(ValueError, match=r"mismatched model"):
        load_compressed(saved)


@pytest.mark.usefixtures("one_thread_module")
def test_load_weights_of_a_deeper_model(tmp_path, saved):
    other = make_tiny_vit(depth=3)
    compress(other, [make_images(32)], saved_cfg())
    save_compressed(other, tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / WEIGHTS, saved / WEIGHTS)
    expected = r"does not match the plan's model: missing \[\], unexpected \['blocks\.2\."
    with pytest.raises(ValueError, match=expected) as info:
        load_compressed(saved)
    listed = ast.literal_eval(str(info.value).split("unexpected ")[1])  # the first five of block 2's many keys
    assert len(listed) == 5 and listed == sorted(listed) and all(k.startswith("blocks.2.") for k in listed)


@pytest.mark.usefixtures("one_thread_module")
def test_a_model_of_ones_own_class_saves_and_loads_into_its_dense_twin(tmp_path):
    """A wrapper (a timm backbone and a head of its own) compressed under the Bernoulli likelihood: saved with
    own_model=True, refused without the dense model to load into (one line naming its class), loaded into a fresh
    dense twin with the same outputs."""
    model, images = DenseHeadViT(as_dict=False), make_images(8)
    compress(model, [images], CompressionConfig(reduction=0.5, likelihood="bernoulli", progress=False))
    with pytest.raises(ValueError, match="own_model=True for a model of your own class"):
        save_compressed(model, tmp_path / "refused")
    save_compressed(model, tmp_path / "m", own_model=True)
    with pytest.raises(ValueError,
                       match=r"holds a model of its own class \(tests\.helpers\.DenseHeadViT\).*model=\.\.\."):
        load_compressed(tmp_path / "m")
    loaded = load_compressed(tmp_path / "m", model=DenseHeadViT(seed=5, as_dict=False))
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("recipe_name", ["paper", "loss-aware"])
def test_low_rank_and_vmeanba_together_save_load_and_export(tmp_path, recipe_name):
    pytest.importorskip("onnxruntime")
    from lowrank_vit import compress, load_compressed, save_compressed
    from lowrank_vit.config import recipe
    from lowrank_vit.io.export import export_onnx, onnx_logits
    from lowrank_vit.io.surgery import read_plan
    from lowrank_vit.methods.vmeanba import apply_vmeanba
    from lowrank_vit.nn.factorized import FactorizedLinear

    model = make_vssm(seed=4)
    x = vssm_images(20, seed=5)
    apply_vmeanba(model, [x[:9], x[9:]], num_blocks=2, timing=False, progress=False)
    compress(model, [x[:9], x[9:]], recipe(recipe_name, reduction=0.3, calib_samples=20, progress=False))
    factorized = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert any(".op." in n for n in factorized) and any(".mlp." in n for n in factorized), factorized
    save_compressed(model, tmp_path / "m")
    switched = [n for n, op in get_adapter(model).scan_modules(model).items() if op.mean_scan]
    assert read_plan(tmp_path / "m")["mean_scan"] == switched and len(switched) == 2
    loaded = load_compressed(tmp_path / "m")
    assert [n for n, op in get_adapter(loaded).scan_modules(loaded).items() if op.mean_scan] == switched
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    export_onnx(loaded, tmp_path / "m.onnx", (3, 24, 24))
    got = onnx_logits(tmp_path / "m.onnx", x)
    assert float((got - expected).norm() / expected.norm()) < 1e-4


def test_a_plan_naming_a_mean_scan_block_that_is_not_one_is_refused(tmp_path):
    import json

    from lowrank_vit import load_compressed, save_compressed
    from lowrank_vit.methods.vmeanba import apply_vmeanba

    model = make_vssm()
    apply_vmeanba(model, vssm_images(4), num_blocks=1, timing=False, progress=False)
    save_compressed(model, tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "lowrank_vit.json").read_text())
    plan["mean_scan"] = ["layers.0.blocks.0.mlp"]
    (tmp_path / "m" / "lowrank_vit.json").write_text(json.dumps(plan))
    with pytest.raises(
        ValueError,
        match=r"saved mean-scan block layers.0.blocks.0.mlp is not a selective scan in "
        r"vssm_micro: mismatched model",
    ):
        load_compressed(tmp_path / "m")
    plan["mean_scan"] = "layers.0.blocks.0.op"
    (tmp_path / "m" / "lowrank_vit.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"'mean_scan' must be a list of module names"):
        load_compressed(tmp_path / "m")
