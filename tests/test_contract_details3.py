"""More details a user meets that the larger tests passed over, each found by a survivor of the eighth mutation run
(docs/mutation.md): what ``plan --json`` says, where ``run`` and ``demo`` send their progress and output, what
``--quiet`` keeps off stderr on a resumed fine-tune, the data stamp of a folder of splits, the ``--distill`` and
resume refusals, the validation loss of a multi-process fine-tune, the conversion of a transformers config's image
size and activation, the rebuild check, the model card and the ranks figure. Each is checked against what the docs
promise or a figure computed by hand, on tiny models (seconds)."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT, cli, make_images, make_tiny_vit, one_line_error, write_image_folder
from test_contract_details import ARCH, KWARGS, SIZE, _offline, place  # noqa: F401  (the same tiny ViT and folder)

# ------------------------------------------------------------------------------------------------ the commands


def test_plan_json_says_the_parameter_target(capsys):
    """`plan --json` carries ``target_params``: the count the allocation aimed at, (1 - reduction) x the model's
    parameters, rounded (docs/api.md: the count lands within 0.1% of it)."""
    code, out, err = cli(capsys, "plan", "table2/deit_s/ours-50", "--scale", "smoke", "--calib-images", "2",
                         "--set", "compression.reduction=0.3", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["target_params"] == round(0.7 * data["params_before"])
    assert abs(data["params_after"] - data["target_params"]) <= 0.001 * data["target_params"]


@pytest.mark.parametrize("quiet", [False, True])
def test_run_draws_progress_bars_unless_quiet(quiet, capsys, monkeypatch):
    """`run --quiet` asks the row for no progress bars; without it, it asks for them."""
    from lowrank_vit.repro import runner

    asked = {}

    def run_row(exp, scale, **kwargs):
        asked.update(kwargs)
        return {"name": exp.name, "top1": 50.0, "params": 1, "size_mib": 1.0}

    monkeypatch.setattr(runner, "run_row", run_row)
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "smoke", *(["--quiet"] if quiet else []))
    assert code == 0, err
    assert asked["progress"] is (not quiet)


def test_demo_writes_where_output_says(capsys, monkeypatch, tmp_path):
    """`demo --output DIR`: the demo's table, figures and runs go to DIR (its help); results/demo by default."""
    from lowrank_vit.repro import demo

    outputs = []
    monkeypatch.setattr(demo, "run_demo", lambda output, **kwargs: outputs.append(output) or {})
    assert cli(capsys, "demo", "--output", str(tmp_path / "mine"), "--quiet")[0] == 0
    assert cli(capsys, "demo", "--quiet")[0] == 0
    assert [str(o) for o in outputs] == [str(tmp_path / "mine"), os.path.join("results", "demo")]


# ------------------------------------------------------------------------------------------ the dense cache


def test_the_data_stamp_of_a_folder_of_splits_sees_a_class_folder_change(tmp_path):
    """A folder of splits (``train/<class>/``, ``validation/<class>/``): the stamp lists the class folders one level
    down by their relative names, and a file added to one changes it (the cached dense top-1 is then not reused)."""
    from lowrank_vit.cli.densecache import _data_stamp

    for split in ("train", "validation"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            (tmp_path / split / label / "0.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hello")
    rows = _data_stamp(tmp_path)
    assert [row[0] for row in rows] == [".", "notes.txt", "train", "train/a", "train/b", "validation",
                                        "validation/a", "validation/b"]
    assert rows[1][1] == 5  # a file's size
    before = {row[0]: row for row in rows}
    (tmp_path / "validation" / "b" / "1.png").write_bytes(b"y")
    os.utime(tmp_path / "validation" / "b", ns=(0, before["validation/b"][2] + 10**9))  # coarse clocks: move it
    after = {row[0]: row for row in _data_stamp(tmp_path)}
    assert after["validation/b"] != before["validation/b"]
    assert after["train/a"] == before["train/a"]


# ------------------------------------------------------------------------------------------------ the fine-tune


def _matching_stage(tmp_path: Path) -> tuple[Path, dict]:
    from lowrank_vit.cli.finetune import RESUME_FILE

    stage = tmp_path / ".out.partial"
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    run = {"input": "/somewhere/model", "data": "imgs", "augment": False, "finetune": {"lr": 0.001}}
    (stage / RESUME_FILE).write_text(json.dumps(run))
    return stage, run


@pytest.mark.parametrize("quiet", [False, True])
def test_resuming_a_finetune_says_so_unless_quiet(quiet, tmp_path, capsys):
    """The same fine-tune command after an interruption resumes from last.ckpt and says so on stderr; --quiet
    prints nothing there."""
    from lowrank_vit.cli.finetune import _resume_or_start

    stage, run = _matching_stage(tmp_path)
    _resume_or_start(argparse.Namespace(quiet=quiet), stage, run)
    err = capsys.readouterr().err
    assert err == ("" if quiet else f"resuming from {stage / 'checkpoints' / 'last.ckpt'}\n")


def _saved_compressed(path: Path) -> Path:
    from lowrank_vit import CompressionConfig, compress, save_compressed

    model = make_tiny_vit(seed=0)
    compress(model, [make_images(16, seed=1)], CompressionConfig(reduction=0.3, calib_samples=16, progress=False))
    return save_compressed(model, path)


def test_distilling_a_directory_that_does_not_record_its_source_says_what_to_do(tmp_path, capsys):
    """`finetune DIR --distill W` on a directory written by the library's save_compressed (no record of the model
    before compression): one line naming the directory, why, and what to do instead."""
    directory = _saved_compressed(tmp_path / "m")
    (tmp_path / "imgs").mkdir()
    code, _, err = cli(capsys, "finetune", str(directory), "--data", str(tmp_path / "imgs"), "--distill", "0.5",
                       "--epochs", "1", "--output", str(tmp_path / "out"), "--device", "cpu", "--quiet")
    assert code == 2
    assert one_line_error(err) == (f"lowrank-vit: error: --distill needs the model before compression, and directory "
                                   f"{directory} does not record it (lowrank-vit compress records it); fine-tune "
                                   f"without --distill")


def _compressed(reduction: float = 0.4):
    from lowrank_vit import CompressionConfig, compress

    model = make_tiny_vit(seed=0)
    compress(model, [make_images(32, seed=1)], CompressionConfig(reduction=reduction, calib_samples=32,
                                                                 progress=False))
    return model


def test_a_checkpoint_of_a_model_compressed_differently_names_the_layers_that_differ():
    """One layer's rank differs: the refusal counts one layer and shows both specs of that layer, no other."""
    from lowrank_vit.stages.finetune import PartialFinetune

    module = PartialFinetune(_compressed())
    saved = json.loads(json.dumps(module._fingerprint))
    name = sorted(saved["layers"])[0]
    ours = json.loads(json.dumps(saved["layers"][name]))
    saved["layers"][name]["rank"] = ours["rank"] + 1
    with pytest.raises(ValueError) as info:
        module.on_load_checkpoint({"lowrank_vit": saved, "state_dict": {}})
    assert str(info.value) == (f"the checkpoint was written for a model compressed differently (1 factorized layer(s) "
                               f"differ: {name}: checkpoint {json.dumps(saved['layers'][name])}, model "
                               f"{json.dumps(ours)})")


def test_the_finetunes_hyperparameters_name_the_model_and_say_whether_it_has_a_teacher():
    """What the logger records of a fine-tune (``hparams``): the timm name it fine-tunes, and whether a teacher (the
    model before compression) was given."""
    from lowrank_vit.stages.finetune import PartialFinetune

    model = _compressed()
    alone, taught = PartialFinetune(model), PartialFinetune(model, teacher=make_tiny_vit(seed=0))
    assert alone.hparams["model"] == taught.hparams["model"] == "vit_tiny_patch16_224"
    assert alone.hparams["teacher"] is False and taught.hparams["teacher"] is True


def test_a_checkpoint_of_another_architecture_is_refused_naming_both():
    from lowrank_vit.stages.finetune import PartialFinetune

    module = PartialFinetune(_compressed())
    with pytest.raises(ValueError) as info:
        module.on_load_checkpoint({"lowrank_vit": {"architecture": "swin_tiny_patch4_window7_224"}})
    assert str(info.value) == ("the checkpoint is of a 'swin_tiny_patch4_window7_224' model, this is a "
                               "'vit_tiny_patch16_224': wrong checkpoint")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_a_multi_process_finetune_averages_its_validation_loss_over_the_processes():
    """Under DDP (here one CPU process, gloo) the epoch's val/loss is reduced across the processes, as train/loss
    is: Lightning warns "It is recommended to use `self.log('val/loss', ..., sync_dist=True)`" when a figure is
    each process's own. The figure is the cross-entropy on the validation images, computed here by hand."""
    from torch.utils.data import DataLoader, TensorDataset

    from lowrank_vit.stages.finetune import finetune
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    model = _compressed()
    images, labels = make_images(8, seed=4), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    environ, threads = dict(os.environ), torch.get_num_threads()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, trainer = finetune(model, loader, loader, config=FinetuneConfig(epochs=1, lr=1e-3), accelerator="cpu",
                                  devices=1, strategy="ddp", limit_train_batches=1, progress=False,
                                  enable_model_summary=False)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)  # Lightning's MASTER_PORT, LOCAL_RANK, OMP_NUM_THREADS... not left to others
        torch.set_num_threads(threads)
    assert trainer.world_size == 1
    assert not [str(w.message) for w in caught if "sync_dist=True" in str(w.message)]
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model.eval()(images), labels)
    torch.testing.assert_close(trainer.callback_metrics["val/loss"], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- conversion


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


def test_an_image_size_that_does_not_fit_the_position_embeddings_is_refused_in_whole_patches():
    from lowrank_vit.io.convert import ConversionError, infer_kwargs

    tensors = {"patch_embed.proj.weight": torch.zeros(24, 3, 8, 8), "cls_token": torch.zeros(1, 1, 24),
               "pos_embed": torch.zeros(1, 1 + 24, 24)}
    assert infer_kwargs(tensors, [32, 55])["img_size"] == [32, 55]  # 4 x 6 patches, the last 7 pixels unused
    with pytest.raises(ConversionError) as info:
        infer_kwargs(tensors, [40, 55])
    assert str(info.value) == ("config.json's image_size [40, 55] and patch size 8 make 30 patches, the position "
                               "embeddings 24")


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


# ---------------------------------------------------------------------------------------------- files written


def test_the_rebuild_check_builds_the_name_it_is_given(tmp_path):
    """``check_rebuildable(model, model_name, model_kwargs)`` answers for those arguments, as save_compressed with
    them does: a distilled DeiT's name has tensors this ViT lacks (refused, named), a plain ViT name with these
    arguments rebuilds it."""
    from lowrank_vit import save_compressed
    from lowrank_vit.io.surgery import check_rebuildable

    model = _compressed()
    check_rebuildable(model, "vit_small_patch16_224", TINY_VIT)
    save_compressed(model, tmp_path / "ok", model_name="vit_small_patch16_224", model_kwargs=TINY_VIT)
    prefix = f"timm.create_model('deit_tiny_distilled_patch16_224', **{TINY_VIT}) does not rebuild this model"
    for check in (lambda: check_rebuildable(model, "deit_tiny_distilled_patch16_224", TINY_VIT),
                  lambda: save_compressed(model, tmp_path / "no", model_name="deit_tiny_distilled_patch16_224",
                                          model_kwargs=TINY_VIT)):
        with pytest.raises(ValueError) as info:
            check()
        assert prefix in str(info.value)


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


@pytest.fixture(scope="module")
def recompressed(tmp_path_factory) -> Path:
    """A dense model directory (as ``compress --recipe vmeanba`` leaves one: no factorized layer) that records the
    timm source it came from, compressed by ``compress DIR`` on the CPU."""
    import timm

    from lowrank_vit import save_compressed
    from lowrank_vit.cli.main import main

    root = tmp_path_factory.mktemp("recompressed")
    write_image_folder(root / "imgs", 3, 4, SIZE)
    torch.manual_seed(0)
    dense = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **KWARGS)
    source = {"timm_name": ARCH, "model_kwargs": {"img_size": SIZE, **KWARGS}, "pretrained": False,
              "checkpoint": "w.safetensors"}
    save_compressed(dense, root / "dense", metadata={"source": source, "preprocessing": {
        "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}})
    assert main(["compress", str(root / "dense"), "--data", str(root / "imgs"), "--workers", "0", "--calib-samples",
                 "8", "--reduction", "0.3", "--device", "cpu", "--output", str(root / "out"), "--quiet",
                 "--no-eval"]) == 0
    return root


def test_a_model_compressed_from_a_directory_records_where_that_came_from(recompressed):
    """report.json's and the plan's source: the input directory, and (``from``) the source that directory recorded,
    so the chain back to the first weights is kept."""
    first = json.loads((recompressed / "dense" / "lowrank_vit.json").read_text())["metadata"]["source"]
    report = json.loads((recompressed / "out" / "report.json").read_text())
    plan = json.loads((recompressed / "out" / "lowrank_vit.json").read_text())
    for source in (report["source"], plan["metadata"]["source"]):
        assert source["directory"] == str(recompressed / "dense") and source["from"] == first
    assert first["timm_name"] == ARCH


def test_the_report_records_the_device_the_compression_ran_on(recompressed):
    report = json.loads((recompressed / "out" / "report.json").read_text())
    assert report["device"] == "cpu" and report["compression"]["config"]["device"] == "cpu"


def test_a_checkpoint_that_carries_its_input_size_builds_the_model_at_it(place, tmp_path, capsys):
    """Without --input-size, a checkpoint's safetensors metadata ``input_size`` [3, 40, 40] builds the timm name at
    40 pixels (docs/cli.md: what the weights carry), not at the name's own 224 (whose position embeddings would not
    fit these weights)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=40, **KWARGS)
    save_file(model.state_dict(), str(tmp_path / "w40.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "input_size": "[3, 40, 40]"})
    code, _, err = cli(capsys, "evaluate", ARCH, "--checkpoint", str(tmp_path / "w40.safetensors"), "--model-kwargs",
                       json.dumps(KWARGS), "--data", str(place / "imgs"), "--workers", "0", "--latency-batches")
    assert code == 0, err
    line = next(line for line in err.splitlines() if line.startswith("preprocessing:"))
    assert line.startswith("preprocessing: input 3x40x40 (model), ")


def _report(**extra) -> dict:
    return {"source": {"architecture": "vim_tiny", "description": "timm vim_tiny"}, "recipe": "paper",
            "params": {"before": 1000, "after": 600}, "size_mib": {"before": 1.0, "after": 0.6}, "reduction": 0.4,
            "layers": [{"name": "blocks.0.mixer.in_proj", "in_features": 32, "out_features": 64, "rank": 8,
                        "factored_params": 768, "dense_params": 2048}], **extra}


def test_the_card_of_vmeanba_beside_a_low_rank_recipe_says_the_weights_changed():
    """`compress --recipe paper --vmeanba-blocks K`: the scans switched and the layers factorized. The card's first
    sentence is the low-rank one (the "no weight changed" one is for VMeanba alone)."""
    from lowrank_vit.io.modelcard import render_card

    vmeanba = {"chosen": ["layers.0"], "kl": 0.01}
    both = render_card(_report(vmeanba=vmeanba), "m")
    assert "is a low-rank product `U Vᵀ`" in both and "no weight changed" not in both
    alone = render_card(_report(vmeanba=vmeanba, layers=[]), "m")
    assert "no weight changed" in alone and "low-rank product" not in alone


def test_the_ranks_figure_is_titled_with_the_architecture(tmp_path):
    """ranks.png's title names the model: two reports that differ only in the architecture give different images
    (and one report the same image twice, so the difference is the title's)."""
    from lowrank_vit.io.modelcard import plot_ranks

    first = plot_ranks(_report(), tmp_path / "a.png").read_bytes()
    assert plot_ranks(_report(), tmp_path / "b.png").read_bytes() == first
    other = _report(source={"architecture": "vim_small"})
    assert plot_ranks(other, tmp_path / "c.png").read_bytes() != first


# ---------------------------------------------------------------------------------------------------- the data


def test_the_preprocessing_line_separates_its_fields_with_commas():
    """The line every command prints first, whole: each field, where it came from, ", " between them."""
    from lowrank_vit.cli.preprocessing import describe_preprocessing

    pre = {"input_size": (3, 32, 48), "mean": (0.485, 0.456, 0.406), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9,
           "interpolation": "bicubic"}
    origin = {"input_size": "model", "mean": "checkpoint", "std": "--std", "crop_pct": "timm config",
              "interpolation": "timm config"}
    assert describe_preprocessing(pre, origin) == (
        "preprocessing: input 3x32x48 (model), mean 0.485,0.456,0.406 (checkpoint), std 0.5,0.5,0.5 (--std), "
        "crop_pct 0.9 (timm config), interpolation bicubic (timm config)")


def test_training_images_are_not_augmented_unless_asked(tmp_path):
    """``augment=False`` (the fine-tune's default, ``--augment`` off): a training image is the evaluation transform
    of it, the same each time it is read (the calibration pool's); ``augment=True`` draws a new crop each time."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    write_image_folder(tmp_path / "imgs", 2, 4, 40)
    plain, augmented = (build_datamodule(DataConfig(path=str(tmp_path / "imgs"), img_size=16, batch_size=2,
                                                    calib_samples=2, augment=augment, cache_dir=str(tmp_path / "hf")))
                        for augment in (False, True))
    index = int(plain.calibration_indices[0])
    calibration_image = next(iter(plain.calibration_dataloader()))[0][0]
    first, again = plain.train_dataset[index][0], plain.train_dataset[index][0]
    assert torch.equal(first, again) and torch.equal(first, calibration_image)
    assert not torch.equal(augmented.train_dataset[index][0], augmented.train_dataset[index][0])


def test_a_validation_split_without_the_label_column_is_refused_naming_it(monkeypatch):
    """A hub dataset whose validation split has no label column (a test split published without its labels): the
    refusal names the split, the missing column and the columns it has, before any image is read."""
    import datasets
    from PIL import Image

    from lowrank_vit.stages.data import DataFormatError, build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(4)]
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0, 1]}, features=datasets.Features(
            {"img": datasets.Image(), "label": datasets.Value("int64")})),
        "validation": datasets.Dataset.from_dict({"img": images[:2]},
                                                 features=datasets.Features({"img": datasets.Image()}))})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: splits)
    dm = build_datamodule(DataConfig(name="someone/dataset", img_size=8, batch_size=2, num_workers=0))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert str(info.value) == ("the 'validation' split of 'someone/dataset' lacks column(s) ['label']; its columns "
                               "are ['img']")


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_are_kept_between_epochs(workers, tmp_path):
    """``num_workers`` > 0: the loaders keep their worker processes from one epoch (one evaluation) to the next
    rather than starting them again each time (``persistent_workers``); none to keep without workers."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    write_image_folder(tmp_path / "imgs", 2, 4, 16)
    dm = build_datamodule(DataConfig(path=str(tmp_path / "imgs"), img_size=16, batch_size=2, calib_samples=2,
                                     num_workers=workers, cache_dir=str(tmp_path / "hf")))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.calibration_dataloader()):
        assert loader.num_workers == workers and loader.persistent_workers is (workers > 0)


@pytest.mark.parametrize("size", [224.0, True, "224", 0])
def test_an_image_size_that_is_not_a_positive_integer_is_refused(size):
    from lowrank_vit.stages.data_config import DataConfig

    with pytest.raises(ValueError) as info:
        DataConfig(path="somewhere", img_size=size)
    assert str(info.value) == f"img_size must be a positive integer, got {size!r}"


# ------------------------------------------------------------------------------------------------ the allocation


@pytest.mark.parametrize("b_rank, exchanged", [(14, True), (15, False)])
def test_the_slack_exchange_may_raise_a_layer_to_its_largest_rank(b_rank, exchanged):
    """32 parameters unspent, a 16x16 layer (a rank costs 32) and a 32x32 one (64, largest rank 15: 15 x 64 < 1024):
    one rank less in the first and one more in the second spends them exactly, up to rank 15 and never past it."""
    from lowrank_vit.core.allocate import _exchange_slack, energy_tail_curve
    from lowrank_vit.core.budget import LayerBudget

    g = torch.Generator().manual_seed(0)
    a, b = (LayerBudget(name, n, n, 0, energy_tail_curve(torch.rand(n, generator=g, dtype=torch.float64)
                                                         .sort(descending=True).values))
            for name, n in (("a", 16), ("b", 32)))
    assert (a.rank_step, b.rank_step, b.max_rank) == (32, 64, 15)
    ranks = {"a": 5, "b": b_rank}
    total = 5 * 32 + b_rank * 64
    spent = _exchange_slack([a, b], ranks, total + 32, tolerance=0)
    if exchanged:
        assert spent == total + 32 and ranks == {"a": 4, "b": 15}
    else:
        assert spent == total and ranks == {"a": 5, "b": 15}


# --------------------------------------------------------------- defects the eighth run's survivors led to (fixed)


def test_the_finetunes_top1_is_the_fraction_of_images_right_on_an_imbalanced_split():
    """Twelve images of class 0 and one of each of classes 1-4, predicted 0 everywhere: top-1 is 12/16 = 0.75, the
    fraction right, not the mean of the five classes' recalls (1/5 = 0.2, torchmetrics' default "macro")."""
    from lowrank_vit import CompressionConfig, compress
    from lowrank_vit.stages.finetune import PartialFinetune

    model = make_tiny_vit(seed=0, num_classes=5)
    compress(model, [make_images(32, seed=1)], CompressionConfig(reduction=0.4, calib_samples=32, progress=False))
    module = PartialFinetune(model)
    labels = torch.tensor([0] * 12 + [1, 2, 3, 4])
    logits = torch.zeros(16, module.val_top1.num_classes)
    logits[:, 0] = 1.0
    for metric in (module.train_top1, module.val_top1, module.test_top1):
        metric.reset()
        assert float(metric(logits, labels)) == pytest.approx(0.75)


def test_a_parquet_validation_split_without_labels_is_refused_in_one_line(tmp_path, capsys):
    """A split published without labels gets an all-null label column when datasets reads the folder: refused at
    once, naming the split and how to choose another (it used to end in a TypeError inside the data loader)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def image(seed: int) -> dict:
        buffer = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    data = tmp_path / "d"
    data.mkdir()
    pq.write_table(pa.table({"img": [image(i) for i in range(8)], "label": [i % 2 for i in range(8)]}),
                   data / "train.parquet")
    pq.write_table(pa.table({"img": [image(100 + i) for i in range(4)]}), data / "validation.parquet")
    kwargs = {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 2}
    code, out, err = cli(capsys, "evaluate", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
                         json.dumps(kwargs), "--input-size", "8", "--data", str(data), "--workers", "0", "--quiet")
    assert code == 2
    assert one_line_error(err) == (f"lowrank-vit: error: the 'validation' split of '{data}' has 4 of 4 rows without a "
                                   f"label in column 'label' (labels withheld, as in a published test split): set "
                                   f"--val-split or --train-split to a labelled split")


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0), "meta"])
def test_a_saved_model_loads_onto_any_spelling_of_a_device(device, tmp_path):
    """``map_location`` as torch spells devices ("cpu:0" is ``str(torch.device("cpu", 0))``): the model loads there,
    with the weights it was saved with (it used to be called a corrupted file)."""
    from lowrank_vit.io.surgery import load_compressed, save_compressed

    model = _compressed()
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m", map_location=device)
    assert {p.device.type for p in loaded.parameters()} == {torch.device(device).type}
    if torch.device(device).type == "cpu":
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="device"):  # torch's own refusal of an unknown device, not "corrupted"
        load_compressed(tmp_path / "m", map_location="gpu")
