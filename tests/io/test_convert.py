"""Tests of lowrank_vit/io/convert.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from lowrank_vit.io.checkpoints import read_state_dict
from lowrank_vit.io.convert import ConversionError, checkpoint_kwargs, detect_layout, merge_kwargs, to_timm
from lowrank_vit.repro.models import build_model, load_checkpoint_
from lowrank_vit.repro.registry import ModelConfig
from tests.helpers import (
    TINY,
    _hf,
    _perturbed,
    cli,
    one_line_error,
)


@pytest.mark.usefixtures("offline")
def test_a_clip_vision_tower_converts_into_a_plain_vit_name(tmp_path):
    """A CLIP vision tower has a LayerNorm before its blocks; built as a plain ViT name (which has none by
    default) the conversion must say so (``pre_norm``), or the model would compute something else."""
    transformers = pytest.importorskip("transformers")
    import timm

    from lowrank_vit.io.checkpoints import read_state_dict
    from lowrank_vit.io.convert import to_timm

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    source = transformers.CLIPVisionModel(config).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))  # LayerNorms away from the identity: pre_norm must matter
    source.save_pretrained(tmp_path)
    converted = to_timm(read_state_dict(tmp_path / "model.safetensors")[0],
                        json.loads((tmp_path / "config.json").read_text()))
    assert converted.inferred_kwargs["pre_norm"] is True
    kwargs = {k: v for k, v in converted.inferred_kwargs.items() if k != "num_classes"}
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kwargs).eval()
    model.load_state_dict({k: v for k, v in converted.state_dict.items() if not k.startswith("head.")})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        # within the LayerNorm eps difference the conversion notes (CLIP's 1e-5, the timm name's 1e-6); without
        # pre_norm the difference is of the order of the logits themselves
        assert float((model(x) - source(pixel_values=x).pooler_output).abs().max()) < 2e-3


@pytest.mark.usefixtures("offline")
def test_the_config_beside_a_whole_clip_checkpoint_is_read(tmp_path):
    """A whole CLIP model's config.json keeps the tower's sizes under ``vision_config``: still a transformers
    config (so the heads need not be given), read whole."""
    from lowrank_vit.io.convert import read_transformers_config

    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"num_attention_heads": 2},
                                                      "text_config": {}}))
    assert read_transformers_config(tmp_path / "model.safetensors")["vision_config"]["num_attention_heads"] == 2
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ResNet"]}))
    assert read_transformers_config(tmp_path / "model.safetensors") is None


@pytest.mark.usefixtures("offline")
def test_a_source_layer_norm_eps_of_timms_own_value_needs_no_note():
    """Only a LayerNorm eps other than timm's 1e-6 is worth a note (transformers' ViT 1e-12, CLIP 1e-5)."""
    from lowrank_vit.io.convert import _config_kwargs

    for eps, noted in ((1e-6, False), (1e-12, True), (1e-5, True)):
        _, notes = _config_kwargs({"num_attention_heads": 2, "layer_norm_eps": eps})
        assert any("eps" in note for note in notes) is noted, (eps, notes)


@pytest.mark.usefixtures("offline")
def test_a_long_list_of_dropped_tensors_ends_with_dots():
    """The note names three dropped tensors, and says ``...`` when there were more (4 here), not when there were
    three."""
    from lowrank_vit.io.convert import Layout, rename

    layout = Layout(requires=(), renames=(), drops=(r"pooler\..*",))
    four = {f"pooler.{c}": torch.zeros(1) for c in "dcba"}
    _, notes = rename({**four, "kept": torch.zeros(1)}, layout)
    assert notes == ["dropped 4 tensors timm's ViT has no place for (pooler.a, pooler.b, pooler.c ...)"]
    _, notes = rename({k: v for k, v in four.items() if k != "pooler.d"}, layout)
    assert notes == ["dropped 3 tensors timm's ViT has no place for (pooler.a, pooler.b, pooler.c)"]


@pytest.mark.usefixtures("offline")
def test_a_non_square_patch_is_inferred_as_its_two_sides():
    """A (dim, channels, 16, 8) patch kernel: patch_size [16, 8], as timm's constructor takes it (a square grid
    of position embeddings says nothing of the image size then)."""
    from lowrank_vit.io.convert import infer_kwargs

    kwargs = infer_kwargs({"patch_embed.proj.weight": torch.zeros(24, 3, 16, 8), "cls_token": torch.zeros(1, 1, 24),
                           "pos_embed": torch.zeros(1, 17, 24)})
    assert kwargs["patch_size"] == [16, 8] and kwargs["embed_dim"] == 24 and kwargs["in_chans"] == 3
    assert "img_size" not in kwargs
    assert infer_kwargs({"patch_embed.proj.weight": torch.zeros(24, 3, 8, 8)})["patch_size"] == 8


@pytest.mark.usefixtures("offline")
def test_a_clip_tower_without_its_config_asks_for_its_activation():
    """OpenAI's CLIP uses quick_gelu, which no tensor shows: without config.json the user is asked for it (with a
    ready --model-kwargs), and giving it (any value) is enough."""
    transformers = pytest.importorskip("transformers")
    from lowrank_vit.io.convert import ConversionError, merge_kwargs, to_timm

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    converted = to_timm(transformers.CLIPVisionModel(config).state_dict())
    assert converted.layout == "hf-clip-vision"
    with pytest.raises(ConversionError) as info:
        merge_kwargs(converted, {"num_heads": 2})
    assert str(info.value) == ("the hf-clip-vision checkpoint does not say its act_layer (no transformers config.json "
                               "beside it): give --model-kwargs '{\"act_layer\": \"quick_gelu\"}'")
    assert merge_kwargs(converted, {"num_heads": 2, "act_layer": "gelu"})["act_layer"] == "gelu"


def _hf_vit(tmp_path: Path, **config):
    """A tiny transformers ViTModel, its weights moved off their initialization, saved with its config.json."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    source = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, patch_size=8, **config),
                                   add_pooling_layer=False)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.3 * torch.randn_like(p))
    source.eval().save_pretrained(tmp_path)
    return source


def _converted_features(tmp_path: Path, x: torch.Tensor):
    """The checkpoint converted into timm's ViT with the inferred arguments, and its class-token features on x."""
    import timm

    from lowrank_vit.io.checkpoints import read_state_dict
    from lowrank_vit.io.convert import merge_kwargs, to_timm
    from lowrank_vit.repro.models import load_checkpoint_

    path = tmp_path / "model.safetensors"
    converted = to_timm(read_state_dict(path)[0], json.loads((tmp_path / "config.json").read_text()))
    kwargs = merge_kwargs(converted, {})
    model = load_checkpoint_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs), path).eval()
    with torch.no_grad():
        return kwargs, model(x)


@pytest.mark.usefixtures("offline")
def test_a_non_square_image_size_not_a_multiple_of_the_patch_converts(tmp_path):
    """config.json's image_size [32, 52] with 8-pixel patches: 4 x 6 patches (both libraries floor), kept as the
    timm model's img_size, and the converted model computes the source's features."""
    source = _hf_vit(tmp_path, image_size=[32, 52])
    x = torch.randn(2, 3, 32, 52, generator=torch.Generator().manual_seed(7))
    kwargs, features = _converted_features(tmp_path, x)
    assert kwargs["img_size"] == [32, 52]
    with torch.no_grad():
        expected = source(pixel_values=x).last_hidden_state[:, 0]
    assert float((features - expected).abs().max()) < 1e-4  # LayerNorm eps 1e-12 there, 1e-6 here


@pytest.mark.usefixtures("offline")
def test_an_activation_timm_knows_by_the_same_name_is_carried_over(tmp_path):
    """hidden_act "mish" (in neither library's GELU family): timm's act_layer "mish", and the converted model
    computes the source's features (GELU in its place would not)."""
    source = _hf_vit(tmp_path, image_size=32, hidden_act="mish")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    kwargs, features = _converted_features(tmp_path, x)
    assert kwargs["act_layer"] == "mish"
    with torch.no_grad():
        expected = source(pixel_values=x).last_hidden_state[:, 0]
    assert float((features - expected).abs().max()) < 1e-4


@pytest.mark.usefixtures("offline")
def test_an_image_size_that_does_not_fit_the_position_embeddings_is_refused_in_whole_patches():
    from lowrank_vit.io.convert import ConversionError, infer_kwargs

    tensors = {"patch_embed.proj.weight": torch.zeros(24, 3, 8, 8), "cls_token": torch.zeros(1, 1, 24),
               "pos_embed": torch.zeros(1, 1 + 24, 24)}
    assert infer_kwargs(tensors, [32, 55])["img_size"] == [32, 55]  # 4 x 6 patches, the last 7 pixels unused
    with pytest.raises(ConversionError) as info:
        infer_kwargs(tensors, [40, 55])
    assert str(info.value) == ("config.json's image_size [40, 55] and patch size 8 make 30 patches, the position "
                               "embeddings 24")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("content", [None, b"not a checkpoint"])
def test_a_checkpoint_that_cannot_be_read_is_taken_as_timms_layout(tmp_path, content):
    """``checkpoint_kwargs``: a file it cannot read (missing, or not a checkpoint) is given the user's arguments
    as they are, layout "timm" (loading it then names the problem)."""
    from lowrank_vit.io.convert import checkpoint_kwargs

    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    user = {"num_heads": 3}
    kwargs, layout = checkpoint_kwargs(path, user)
    assert (kwargs, layout) == ({"num_heads": 3}, "timm") and kwargs is not user


@pytest.mark.usefixtures("offline")
def test_a_deit_with_one_classifier_converts_with_the_note_of_what_its_second_token_became():
    from lowrank_vit.io.convert import distillation_token

    tensors = {"cls_token": torch.zeros(1, 1, 8), "dist_token": torch.ones(1, 1, 8), "head.weight": torch.zeros(3, 8)}
    out, notes = distillation_token(tensors)
    assert notes == ["one classifier on the class token: a plain ViT name, the distillation token a register token"]
    assert torch.equal(out["reg_token"], tensors["dist_token"]) and "dist_token" not in out


@pytest.mark.usefixtures("offline")
def test_transformers_activation_names_become_timms():
    from lowrank_vit.io.convert import _config_kwargs

    for hidden_act, act_layer in (("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("silu", "silu")):
        kwargs, _ = _config_kwargs({"num_attention_heads": 3, "hidden_act": hidden_act})
        assert kwargs["act_layer"] == act_layer, hidden_act
    kwargs, _ = _config_kwargs({"num_attention_heads": 3, "hidden_act": "gelu"})
    assert "act_layer" not in kwargs  # exact GELU: timm's own default


@pytest.mark.usefixtures("offline")
def test_tensors_without_a_patch_embedding_are_refused_in_words():
    from lowrank_vit.io.convert import ConversionError, infer_kwargs

    with pytest.raises(ConversionError) as info:
        infer_kwargs({"blocks.0.attn.qkv.weight": torch.zeros(6, 2)})
    assert str(info.value) == "no patch embedding (patch_embed.proj.weight, 4-D) after conversion"


def _hf_vit_tensors():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=24,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, num_labels=3)
    return transformers.ViTForImageClassification(config).state_dict(), config.to_dict()


@pytest.mark.usefixtures("offline")
def test_a_config_image_size_the_position_embeddings_contradict_is_refused():
    """32x32 images in 8x8 patches: 16 position embeddings; a config saying 48 (36 patches) is refused."""
    from lowrank_vit.io.convert import ConversionError, to_timm

    tensors, config = _hf_vit_tensors()
    assert to_timm(tensors, config).inferred_kwargs["img_size"] == 32
    with pytest.raises(ConversionError) as info:
        to_timm(tensors, {**config, "image_size": 48})
    assert str(info.value) == ("config.json's image_size 48 and patch size 8 make 36 patches, the position "
                               "embeddings 16")


@pytest.mark.usefixtures("offline")
def test_user_kwargs_agree_with_inferred_ones_by_what_timm_builds():
    """A patch size given as 16 or (16, 16) is the same; an MLP ratio is the same when timm builds as many units from
    it (int(embed_dim * ratio)), and a ratio of 2 is not one of 4."""
    from lowrank_vit.io.convert import _same

    assert _same("patch_size", 16, [16, 16], {}) and _same("img_size", [32, 32], 32, {})
    assert not _same("patch_size", 16, [16, 8], {})
    assert _same("mlp_ratio", 4, 4.000000001, {"embed_dim": 48})
    assert not _same("mlp_ratio", 2, 4.0, {"embed_dim": 48})


TOLERANCE = 1e-4
"""Largest |logit difference| allowed, source model against the converted timm model (logits of magnitude ~1-10).
Measured (float32, CPU, logits up to ~7): torchvision 0 (bit-identical), CLIP into timm's CLIP name 0, transformers
ViT 1.8e-5, ViTModel features 1.2e-5, DeiT 1.2e-5 (two heads) and 2.6e-5 (one head): all of it LayerNorm's eps, 1e-12
there and 1e-6 in timm (0 with the source's eps set on timm's LayerNorms)."""


def _torchvision(seed: int = 0, num_classes: int = 5) -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return _perturbed(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48,
                                        mlp_dim=96, num_classes=num_classes), seed)


def _source_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x) if isinstance(model, torch.nn.Module) and not hasattr(model, "config") else \
            model(pixel_values=x)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if model.config.model_type == "clip_vision_model":
        return out.pooler_output  # CLIP: post-LayerNorm class token
    return out.last_hidden_state[:, 0]  # ViTModel: the final LayerNorm's class token, timm's pre-logits


def _timm_model(path: Path, name: str, user: dict | None = None) -> torch.nn.Module:
    tensors, _ = read_state_dict(path)
    config = json.loads((path.parent / "config.json").read_text()) if (path.parent / "config.json").is_file() else None
    kwargs = merge_kwargs(to_timm(tensors, config), user or {})
    return load_checkpoint_(timm.create_model(name, pretrained=False, **kwargs), path).eval()


def _max_diff(source: torch.nn.Module, model: torch.nn.Module) -> float:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    expected = _source_logits(source, x)
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape
    return float((got - expected).abs().max())


@pytest.mark.parametrize("legacy_names", [False, True])
def test_a_torchvision_vit_gives_its_own_logits_in_timm(tmp_path, legacy_names):
    source = _torchvision()
    state = source.state_dict()
    if legacy_names:  # torchvision before 0.13 named the MLP's layers linear_1 and linear_2
        state = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in state.items()}
    torch.save({"model": state, "epoch": torch.tensor(3)}, tmp_path / "vit.pth")
    tensors, _ = read_state_dict(tmp_path / "vit.pth")
    converted = to_timm(tensors)
    assert converted.layout == "torchvision-vit" and converted.required == {"num_heads": "N"}
    assert converted.inferred_kwargs == {"patch_size": 8, "in_chans": 3, "embed_dim": 48, "depth": 2,
                                         "mlp_ratio": 2.0, "qkv_bias": True, "class_token": True, "num_classes": 5,
                                         "img_size": 32}
    assert converted.notes == []  # torchvision's LayerNorm eps is timm's (1e-6): nothing to say
    model = _timm_model(tmp_path / "vit.pth", "vit_tiny_patch16_224", {"num_heads": 3})
    assert _max_diff(source, model) < TOLERANCE


@pytest.mark.parametrize("kind, layout, name, save", [
    ("vit", "hf-vit", "vit_tiny_patch16_224", "pretrained"),
    ("vit", "hf-vit", "vit_tiny_patch16_224", "state_dict"),  # the module's own key names (transformers 5 renames)
    ("vit-model", "hf-vit", "vit_tiny_patch16_224", "pretrained"),  # no head: features, the pooler dropped
    ("deit-teacher", "hf-deit", "deit_tiny_distilled_patch16_224", "pretrained"),  # two heads: timm's distilled
    ("deit", "hf-deit", "deit_tiny_patch16_224", "pretrained"),  # one head: the distillation token a register token
    ("deit-model", "hf-deit", "deit_tiny_patch16_224", "pretrained"),  # no head: the class token's features
    ("clip", "hf-clip-vision", "vit_base_patch16_clip_224", "pretrained"),
])
def test_a_transformers_vit_gives_its_own_logits_in_timm(tmp_path, kind, layout, name, save):
    source = _hf(kind)
    source.save_pretrained(tmp_path)  # model.safetensors and config.json
    path = tmp_path / "model.safetensors"
    if save == "state_dict":
        path = tmp_path / "weights.pth"
        torch.save(source.state_dict(), path)
    converted = to_timm(read_state_dict(path)[0], json.loads((tmp_path / "config.json").read_text()))
    assert converted.layout == layout
    assert converted.inferred_kwargs["num_heads"] == 3 and not converted.required
    model = _timm_model(path, name)
    assert _max_diff(source, model) < TOLERANCE


def test_a_whole_clip_model_gives_its_vision_tower(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    torch.manual_seed(0)
    source = _perturbed(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=TINY,
                                                                       projection_dim=8)), 0)
    source.save_pretrained(tmp_path)  # vision_model.*, text_model.*, projections; config.json's vision_config
    converted = to_timm(read_state_dict(tmp_path / "model.safetensors")[0],
                        json.loads((tmp_path / "config.json").read_text()))
    assert converted.inferred_kwargs["act_layer"] == "quick_gelu" and "dropped" in converted.notes[0]
    model = _timm_model(tmp_path / "model.safetensors", "vit_base_patch16_clip_224")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert float((model(x) - source.vision_model(pixel_values=x).pooler_output).abs().max()) < TOLERANCE


def test_the_layout_is_told_by_the_keys():
    assert detect_layout(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).state_dict()) == "timm"
    assert detect_layout(_torchvision().state_dict()) == "torchvision-vit"
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(**TINY)
    assert detect_layout(transformers.ViTModel(config).state_dict()) == "hf-vit"
    deit = transformers.DeiTModel(transformers.DeiTConfig(**TINY)).state_dict()
    assert detect_layout(deit) == "hf-deit"
    for kind, layout in (("dinov2", "hf-dinov2"), ("dinov2-registers", "hf-dinov2-registers"),
                         ("dinov2-classifier", "hf-dinov2"), ("siglip", "hf-siglip-vision"),
                         ("siglip-classifier", "hf-siglip-vision")):
        assert detect_layout(_hf_new(kind).state_dict()) == layout, kind  # not hf-vit's, not CLIP's


def _predicted_folder(tmp_path: Path, source: torch.nn.Module) -> Path:
    """Images filed under the class the source model predicts (clearly: top-2 margin over 0.01), four a class: the
    CLI's top-1 is then 100% exactly when the converted model predicts as the source does."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # vit_tiny's timm mean and std
    logits = _source_logits(source, x)
    top = logits.topk(2, dim=1)
    folder = tmp_path / "imgs"
    for c in range(5):
        chosen = [i for i in range(len(images)) if int(top.indices[i, 0]) == c
                  and float(top.values[i, 0] - top.values[i, 1]) > 0.01][:4]
        assert chosen, f"no image the source model files under class {c}"
        (folder / f"c{c}").mkdir(parents=True)
        for i in chosen:
            Image.fromarray(images[i]).save(folder / f"c{c}" / f"{i}.png")
    return folder


@pytest.mark.parametrize("library", ["torchvision", "transformers", "siglip"])
def test_the_cli_evaluates_a_foreign_checkpoint_as_its_source_predicts(tmp_path, capsys, library):
    name = "vit_tiny_patch16_224"
    if library == "torchvision":
        source, path, extra = _torchvision(seed=3), tmp_path / "w" / "vit.pth", ["--model-kwargs", '{"num_heads": 3}']
        path.parent.mkdir()
        torch.save(source.state_dict(), path)
    else:  # SiglipForImageClassification: the tokens' mean, global_pool "avg" and fc_norm False inferred
        if library == "transformers":
            source = _hf("vit", seed=3)
        else:  # seed 7: at least 9 of the 256 images clearly in each class
            source, name = _hf_new("siglip-classifier", seed=7, image_size=32), "vit_base_patch16_siglip_224"
        path, extra = tmp_path / "w" / "model.safetensors", []
        source.save_pretrained(path.parent)  # num_heads from its config.json
    folder = _predicted_folder(tmp_path, source)
    code, out, err = cli(capsys, "evaluate", name, "--checkpoint", str(path), *extra,
                         "--preprocessing", "timm", "--crop-pct", "1", "--data", str(folder), "--workers", "0",
                         "--json", "--quiet", "--latency-batches")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == f"timm {name}, your checkpoint"
    assert result["top1"] == 100.0 and result["classes"] == 5


def test_the_cli_asks_for_num_heads_when_nothing_says_it(tmp_path, capsys):
    torch.save(_torchvision().state_dict(), tmp_path / "vit.pth")
    code, _, err = cli(capsys, "evaluate", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "vit.pth"),
                       "--preprocessing", "timm", "--data", str(tmp_path), "--json", "--quiet")
    line = one_line_error(err)
    assert code == 2
    assert "torchvision-vit checkpoint does not say its num_heads" in line
    assert """--model-kwargs '{"num_heads": N}'""" in line


def test_the_cli_refuses_model_kwargs_the_shapes_contradict(tmp_path, capsys):
    torch.save(_torchvision().state_dict(), tmp_path / "vit.pth")
    code, _, err = cli(capsys, "evaluate", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "vit.pth"),
                       "--model-kwargs", '{"num_heads": 3, "embed_dim": 192}', "--preprocessing", "timm",
                       "--data", str(tmp_path), "--json", "--quiet")
    line = one_line_error(err)
    assert code == 2
    assert "embed_dim=192 contradicts" in line and "fix embed_dim=48" in line


def test_user_kwargs_win_where_the_shapes_say_nothing_and_agreeing_ones_pass():
    converted = to_timm(_torchvision().state_dict())
    merged = merge_kwargs(converted, {"num_heads": 6, "img_size": [32, 32], "mlp_ratio": 2, "global_pool": "avg"})
    assert merged["num_heads"] == 6 and merged["img_size"] == [32, 32] and merged["global_pool"] == "avg"
    with pytest.raises(ConversionError, match="num_classes=10 contradicts"):
        merge_kwargs(converted, {"num_heads": 3, "num_classes": 10})


def test_a_timm_checkpoint_is_left_alone(tmp_path):
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).state_dict()
    torch.save(state, tmp_path / "w.pth")
    assert checkpoint_kwargs(tmp_path / "w.pth", {"depth": 1}) == ({"depth": 1}, "timm")
    assert to_timm(state).state_dict is state


NEW_TOLERANCE = 1e-5
"""rtol and atol, transformers' outputs against the converted timm model's (features of magnitude ~3-5). Measured
(float32, CPU, transformers 5.24, timm 1.0.31): DINOv2 with and without registers, last_hidden_state and
pooler_output 0 (bit-identical: the same LayerNorm eps, 1e-6, and the same operations), with the SwiGLU MLP 2.4e-7
and 6e-8; SigLIP last_hidden_state 0, pooler_output 2.4e-6 (2.3e-6 for a whole SiglipModel's tower; the
attention-pooling head: nn.MultiheadAttention there, scaled_dot_product_attention in timm);
SiglipForImageClassification's logits 0; at other input sizes (dynamic_img_size) Dinov2WithRegistersModel 0."""


_NEW_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def _hf_new(kind: str, seed: int = 0, image_size: int = 28) -> torch.nn.Module:
    """A tiny random transformers DINOv2 or SigLIP model, every parameter moved off its initialization."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if kind.startswith("dinov2"):
        dinov2 = dict(_NEW_TINY, image_size=image_size, patch_size=14 if image_size % 14 == 0 else 8, mlp_ratio=2)
        if kind == "dinov2-registers":
            if not hasattr(transformers, "Dinov2WithRegistersModel"):
                pytest.skip("transformers without Dinov2WithRegistersModel")
            model = transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(**dinov2, num_register_tokens=3))
        elif kind == "dinov2-classifier":
            model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**dinov2, num_labels=3))
        else:
            model = transformers.Dinov2Model(transformers.Dinov2Config(**dinov2,
                                                                       use_swiglu_ffn=kind == "dinov2-swiglu"))
        return _perturbed(model, seed)
    if not hasattr(transformers, "SiglipVisionModel"):
        pytest.skip("transformers without SigLIP (4.37 and later have it)")
    vision = dict(_NEW_TINY, image_size=image_size, patch_size=7 if image_size % 7 == 0 else 8, intermediate_size=64)
    if kind == "siglip-classifier":
        text = dict(_NEW_TINY, intermediate_size=64, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        config = transformers.SiglipConfig(vision_config=vision, text_config=text, num_labels=5)
        return _perturbed(transformers.SiglipForImageClassification(config), seed)
    return _perturbed(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)), seed)


def _same_outputs(source: torch.nn.Module, model: torch.nn.Module, size: int = 28) -> dict[str, float]:
    """last_hidden_state against timm's forward_features, pooler_output against its pooled pre-logits
    (``forward_head(pre_logits=True)``: the final-normed class token for DINOv2, the attention pool for SigLIP),
    asserted within NEW_TOLERANCE; the largest differences returned."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = source(pixel_values=x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(features, expected.last_hidden_state, rtol=NEW_TOLERANCE, atol=NEW_TOLERANCE)
    torch.testing.assert_close(pooled, expected.pooler_output, rtol=NEW_TOLERANCE, atol=NEW_TOLERANCE)
    return {"features": float((features - expected.last_hidden_state).abs().max()),
            "pooled": float((pooled - expected.pooler_output).abs().max())}


@pytest.mark.parametrize("kind, layout, name, save", [
    ("dinov2", "hf-dinov2", "vit_small_patch14_dinov2", "pretrained"),
    ("dinov2", "hf-dinov2", "vit_small_patch14_reg4_dinov2", "state_dict"),  # the name's registers overridden
    ("dinov2-swiglu", "hf-dinov2", "vit_giant_patch14_dinov2", "pretrained"),  # weights_in, weights_out
    ("dinov2-swiglu", "hf-dinov2", "vit_giant_patch14_dinov2", "state_dict"),  # v5: gate_proj, up_proj, down_proj
    ("dinov2-registers", "hf-dinov2-registers", "vit_small_patch14_reg4_dinov2", "pretrained"),
    ("dinov2-registers", "hf-dinov2-registers", "vit_small_patch14_dinov2", "state_dict"),
    ("siglip", "hf-siglip-vision", "vit_base_patch16_siglip_224", "pretrained"),
    ("siglip", "hf-siglip-vision", "vit_base_patch16_224", "state_dict"),  # a plain name: map pooling inferred
])
def test_a_dinov2_or_siglip_model_gives_its_own_features_in_timm(tmp_path, kind, layout, name, save):
    source = _hf_new(kind)
    source.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    if save == "state_dict":  # transformers 5's module names (q_proj, gate_proj...), not its file's
        path = tmp_path / "weights.pth"
        torch.save(source.state_dict(), path)
    converted = to_timm(read_state_dict(path)[0], json.loads((tmp_path / "config.json").read_text()))
    assert converted.layout == layout and not converted.required
    kwargs = converted.inferred_kwargs
    assert kwargs["num_heads"] == 2 and kwargs["embed_dim"] == 32 and kwargs["depth"] == 2 and kwargs["img_size"] == 28
    if kind.startswith("dinov2"):
        assert kwargs["init_values"] and kwargs["class_token"] and "mask_token" in converted.notes[0]
        registers = 3 if kind == "dinov2-registers" else 0
        assert (kwargs["reg_tokens"], kwargs["no_embed_class"]) == (registers, bool(registers))
        assert kwargs.get("act_layer") == ("silu" if kind == "dinov2-swiglu" else None)
    else:
        assert (kwargs["class_token"], kwargs["global_pool"], kwargs["act_layer"]) == (False, "map", "gelu_tanh")
    model = _timm_model(path, name)
    _same_outputs(source, model)


def test_a_dinov2_classifier_is_dropped_with_a_note_and_its_backbone_converts(tmp_path):
    """Dinov2ForImageClassification's classifier reads [class token, mean of the patch tokens] (2 x width inputs):
    timm's head cannot, so the backbone converts alone (num_classes 0) and the notes say why."""
    source = _hf_new("dinov2-classifier")
    source.save_pretrained(tmp_path)
    converted = to_timm(read_state_dict(tmp_path / "model.safetensors")[0])
    assert converted.layout == "hf-dinov2" and converted.inferred_kwargs["num_classes"] == 0
    assert "classifier.weight" in converted.notes[0] and "patch tokens' mean" in converted.notes[1]
    model = _timm_model(tmp_path / "model.safetensors", "vit_small_patch14_dinov2", {"num_heads": 2})
    _same_outputs(source.dinov2, model)


def test_a_dinov2_with_zero_registers_converts_as_one_without(tmp_path):
    """Dinov2WithRegistersModel saved with num_register_tokens=0 (an empty ``register_tokens``, shape (1, 0, D)):
    nothing moves (no_embed_class False, no register token), and a plain DINOv2 name gives its own features."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("transformers without Dinov2WithRegistersModel")
    torch.manual_seed(0)
    config = dict(_NEW_TINY, image_size=28, patch_size=14, mlp_ratio=2, num_register_tokens=0)
    source = _perturbed(transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**config)), 0)
    source.save_pretrained(tmp_path)
    converted = to_timm(read_state_dict(tmp_path / "model.safetensors")[0],
                        json.loads((tmp_path / "config.json").read_text()))
    assert converted.layout == "hf-dinov2-registers" and not converted.required
    kwargs = converted.inferred_kwargs
    assert (kwargs["reg_tokens"], kwargs["no_embed_class"]) == (0, False)
    assert "reg_token" not in converted.state_dict and converted.state_dict["pos_embed"].shape[1] == 5  # class + 4
    _same_outputs(source, _timm_model(tmp_path / "model.safetensors", "vit_small_patch14_dinov2"))


def test_a_siglip_classifier_reads_the_tokens_mean(tmp_path):
    """SiglipForImageClassification: the classifier on the mean of the final-normed tokens is timm's head with
    global_pool "avg" and fc_norm False; the attention-pooling head it does not use is dropped with a note."""
    source = _hf_new("siglip-classifier")
    source.save_pretrained(tmp_path)  # a whole SiglipConfig: the tower's sizes under vision_config
    converted = to_timm(read_state_dict(tmp_path / "model.safetensors")[0],
                        json.loads((tmp_path / "config.json").read_text()))
    assert {k: converted.inferred_kwargs[k] for k in ("global_pool", "fc_norm", "num_classes", "num_heads")} == \
        {"global_pool": "avg", "fc_norm": False, "num_classes": 5, "num_heads": 2}
    assert "attention-pooling head" in converted.notes[-1]
    model = _timm_model(tmp_path / "model.safetensors", "vit_base_patch16_siglip_224")
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(pixel_values=x).logits, rtol=NEW_TOLERANCE, atol=NEW_TOLERANCE)


@pytest.mark.parametrize("kind, name", [("dinov2-registers", "vit_small_patch14_reg4_dinov2"),
                                        ("siglip-model", "vit_base_patch16_siglip_224")])
def test_a_dinov2_or_siglip_checkpoint_builds_through_the_projects_own_path(tmp_path, kind, name):
    """What ``lowrank-vit compress|evaluate NAME --checkpoint DIR/model.safetensors`` does: checkpoint_kwargs reads
    the file and the config.json beside it (a whole SiglipModel's: vision_config), build_model builds the timm name
    with those arguments and loads the converted weights strictly."""
    transformers = pytest.importorskip("transformers")
    if kind == "siglip-model":  # the whole model: text tower, logit scale and bias dropped
        vision = dict(_NEW_TINY, image_size=28, patch_size=7, intermediate_size=64)
        text = dict(_NEW_TINY, intermediate_size=64, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        torch.manual_seed(0)
        whole = _perturbed(transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision,
                                                                               text_config=text)), 0)
        whole.save_pretrained(tmp_path / "ckpt")
        source = whole.vision_model
    else:
        source = _hf_new(kind)
        source.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    kwargs, layout = checkpoint_kwargs(path, {})
    assert layout == ("hf-siglip-vision" if kind == "siglip-model" else "hf-dinov2-registers")
    json.dumps(kwargs)  # a model directory's plan records them as JSON
    model = build_model(ModelConfig("timm", name, pretrained=False, kwargs=kwargs, checkpoint=str(path)))
    _same_outputs(source, model)


def test_dinov2_position_embeddings_at_another_input_size(tmp_path, monkeypatch):
    """At the checkpoint's own size the converted DINOv2 is exact (above). At another size both libraries resample
    the patch position embeddings bicubically to the new grid, timm only with dynamic_img_size=True and always
    antialiased (its resample_abs_pos_embed); transformers 5's Dinov2WithRegistersModel antialiases too (exact
    here), its Dinov2Model does not, and that alone is the difference: timm resampling without antialiasing gives
    Dinov2Model's features exactly. docs/cli.md quotes the numbers."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("measured on transformers 5's resampling (earlier ones used a scale factor with a 0.1 offset)")
    import timm.models.vision_transformer as timm_vit

    pairs, diffs = {}, {}
    for kind, name in (("dinov2", "vit_small_patch14_dinov2"), ("dinov2-registers", "vit_small_patch14_reg4_dinov2")):
        source = _hf_new(kind, image_size=32)  # 8-pixel patches: a 4 x 4 grid
        source.save_pretrained(tmp_path / kind)
        pairs[kind] = source, _timm_model(tmp_path / kind / "model.safetensors", name, {"dynamic_img_size": True})
        _same_outputs(*pairs[kind], size=32)  # its own size: no resampling
        for size in (48, 24):  # 6 x 6 (up) and 3 x 3 (down)
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                expected = source(pixel_values=x).last_hidden_state
                diffs[kind, size] = float((pairs[kind][1].forward_features(x) - expected).abs().max())
    assert diffs["dinov2-registers", 48] < NEW_TOLERANCE and diffs["dinov2-registers", 24] < NEW_TOLERANCE
    assert diffs["dinov2", 48] > 1e-2 and diffs["dinov2", 24] > 1e-2  # features of magnitude ~4
    resample = timm_vit.resample_abs_pos_embed
    monkeypatch.setattr(timm_vit, "resample_abs_pos_embed", lambda *a, **kw: resample(*a, **kw, antialias=False))
    for size in (48, 24):
        _same_outputs(*pairs["dinov2"], size=size)


def test_user_kwargs_that_would_drop_layer_scale_or_the_attention_pool_are_refused():
    """LayerScale gammas need init_values (any value: the gammas replace it; None or 0 builds none); SigLIP's
    attention-pooling head needs global_pool "map"; DINOv2's registers fix no_embed_class."""
    dinov2 = to_timm(_hf_new("dinov2-registers").state_dict())
    assert merge_kwargs(dinov2, {"num_heads": 2, "init_values": 1e-5})["init_values"] == 1e-5
    with pytest.raises(ConversionError, match="init_values=null contradicts the hf-dinov2-registers"):
        merge_kwargs(dinov2, {"num_heads": 2, "init_values": None})
    with pytest.raises(ConversionError, match="no_embed_class=false contradicts"):
        merge_kwargs(dinov2, {"num_heads": 2, "no_embed_class": False})
    siglip = to_timm(_hf_new("siglip").state_dict())
    assert siglip.required == {"num_heads": "N"} and siglip.inferred_kwargs["act_layer"] == "gelu_tanh"  # no config
    with pytest.raises(ConversionError, match='global_pool="avg" contradicts'):
        merge_kwargs(siglip, {"num_heads": 2, "global_pool": "avg"})


@pytest.mark.usefixtures("offline")
def test_an_mlp_width_that_its_ratio_does_not_round_to_is_rebuilt_at_that_width():
    """timm builds ``int(embed_dim * mlp_ratio)`` hidden units. For 15 units over a width of 11, 15 / 11 times 11
    is 14.999..., so the ratio read from the tensors is nudged up until timm builds 15 again: the converted state
    dict then loads into the model its inferred arguments make."""
    from lowrank_vit.io.convert import infer_kwargs

    assert int(11 * (15 / 11)) == 14  # the case: the plain quotient would build 14 units
    kwargs = infer_kwargs({"patch_embed.proj.weight": torch.zeros(11, 3, 4, 4),
                           "blocks.0.mlp.fc1.weight": torch.zeros(15, 11)})
    assert kwargs["mlp_ratio"] > 15 / 11 and int(11 * kwargs["mlp_ratio"]) == 15
    model = timm.models.vision_transformer.VisionTransformer(img_size=8, patch_size=4, embed_dim=11, depth=1,
                                                             num_heads=1, mlp_ratio=kwargs["mlp_ratio"])
    assert model.blocks[0].mlp.fc1.weight.shape == (15, 11)
