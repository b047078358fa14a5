"""More details a user meets that the larger tests passed over, each found by a survivor of the seventh mutation run
(docs/mutation.md): the allocation's trace and refusals, the command line's device, version, dry-run and long-error
details, the precision ``evaluate --dtype`` times in, the files ``compress`` writes, the ONNX export's quiet and
reproducible side, the conversion's notes and refusals, and the data and fine-tune messages. Each is checked
against what the docs promise or a figure computed by hand, on tiny models (seconds)."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import cli, make_images, make_tiny_vit, one_line_error
from test_contract_details import ARCH, KWARGS, SIZE, _offline, place  # noqa: F401  (the same tiny ViT and folder)
from test_contract_details import _random_budgets as _layers  # five seeded random layers' spectra


def _model_argv(root: Path) -> list[str]:
    return [ARCH, "--checkpoint", str(root / "w.safetensors"), "--model-kwargs", json.dumps(KWARGS),
            "--input-size", str(SIZE), "--data", str(root / "imgs"), "--workers", "0"]


# ------------------------------------------------------------------------------------------------ the allocation


def test_the_greedy_trace_says_which_layer_each_step_cut():
    """Algorithm 1's trace (``Allocation.trace``: {"step", "layer", "rank", "params"}): replaying its steps from
    every layer dense gives, after each one, the parameter count it records."""
    from lowrank_vit.core.allocate import allocate_greedy

    layers = _layers(0)
    by_name = {layer.name: layer for layer in layers}
    allocation = allocate_greedy(layers, int(0.5 * sum(layer.dense_params for layer in layers)), gamma=4.0)
    assert allocation.trace
    ranks: dict[str, int | None] = dict.fromkeys(by_name)
    for i, row in enumerate(allocation.trace, 1):
        assert set(row) == {"step", "layer", "rank", "params"}
        assert row["step"] >= i and row["layer"] in by_name
        ranks[row["layer"]] = row["rank"]
        assert row["params"] == sum(by_name[n].params(r) for n, r in ranks.items())


def test_an_unreachable_target_counts_the_layers_the_latency_table_keeps_dense():
    """Two of four 16x16 layers have no rank faster than dense (``rank_limit`` 0): the smallest reachable is
    2 x 256 dense + 2 x 32 at rank 1 = 576, and the message says why two layers count whole (a limit of 3 or none
    does not)."""
    from lowrank_vit.core.allocate import check_feasible
    from lowrank_vit.core.budget import LayerBudget

    curve = torch.linspace(1.0, 0.0, 17, dtype=torch.float64)
    layers = [LayerBudget(name, 16, 16, 0, curve, rank_limit=limit)
              for name, limit in (("a", 0), ("b", 0), ("c", 3), ("d", None))]
    with pytest.raises(ValueError) as info:
        check_feasible(layers, 100)
    assert str(info.value) == (
        "the target is unreachable: even rank 1 in every compressible layer (with its Z) needs 576 parameters "
        "there, and the target leaves 100 (2 layer(s) stay dense: no profiled rank of theirs is faster than dense "
        "on the latency table)")
    with pytest.raises(ValueError) as info:  # without a latency table's limits, no such reason
        check_feasible([LayerBudget(n, 16, 16, 0, curve) for n in "ab"], 10)
    assert str(info.value).endswith("the target leaves 10")


def test_ranks_past_a_layers_spectrum_lose_nothing():
    """``LayerBudget.energy_losses``: indexed by r = 0..p, "ranks above p lose nothing"."""
    from lowrank_vit.core.budget import LayerBudget

    layer = LayerBudget("l", 8, 8, 0, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    assert layer.loss(2) == 0.25
    assert layer.loss(3) == 0.0 and layer.loss(7) == 0.0 and layer.loss(None) == 0.0


# ------------------------------------------------------------------------------------------------ the commands


def test_evaluate_times_the_model_in_the_precision_asked_for(place, capsys, monkeypatch):
    """`evaluate --dtype bfloat16`: the accuracy is measured in float32 and the latency in bfloat16 (its help): the
    model's forward sees both, the timing's input in bfloat16."""
    from timm.models.vision_transformer import VisionTransformer

    seen: list[torch.dtype] = []
    real = VisionTransformer.forward

    def forward(self, x):
        seen.append(x.dtype)
        return real(self, x)

    monkeypatch.setattr(VisionTransformer, "forward", forward)
    code, out, err = cli(capsys, "evaluate", *_model_argv(place), "--latency-batches", "1", "--repeats", "1",
                         "--dtype", "bfloat16", "--device", "cpu", "--quiet", "--json")
    assert code == 0, err
    assert json.loads(out)["latency"]["dtype"] == "bfloat16"
    assert torch.float32 in seen and torch.bfloat16 in seen


def test_device_auto_takes_the_gpu_torch_sees(monkeypatch):
    from lowrank_vit.cli.base import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_device_cuda_without_one_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli(capsys, "evaluate", ARCH, "--data", "nowhere", "--device", "cuda")
    assert code == 2
    assert one_line_error(err) == ("lowrank-vit: error: --device cuda was asked for but torch sees no CUDA device; "
                                   "use --device cpu")


def test_a_dry_run_estimate_prices_one_gpu_unless_told(capsys):
    """`reproduce --dry-run --estimate` without --devices: one GPU, as with --devices 1 (not two)."""
    argv = ["reproduce", "table2", "--rows", "table2/deit_s/ours-50", "--dry-run", "--estimate"]
    code, default, _ = cli(capsys, *argv)
    assert code == 0 and default.splitlines()[0].startswith("estimated cost on 1 x ")
    assert cli(capsys, *argv, "--devices", "1")[1] == default
    assert cli(capsys, *argv, "--devices", "2")[1] != default  # the count matters: the check above can fail


@pytest.mark.parametrize("scale, folder", [("full", "results"), ("smoke", "results/smoke")])
def test_run_prints_where_the_result_is_by_default(scale, folder, capsys, monkeypatch):
    """`run --output`'s default (its help): results/, or results/smoke/ for --scale smoke."""
    from lowrank_vit.repro import runner

    name = "table2/deit_s/ours-50"
    monkeypatch.setattr(runner, "run_row", lambda exp, scale, **kwargs: {"name": exp.name, "top1": 79.456,
                                                                          "params": 12345, "size_mib": 4.25})
    code, out, err = cli(capsys, "run", name, "--scale", scale)
    assert code == 0, err
    assert out == f"{name}: top-1 79.46% with 12,345 parameters (4.2 MiB) -> {folder}/{name}/result.json\n"


def test_a_long_error_is_cut_to_one_line_of_500_characters(capsys):
    pattern = "x" * 600
    code, _, err = cli(capsys, "list", pattern)
    assert code == 2
    line = one_line_error(err)
    prefix = "lowrank-vit: error: "
    assert line.startswith(f"{prefix}no experiment matches 'xxx") and line.endswith("x...")
    assert len(line) == len(prefix) + 500


def test_version_without_the_package_installed(capsys, monkeypatch):
    """From a source tree never installed, --version says so rather than failing."""
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(SystemExit) as info:
        cli(capsys, "--version")
    assert info.value.code == 0
    assert capsys.readouterr().out == "lowrank-vit (not installed)\n"


def test_the_profile_table_heads_each_column_with_what_it_holds():
    """`profile`'s table: the third column is how many of the model's layers have that shape (counted by hand)."""
    from lowrank_vit.cli.speed import render, summary
    from lowrank_vit.core.latency import LatencyTable, ShapeLatency, Timing

    def t(ms: float) -> Timing:
        return Timing(ms, ms * 0.9, ms * 1.1, 3)

    shapes = [ShapeLatency(32, 96, 17, True, t(0.5), (8, 16), (t(0.2), t(0.6))),
              ShapeLatency(128, 32, 17, True, t(0.4), (8, 16), (t(0.3), t(0.35)))]
    keys = [s.key for s in shapes]
    table = LatencyTable("tiny", 1, "cpu", "a CPU", "torch", "float32", 2, {"torch": torch.__version__}, t(3.0),
                         {"blocks.0.attn.qkv": keys[0], "blocks.1.attn.qkv": keys[0], "blocks.0.mlp.fc2": keys[1]},
                         dict(zip(keys, shapes, strict=True)))
    assert [shape["layers"] for shape in summary(table)["shapes"]] == [2, 1]  # `profile --json`'s count
    lines = render(table).splitlines()
    assert lines[1].split() == ["shape", "rows", "layers", "dense", "ms", "IQR", "break-even", "of"]
    assert [line.split()[:3] for line in lines[2:4]] == [["32x96", "17", "2"], ["128x32", "17", "1"]]
    assert [line.split()[-2:] for line in lines[2:4]] == [["8", "16"], ["16", "16"]]
    assert lines[-1] == ("break-even: the largest profiled rank at which the factored layer is faster than dense (0: "
                         "never); of: the largest rank profiled (the equal-cost rank, in steps)")


def test_the_finetune_records_a_hub_name_as_given_and_a_folder_as_its_full_path(tmp_path, monkeypatch):
    """resume.json says which data the interrupted run read: a local folder by its absolute path (the same from any
    directory), a dataset name as it was typed (not as a path below the current directory)."""
    from lowrank_vit.cli.finetune import _finetune_run
    from lowrank_vit.io.surgery import WEIGHTS_FILE
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    model = tmp_path / "model"
    model.mkdir()
    (model / WEIGHTS_FILE).write_bytes(b"weights")
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    config = FinetuneConfig(epochs=1)
    for data, recorded in (("someone/dataset", "someone/dataset"), ("imgs", str(tmp_path.resolve() / "imgs"))):
        run = _finetune_run(argparse.Namespace(data=data, augment=False), model, config)
        assert run["data"] == recorded


# ------------------------------------------------------------------------------------------------- files written


@pytest.fixture(scope="module")
def compressed_dir(place, tmp_path_factory) -> Path:
    from lowrank_vit.cli.main import main

    out = tmp_path_factory.mktemp("written") / "my-model"
    assert main(["compress", *_model_argv(place), "--calib-samples", "8", "--reduction", "0.3", "--recipe",
                 "vanilla", "--output", str(out), "--quiet", "--no-eval"]) == 0
    return out


def test_the_model_card_is_titled_with_the_output_directorys_name(compressed_dir):
    card = (compressed_dir / "README.md").read_text()
    assert "\n# my-model\n" in card
    assert ".my-model" not in card  # never the hidden staging directory it was written in


def test_the_reports_layer_rows_carry_the_compressions_output_errors(compressed_dir):
    """report.json's per-layer rows are the compression's: "per-layer ranks and errors" (docs/cli.md), each
    layer's factored count rank x (in + out) for the vanilla recipe (no Z)."""
    rows = json.loads((compressed_dir / "report.json").read_text())["layers"]
    assert len(rows) == 4  # one block: qkv, proj, fc1, fc2
    for row in rows:
        assert isinstance(row["output_error"], float) and 0 < row["output_error"] < 1, row
        if row["rank"] is not None:
            assert row["factored_params"] == row["rank"] * (row["in_features"] + row["out_features"])


def test_a_dense_top1_that_cannot_be_cached_leaves_no_temporary_file(tmp_path, capsys):
    """The cache file's place is taken (here by a folder): said on stderr, the command goes on, and the temporary
    file written beside it is gone."""
    from lowrank_vit.cli.densecache import _write_cached_accuracy

    folder = tmp_path / "dense"
    target = folder / "vit-0123.json"
    target.mkdir(parents=True)
    _write_cached_accuracy(argparse.Namespace(quiet=False), target, {"k": 1},
                           {"top1": 50.0, "top5": 100.0, "images": 12})
    assert "the dense model's top-1 was not cached (IsADirectoryError" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["vit-0123.json"]


# ------------------------------------------------------------------------------------------------------ ONNX export


def test_the_export_leaves_the_callers_random_state_alone(tmp_path):
    """Its tracing input is drawn from a generator of its own: a seeded script draws the same numbers after an
    export as without one."""
    from lowrank_vit.io.export import export_onnx

    pytest.importorskip("onnx")
    model = make_tiny_vit()
    torch.manual_seed(5)
    export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))


def test_onnx_logits_run_on_the_cpu_provider_quietly(tmp_path, capfd):
    """onnxruntime's CPU provider named as onnxruntime spells it: no warning, no "EP Error" fallback on stderr."""
    pytest.importorskip("onnxruntime")
    from lowrank_vit.io.export import export_onnx, onnx_logits

    model = make_tiny_vit()
    path = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    images = make_images(3)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = onnx_logits(path, images)
    assert [str(w.message) for w in caught] == []
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err and "provider" not in (out + err).lower()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-4)


class Alpha(nn.Module):
    def forward(self, x):
        return x


class Beta(nn.Module):
    def forward(self, x):
        return x


def test_every_unknown_layer_kind_is_named_in_the_refusal():
    from lowrank_vit.io.export import UnsupportedLayerError, prepare_for_export

    model = make_tiny_vit()
    model.extra_b, model.extra_a = Beta(), Alpha()
    with pytest.raises(UnsupportedLayerError) as info:
        prepare_for_export(model)
    assert str(info.value).startswith("cannot export layer kind(s) Alpha, Beta to ONNX: the exporter knows ")


# ------------------------------------------------------------------------------------------ conversion, checkpoints


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


def test_a_non_square_patch_is_inferred_as_its_two_sides():
    """A (dim, channels, 16, 8) patch kernel: patch_size [16, 8], as timm's constructor takes it (a square grid
    of position embeddings says nothing of the image size then)."""
    from lowrank_vit.io.convert import infer_kwargs

    kwargs = infer_kwargs({"patch_embed.proj.weight": torch.zeros(24, 3, 16, 8), "cls_token": torch.zeros(1, 1, 24),
                           "pos_embed": torch.zeros(1, 17, 24)})
    assert kwargs["patch_size"] == [16, 8] and kwargs["embed_dim"] == 24 and kwargs["in_chans"] == 3
    assert "img_size" not in kwargs
    assert infer_kwargs({"patch_embed.proj.weight": torch.zeros(24, 3, 8, 8)})["patch_size"] == 8


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


def test_a_pickle_with_objects_is_refused_quoting_torchs_first_line(tmp_path):
    from lowrank_vit.io.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "trainer.pt"
    torch.save({"weight": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(pickle.UnpicklingError) as torch_error:
        torch.load(path, weights_only=True)
    first = str(torch_error.value).strip().splitlines()[0]
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert f"the code they name, and that is never done here ({first[:160]}): load it yourself" in str(info.value)


def test_an_unreachable_hub_model_quotes_its_cause_shortened_on_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from lowrank_vit.io.hub import download

    cause = "Cannot find the requested files in the disk cache\nand outgoing traffic has been disabled. " * 6

    def snapshot_download(*args, **kwargs):
        raise LocalEntryNotFoundError(cause)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FileNotFoundError) as info:
        download("hf-hub:someone/model")
    message = str(info.value)
    assert "\n" not in message
    match = re.fullmatch(r"cannot get hf-hub:someone/model from the Hugging Face hub \(LocalEntryNotFoundError: "
                         r"(.*)\): check the name, go online .*", message)
    assert match, message
    quoted = match.group(1)
    assert len(quoted) <= 200 and quoted.endswith("...")
    words = " ".join(cause.split())
    assert quoted.startswith("Cannot find the requested files in the disk cache and outgoing")
    assert words.startswith(quoted[:-3].rstrip() + " ")  # cut at a word


# ---------------------------------------------------------------------------------------------- data, fine-tune


def test_imagenet_from_the_hub_is_called_by_its_name(monkeypatch):
    import datasets

    from lowrank_vit.stages.data import DataConfig, DataFormatError, build_datamodule

    def load_dataset(*args, **kwargs):
        raise ValueError("a schema the reader does not know")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dm = build_datamodule(DataConfig(name="imagenet-1k", token="hf_not_a_token", img_size=8, num_workers=0))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert str(info.value) == "could not read ImageNet-1k: a schema the reader does not know"


def test_a_ground_truth_file_names_what_it_lacks_as_a_list(tmp_path):
    from lowrank_vit.stages.data import DataFormatError, read_val_labels

    images = [tmp_path / f"{c}.png" for c in "abcde"]
    csv = tmp_path / "truth.csv"
    csv.write_text("filename,label\ne.png,cat\n")
    with pytest.raises(DataFormatError) as info:
        read_val_labels(csv, images, ["cat", "dog"])
    assert str(info.value).endswith("has no label for 4 of the 5 images (e.g. a.png, b.png, c.png)")
    lines = tmp_path / "truth.txt"
    lines.write_text("cat\ndog\nowl\nfish\nyak\n")
    with pytest.raises(DataFormatError) as info:
        read_val_labels(lines, images, ["ant", "bee", "cat", "dog"])
    assert str(info.value).endswith("label 'owl' of c.png is neither a class index nor one of the training folder's "
                                    "classes (ant, bee, cat...)")


def _compressed():
    from lowrank_vit import CompressionConfig, compress

    model = make_tiny_vit(seed=0)
    compress(model, [make_images(32, seed=1)], CompressionConfig(reduction=0.4, calib_samples=32, progress=False))
    return model


def test_timms_norm_act_layers_train_in_the_partial_finetune():
    """timm's RmsNormAct (a norm followed by an activation; not a torch norm class) is a norm: trained."""
    from timm.layers.norm_act import RmsNormAct

    from lowrank_vit.stages.finetune import freeze_for_partial_finetune

    model = _compressed()
    model.norm = RmsNormAct(32, apply_act=False)
    counts = freeze_for_partial_finetune(model)
    assert model.norm.weight.requires_grad
    norms = sum(p.numel() for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, RmsNormAct))
                for p in m.parameters(recurse=False))
    assert counts["groups"]["norm"] == norms


def test_a_checkpoint_with_a_tensor_of_another_shape_is_refused_naming_it():
    from lowrank_vit.stages.finetune import PartialFinetune

    module = PartialFinetune(_compressed())
    state = dict(module.state_dict())
    assert "model.norm.weight" in state
    state["model.norm.weight"] = torch.ones(5)
    with pytest.raises(ValueError) as info:
        module.on_load_checkpoint({"lowrank_vit": json.loads(json.dumps(module._fingerprint)), "state_dict": state})
    assert str(info.value) == ("the checkpoint does not match this model: missing [], unexpected [], shape mismatch "
                               "['model.norm.weight']")
