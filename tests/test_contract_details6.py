"""More details a user meets that the larger tests passed over, each found by a survivor of the eleventh mutation run
(docs/mutation.md): what the data config keeps of the preprocessing, the progress bar of an evaluation, the input's
digest a fine-tune records, the names of the data in refusals and warnings, the words of the export's and the
conversion's refusals, and the notes and arguments a foreign checkpoint converts into (VMeanba's step timing is with
compress_model's other tests, in test_contract_details7.py). Each is checked against what the docs promise or a figure
computed by hand, on tiny inputs (seconds)."""

from __future__ import annotations

import argparse
import hashlib

import pytest
import torch

from conftest import make_tiny_vit
from test_contract_details import _compressed, _offline  # noqa: F401  (HF offline, a cache folder of its own)

# ------------------------------------------------------------------------------------------------ the commands


def test_the_data_config_keeps_the_models_interpolation_and_crop(tmp_path):
    from lowrank_vit.cli.data import _data_config

    args = argparse.Namespace(workers=0, data=str(tmp_path), image_column=None, label_column=None,
                              train_split="train", val_split=None, batch_size=4)
    pre = {"input_size": (3, 24, 24), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.75,
           "interpolation": "bicubic"}
    cfg = _data_config(args, pre, calib_samples=8)
    assert (cfg.interpolation, cfg.crop_pct) == ("bicubic", 0.75)


@pytest.mark.parametrize("quiet", [False, True])
def test_an_evaluation_shows_its_progress_bar_unless_quiet(quiet, monkeypatch):
    from lowrank_vit.cli import data as userdata
    from lowrank_vit.repro import runner

    seen = {}

    class Data:
        def val_dataloader(self, limit=None):
            return "loader"

    monkeypatch.setattr(runner, "evaluate", lambda model, loader, device, progress, desc: seen.update(
        progress=progress, loader=loader, desc=desc) or {})
    userdata.evaluate_on_user_data(None, Data(), torch.device("cpu"), argparse.Namespace(quiet=quiet, limit=None),
                                   "evaluate x")
    assert seen == {"progress": not quiet, "loader": "loader", "desc": "evaluate x"}


def test_a_finetune_records_the_sha256_of_its_inputs_weights(tmp_path):
    from lowrank_vit.cli.finetune import _finetune_run
    from lowrank_vit.io.surgery import WEIGHTS_FILE
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    (tmp_path / WEIGHTS_FILE).write_bytes(b"some weights")
    run = _finetune_run(argparse.Namespace(data="someone/dataset", augment=False), tmp_path, FinetuneConfig(epochs=1))
    assert run["input_sha256"] == hashlib.sha256(b"some weights").hexdigest()


# -------------------------------------------------------------------------------------------------------- the data


def test_calibrating_on_more_images_than_mnist_holds_names_mnist_in_the_warning():
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import MNIST_5K, DataConfig

    dm = build_datamodule(DataConfig(name=MNIST_5K, img_size=28, batch_size=8, num_workers=0, calib_samples=10**6))
    with pytest.warns(UserWarning) as caught:
        dm.setup()
    assert any(f"training images of {MNIST_5K!r} (calib_samples=1000000)" in str(w.message) for w in caught)


def test_an_empty_flat_validation_folder_is_named(tmp_path):
    from PIL import Image

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, EmptySplitError

    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / label / "0.png")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "notes.txt").write_text("no images here")
    (tmp_path / "labels.txt").write_text("")
    dm = build_datamodule(DataConfig(path=str(tmp_path), val_labels=str(tmp_path / "labels.txt"), img_size=8,
                                     batch_size=2, num_workers=0))
    with pytest.raises(EmptySplitError) as info:
        dm.setup()
    assert str(info.value) == f"the flat validation folder {str(tmp_path / 'val')!r} has no images"


# ---------------------------------------------------------------------------------------------------- the export


def test_an_unknown_quantized_form_lists_the_known_ones():
    from lowrank_vit.io.export import prepare_for_export

    with pytest.raises(ValueError) as info:
        prepare_for_export(make_tiny_vit(seed=0), quantized="int4")
    assert str(info.value) == "quantized='int4' is not one of dequantized, qdq"


def test_the_opset_range_falls_back_where_torch_names_neither_limit(monkeypatch):
    """A torch whose exporter module names no limits: opsets 7 to 20 are assumed."""
    from torch.onnx import _constants

    from lowrank_vit.io.export import opset_range

    for name in ("ONNX_MIN_OPSET", "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", "ONNX_MAX_OPSET"):
        monkeypatch.delattr(_constants, name, raising=False)
    assert opset_range() == (7, 20)


# ------------------------------------------------------------------------------------------------ the conversion


def test_a_deit_with_one_classifier_converts_with_the_note_of_what_its_second_token_became():
    from lowrank_vit.io.convert import distillation_token

    tensors = {"cls_token": torch.zeros(1, 1, 8), "dist_token": torch.ones(1, 1, 8), "head.weight": torch.zeros(3, 8)}
    out, notes = distillation_token(tensors)
    assert notes == ["one classifier on the class token: a plain ViT name, the distillation token a register token"]
    assert torch.equal(out["reg_token"], tensors["dist_token"]) and "dist_token" not in out


def test_transformers_activation_names_become_timms():
    from lowrank_vit.io.convert import _config_kwargs

    for hidden_act, act_layer in (("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("silu", "silu")):
        kwargs, _ = _config_kwargs({"num_attention_heads": 3, "hidden_act": hidden_act})
        assert kwargs["act_layer"] == act_layer, hidden_act
    kwargs, _ = _config_kwargs({"num_attention_heads": 3, "hidden_act": "gelu"})
    assert "act_layer" not in kwargs  # exact GELU: timm's own default


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


def test_a_config_image_size_the_position_embeddings_contradict_is_refused():
    """32x32 images in 8x8 patches: 16 position embeddings; a config saying 48 (36 patches) is refused."""
    from lowrank_vit.io.convert import ConversionError, to_timm

    tensors, config = _hf_vit_tensors()
    assert to_timm(tensors, config).inferred_kwargs["img_size"] == 32
    with pytest.raises(ConversionError) as info:
        to_timm(tensors, {**config, "image_size": 48})
    assert str(info.value) == ("config.json's image_size 48 and patch size 8 make 36 patches, the position "
                               "embeddings 16")


def test_user_kwargs_agree_with_inferred_ones_by_what_timm_builds():
    """A patch size given as 16 or (16, 16) is the same; an MLP ratio is the same when timm builds as many units from
    it (int(embed_dim * ratio)), and a ratio of 2 is not one of 4."""
    from lowrank_vit.io.convert import _same

    assert _same("patch_size", 16, [16, 16], {}) and _same("img_size", [32, 32], 32, {})
    assert not _same("patch_size", 16, [16, 8], {})
    assert _same("mlp_ratio", 4, 4.000000001, {"embed_dim": 48})
    assert not _same("mlp_ratio", 2, 4.0, {"embed_dim": 48})


def test_a_damaged_torch_file_says_what_torch_raised(tmp_path):
    import zipfile

    from lowrank_vit.io.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "w.pt"
    with zipfile.ZipFile(path, "w") as archive:  # a zip, as torch.save writes, without the records torch reads
        archive.writestr("w/version", "3\n")
    try:
        torch.load(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001  (the independent truth: what torch itself raises)
        raised = type(err).__name__
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert f"is a damaged PyTorch file ({raised}: " in str(info.value)


@pytest.mark.parametrize("steps", [2.5, 0, True])
def test_a_step_count_that_is_not_a_positive_integer_is_refused(steps):
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    with pytest.raises(ValueError) as info:
        FinetuneConfig(epochs=1, max_steps=steps)
    assert str(info.value) == f"max_steps must be a positive integer or None, got {steps!r}"


# ------------------------------------------------------------ survivors of the twelfth run (seed 7), first ones


def test_a_reports_layer_rows_count_the_dense_weights_of_each_layer():
    """A model without a compression report (a fine-tune's input written by save_compressed): each layer's row says
    in x out dense weights, read here from the layer's own shape."""
    from lowrank_vit.cli.outputs import report_layers

    model = _compressed()
    rows = report_layers(model, None)
    assert rows
    for row in rows:
        layer = model.get_submodule(row["name"])
        assert row["dense_params"] == layer.in_features * layer.out_features == row["in_features"] * row["out_features"]


def test_a_two_class_model_can_be_fine_tuned():
    from lowrank_vit import CompressionConfig, compress
    from lowrank_vit.stages.finetune import PartialFinetune

    from conftest import make_images

    model = make_tiny_vit(seed=0, num_classes=2)
    compress(model, [make_images(8, seed=1)], CompressionConfig(reduction=0.3, calib_samples=8, progress=False))
    assert PartialFinetune(model).num_classes == 2
