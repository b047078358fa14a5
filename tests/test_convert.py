"""ViT weights from torchvision and Hugging Face transformers, read into timm's layout: each fixture is a tiny model
built in its own library with random weights and saved the way that library saves it, and the truth is that model's
own logits on the same input (the conversion and the timm model are checked together, against the source)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from lowrank_vit.harness.models import SetupError, load_checkpoint_
from lowrank_vit.io.checkpoints import read_state_dict
from lowrank_vit.io.convert import ConversionError, checkpoint_kwargs, detect_layout, merge_kwargs, to_timm

from conftest import cli, one_line_error

TINY = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 96,
        "image_size": 32, "patch_size": 8}
TOLERANCE = 1e-4
"""Largest |logit difference| allowed, source model against the converted timm model (logits of magnitude ~1-10).
Measured (float32, CPU, logits up to ~7): torchvision 0 (bit-identical), CLIP into timm's CLIP name 0, transformers
ViT 1.8e-5, ViTModel features 1.2e-5, DeiT 1.2e-5 (two heads) and 2.6e-5 (one head): all of it LayerNorm's eps, 1e-12
there and 1e-6 in timm (0 with the source's eps set on timm's LayerNorms)."""


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initialization (torchvision's head starts at zero, LayerNorms at one), so that
    a swapped norm, bias or projection shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _torchvision(seed: int = 0, num_classes: int = 5) -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return _perturbed(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48,
                                        mlp_dim=96, num_classes=num_classes), seed)


def _hf(kind: str, seed: int = 0) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if kind == "clip":
        config = transformers.CLIPVisionConfig(**TINY)
        return _perturbed(transformers.CLIPVisionModel(config), seed)
    family = "DeiT" if kind.startswith("deit") else "ViT"
    config = getattr(transformers, f"{family}Config")(**TINY, num_labels=5)
    cls = {"vit": "ViTForImageClassification", "vit-model": "ViTModel", "deit": "DeiTForImageClassification",
           "deit-model": "DeiTModel",
           "deit-teacher": "DeiTForImageClassificationWithTeacher"}[kind]
    return _perturbed(getattr(transformers, cls)(config), seed)


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


@pytest.mark.parametrize("library", ["torchvision", "transformers"])
def test_the_cli_evaluates_a_foreign_checkpoint_as_its_source_predicts(tmp_path, capsys, library):
    if library == "torchvision":
        source, path, extra = _torchvision(seed=3), tmp_path / "w" / "vit.pth", ["--model-kwargs", '{"num_heads": 3}']
        path.parent.mkdir()
        torch.save(source.state_dict(), path)
    else:
        source, path, extra = _hf("vit", seed=3), tmp_path / "w" / "model.safetensors", []
        source.save_pretrained(path.parent)  # num_heads from its config.json
    folder = _predicted_folder(tmp_path, source)
    code, out, err = cli(capsys, "evaluate", "vit_tiny_patch16_224", "--checkpoint", str(path), *extra,
                         "--preprocessing", "timm", "--crop-pct", "1", "--data", str(folder), "--workers", "0",
                         "--json", "--quiet", "--latency-batches")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "timm vit_tiny_patch16_224, your checkpoint"
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


def test_a_distilled_deit_in_a_plain_name_says_what_it_was(tmp_path):
    source = _hf("deit-teacher")
    source.save_pretrained(tmp_path)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=5)
    with pytest.raises(SetupError, match=r"unexpected dist_token, head_dist.*converted from hf-deit.*distilled"):
        load_checkpoint_(model, tmp_path / "model.safetensors")
