"""Details a user meets that the larger tests passed over, each found by a mutant of the sixth mutation run
(docs/mutation.md) that no test caught: what ``list --json`` leaves out, ``--quiet`` reaching the compression's
progress bars, the latency profile's precision, the fine-tune's logged keys, progress bar and refusals, images whose
first and last axes could both be channels, and the conversion of a CLIP vision tower into a plain ViT name. Each
is checked against what the docs promise, on tiny models (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import cli, make_images, make_tiny_vit, write_image_folder

ARCH = "vit_tiny_patch16_224"
KWARGS = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
SIZE = 32


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("LOWRANK_VIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """Three classes of four images and a tiny ViT's weights that carry their preprocessing."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("details")
    write_image_folder(root / "imgs", 3, 4, SIZE)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **KWARGS)
    save_file(model.state_dict(), str(root / "w.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"})
    return root


def _compress_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", ARCH, "--checkpoint", str(root / "w.safetensors"), "--model-kwargs", json.dumps(KWARGS),
            "--input-size", str(SIZE), "--data", str(root / "imgs"), "--workers", "0", "--calib-samples", "8",
            "--reduction", "0.3", "--output", str(out), *extra]


# ------------------------------------------------------------------------------------------------ the commands


def test_list_json_rows_leave_out_both_run_configurations(capsys):
    """`list --json` is the registry's index: each row without its full and smoke configurations (`show NAME`
    prints those), so neither key appears."""
    code, out, _ = cli(capsys, "list", "table2", "--json")
    rows = json.loads(out)
    assert code == 0 and rows
    assert all("full" not in row and "smoke" not in row for row in rows)
    assert {"name", "table", "arch", "method"} <= set(rows[0])


def test_compress_quiet_prints_no_progress_bar(place, tmp_path, capsys):
    """`--quiet`: nothing on stderr, the compression's own progress bars included (they are the longest part), and
    the datasets library's bar while it first reads an image folder (it printed one: the variable that turns them off
    is read when datasets is imported, before the command runs)."""
    code, out, err = cli(capsys, *_compress_argv(place, tmp_path / "q", "--quiet", "--no-eval"))
    assert code == 0 and out.strip() and err == ""
    code, _, err = cli(capsys, *_compress_argv(place, tmp_path / "loud", "--no-eval"))
    assert code == 0 and "%|" in err  # without it the bars are there: the check above can fail


def test_the_printed_preprocessing_says_the_input_size_is_the_models_own(place, tmp_path, capsys):
    """The line every command prints first: the input size comes from the model (it is never a flag or a
    carried field), whatever a directory carries."""
    assert cli(capsys, *_compress_argv(place, tmp_path / "m", "--quiet", "--no-eval"))[0] == 0
    code, _, err = cli(capsys, "evaluate", str(tmp_path / "m"), "--data", str(place / "imgs"), "--workers", "0",
                       "--latency-batches")
    assert code == 0
    line = next(line for line in err.splitlines() if line.startswith("preprocessing:"))
    assert f"input 3x{SIZE}x{SIZE} (model)" in line and "mean 0.5,0.5,0.5 (directory" in line


def test_an_auto_latency_table_is_profiled_in_the_precision_asked_for(place, tmp_path, capsys, monkeypatch):
    """`--latency-table auto --latency-dtype bfloat16`: the profile compress takes is measured in bfloat16, on the
    runtime and batch asked for, not in a default."""
    from lowrank_vit import speed

    asked = {}

    def profile(model, **kwargs):
        asked.update(kwargs)
        raise ValueError("stop here")  # refused as the user's error: enough to see what was asked

    monkeypatch.setattr(speed, "cached_profile", profile)
    code, _, err = cli(capsys, *_compress_argv(place, tmp_path / "l", "--latency-table", "auto", "--latency-dtype",
                                               "bfloat16", "--latency-batch", "4", "--quiet"))
    assert code == 2 and "stop here" in err
    assert asked["dtype"] == "bfloat16" and asked["batch"] == 4 and asked["runtime"] == "torch"


def test_a_finetune_whose_output_holds_its_input_names_the_input(place, tmp_path, capsys):
    """The refusal names the input directory it protects, so the user sees which one."""
    assert cli(capsys, *_compress_argv(place, tmp_path / "inner" / "m", "--quiet", "--no-eval"))[0] == 0
    code, _, err = cli(capsys, "finetune", str(tmp_path / "inner" / "m"), "--data", str(place / "imgs"),
                       "--epochs", "1", "--output", str(tmp_path / "inner"), "--force")
    assert code == 2
    assert f"holds the input directory {str(tmp_path / 'inner' / 'm')!r}" in err


# ---------------------------------------------------------------------------------------------------- the data


def test_an_array_whose_first_and_last_axes_could_both_be_channels_is_read_channels_last():
    """(3, 5, 3): channels-first only when the last axis cannot be channels; here it can, so it is 3 rows of 5
    pixels of 3 channels, as PIL and Hugging Face datasets store images."""
    from lowrank_vit.stages.data import to_pil

    array = np.arange(45, dtype=np.uint8).reshape(3, 5, 3)
    image = to_pil(array)
    assert image.size == (5, 3) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), array)
    four = np.arange(60, dtype=np.uint8).reshape(3, 5, 4)  # the last axis could be RGBA: channels-last too
    assert to_pil(four).size == (5, 3)


def test_an_empty_validation_split_names_the_data(tmp_path):
    """The refusal of an empty split says which data it read (the user may have several folders)."""
    from PIL import Image

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    root = tmp_path / "folder"
    for split, count in (("train", 2), ("validation", 0)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / label / f"{i}.png")
    dm = build_datamodule(DataConfig(path=str(root), img_size=8, batch_size=2, num_workers=0))
    with pytest.raises(ValueError) as info:
        dm.setup()
    assert repr(str(root)) in str(info.value)


# ------------------------------------------------------------------------------------------------ the fine-tune


def _compressed():
    from lowrank_vit import CompressionConfig, compress

    model = make_tiny_vit(seed=0)
    compress(model, [make_images(32, seed=1)], CompressionConfig(reduction=0.4, calib_samples=32, progress=False))
    return model


def _loader():
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(make_images(24, seed=4), torch.randint(0, 10, (24,), generator=g)),
                      batch_size=12)


def test_the_finetune_logs_train_top1_per_epoch_and_shows_no_bar_when_asked(capsys):
    """`train/top1` is an epoch figure (one key, no `_step`/`_epoch` pair), and `progress=False` prints no bar."""
    from lowrank_vit.stages.finetune import finetune
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    capsys.readouterr()
    _, trainer = finetune(_compressed(), _loader(), config=FinetuneConfig(epochs=1, lr=1e-3), accelerator="cpu",
                          devices=1, progress=False, enable_model_summary=False)
    assert "train/top1" in trainer.callback_metrics
    assert not any(key.startswith("train/top1_") for key in trainer.callback_metrics)
    out, err = capsys.readouterr()
    assert "it/s" not in out + err and "Epoch 0" not in out + err
    assert trainer.progress_bar_callback is None


def test_a_dense_model_is_refused_with_what_to_do():
    from lowrank_vit.stages.finetune import freeze_for_partial_finetune

    with pytest.raises(ValueError) as info:
        freeze_for_partial_finetune(make_tiny_vit())
    assert str(info.value).endswith("(lowrank_vit.compress) or load a compressed one (lowrank_vit.load_compressed).")


def test_a_checkpoint_of_something_else_is_refused_with_its_reason():
    """Resuming reads the checkpoint's own record: none (not ours), or another architecture, each said."""
    from lowrank_vit.stages.finetune import PartialFinetune

    module = PartialFinetune(_compressed())
    with pytest.raises(ValueError) as info:
        module.on_load_checkpoint({"state_dict": {}})
    assert str(info.value).endswith("(no 'lowrank_vit' entry): cannot resume from it")
    with pytest.raises(ValueError) as info:
        module.on_load_checkpoint({"lowrank_vit": {"architecture": "Swin"}})
    assert str(info.value) == ("the checkpoint is of a 'Swin' model, this is a "
                               f"{module._fingerprint['architecture']!r}: wrong checkpoint")


# ------------------------------------------------------------------------------------------------- conversion


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


def test_the_config_beside_a_whole_clip_checkpoint_is_read(tmp_path):
    """A whole CLIP model's config.json keeps the tower's sizes under ``vision_config``: still a transformers
    config (so the heads need not be given), read whole."""
    from lowrank_vit.io.convert import read_transformers_config

    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"num_attention_heads": 2},
                                                      "text_config": {}}))
    assert read_transformers_config(tmp_path / "model.safetensors")["vision_config"]["num_attention_heads"] == 2
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ResNet"]}))
    assert read_transformers_config(tmp_path / "model.safetensors") is None


def test_a_source_layer_norm_eps_of_timms_own_value_needs_no_note():
    """Only a LayerNorm eps other than timm's 1e-6 is worth a note (transformers' ViT 1e-12, CLIP 1e-5)."""
    from lowrank_vit.io.convert import _config_kwargs

    for eps, noted in ((1e-6, False), (1e-12, True), (1e-5, True)):
        _, notes = _config_kwargs({"num_attention_heads": 2, "layer_norm_eps": eps})
        assert any("eps" in note for note in notes) is noted, (eps, notes)


# ------------------------------------------------------------------- found by the sixth run's last survivors


def _random_budgets(seed: int):
    from lowrank_vit.core.allocate import energy_tail_curve
    from lowrank_vit.core.budget import LayerBudget

    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(5):
        k, m = int(torch.randint(8, 40, (1,), generator=g)), int(torch.randint(8, 40, (1,), generator=g))
        s = torch.rand(min(k, m), generator=g, dtype=torch.float64).sort(descending=True).values
        layers.append(LayerBudget(f"l{i}", k, m, 0, energy_tail_curve(s)))
    return layers


@pytest.mark.parametrize("seed", range(5))
def test_the_marginal_trace_prices_each_layers_last_direction_per_parameter(seed):
    """The trace says, per layer, what its last kept direction was worth per parameter: the loss it saves over
    one rank less, divided by the parameters that rank costs (k + m): the unit the allocation's price is in."""
    from lowrank_vit.core.allocate import allocate_marginal

    layers = _random_budgets(seed)
    allocation = allocate_marginal(layers, int(0.5 * sum(layer.dense_params for layer in layers)))
    rows = {row["layer"]: row for row in allocation.trace[1:]}
    for layer in layers:
        r = allocation.ranks[layer.name]
        if r is None or r < 2:
            continue
        saved = float(layer.loss(r - 1) - layer.loss(r))
        assert (rows[layer.name]["rank"], rows[layer.name]["params"]) == (r, layer.params(r))
        assert rows[layer.name]["last_price"] == pytest.approx(saved / (layer.in_features + layer.out_features))


def _saved_plan(tmp_path):
    from lowrank_vit import CompressionConfig, compress, save_compressed

    model = make_tiny_vit(seed=1)
    compress(model, [make_images(16, seed=2)], CompressionConfig(reduction=0.3, calib_samples=16, progress=False))
    directory = save_compressed(model, tmp_path / "m")
    return directory, directory / "lowrank_vit.json"


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


def _parquet(path: Path, labels: list[int], dtype: str = "int64") -> None:
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value(dtype)})
    images = [Image.new("RGB", (8, 8), (40 * i % 256, 0, 0)) for i in range(len(labels))]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(path))


def test_unsigned_integer_labels_are_classes_and_local_data_is_cached_where_asked(tmp_path):
    """uint8 labels (what numpy and many exporters write) are integer classes (they crashed the class count with
    an OverflowError until this test); the local data's Arrow cache goes under the data config's cache_dir, not the
    user's Hugging Face cache."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    _parquet(tmp_path / "d" / "train.parquet", [0, 1, 2, 1], dtype="uint8")
    _parquet(tmp_path / "d" / "validation.parquet", [2, 0], dtype="uint8")
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0,
                                     cache_dir=str(tmp_path / "hf")))
    dm.setup()
    assert dm.num_classes == 3 and len(dm.val_dataset) == 2
    assert any((tmp_path / "hf").rglob("*.arrow"))


def test_an_unknown_interpolation_lists_the_known_ones():
    from lowrank_vit.stages.data_config import INTERPOLATIONS, check_preprocessing

    with pytest.raises(ValueError) as info:
        check_preprocessing({"interpolation": "cubic-ish"})
    assert str(info.value) == f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got 'cubic-ish'"
