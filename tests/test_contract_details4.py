"""More details a user meets that the larger tests passed over, each found by a survivor of the ninth mutation run
(docs/mutation.md): the words of a bad --model-kwargs, a non-square input and a float16 fine-tune off a GPU, the
square image size the data loaders get, what ``reproduce --dry-run`` checks a finished row against, the dense
model's cache (a model directory's weights key it; --quiet keeps its note off stderr), the description of
pretrained weights, the frozen teacher, a distilled DeiT's averaged heads, the fine-tune's checkpoint names and
learning-rate log, and the ONNX opset asked for. Each is checked against what the docs promise or a figure computed
by hand, on tiny models (seconds)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT, cli, make_images, make_tiny_vit
from test_contract_details import ARCH, KWARGS, SIZE, _offline, _parquet, place  # noqa: F401  (the same tiny ViT)

# ------------------------------------------------------------------------------------------------ the commands


def test_a_model_kwargs_that_is_not_json_says_so_and_shows_it(capsys):
    """`--model-kwargs '{nope'`: argparse's one line names the flag, says it is not JSON and why, and quotes it."""
    with pytest.raises(SystemExit) as info:
        cli(capsys, "compress", ARCH, "--model-kwargs", "{nope", "--reduction", "0.3")
    assert info.value.code == 2
    assert capsys.readouterr().err == ("lowrank-vit compress: error: argument --model-kwargs: not JSON (Expecting "
                                       "property name enclosed in double quotes): '{nope'\n")


def _data_args(data: Path) -> argparse.Namespace:
    return argparse.Namespace(workers=0, data=str(data), image_column="image", label_column="label",
                              train_split="train", val_split="validation", batch_size=4)


def test_a_model_of_non_square_input_is_refused_naming_its_size(tmp_path):
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.data import _data_config

    pre = {"input_size": (3, 32, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(UserError) as info:
        _data_config(_data_args(tmp_path), pre, calib_samples=8)
    assert str(info.value) == "the data loaders take square images; the model takes 32x16"


def test_the_data_loaders_take_the_models_square_size_and_channels(tmp_path):
    from lowrank_vit.cli.data import _data_config

    pre = {"input_size": (1, 24, 24), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0}
    cfg = _data_config(_data_args(tmp_path), pre, calib_samples=8)
    assert (cfg.img_size, cfg.in_chans) == (24, 1)


def test_float16_autocast_off_a_gpu_is_refused_with_what_to_use():
    from lowrank_vit.stages.finetune_config import check_precision_on

    with pytest.raises(ValueError) as info:
        check_precision_on("16-mixed", "cpu")
    assert str(info.value) == ("finetune precision 16-mixed needs a GPU (float16 autocast is CUDA's); use bf16-mixed "
                               "or 32-true on a CPU")


def test_a_dry_run_checks_each_row_against_its_own_configuration(capsys, monkeypatch, tmp_path):
    """`reproduce --dry-run`: a row is "finished, skipped" when its result was made with the very config the row
    would run now (runner.finished is given that config, the one row_config builds)."""
    from lowrank_vit.repro import runner

    seen = []

    def finished(exp, cfg, output):
        seen.append((exp, cfg))
        return {"name": exp.name}

    monkeypatch.setattr(runner, "finished", finished)
    code, out, err = cli(capsys, "reproduce", "table2", "--rows", "table2/deit_s/ours-50", "--scale", "smoke",
                         "--dry-run", "--output", str(tmp_path))
    assert code == 0, err
    assert out == "table2/deit_s/ours-50: finished, skipped\n"
    ((exp, cfg),) = seen
    assert cfg is not None and cfg.to_dict() == runner.row_config(exp, "smoke", []).to_dict()


# ------------------------------------------------------------------------------------------ the dense cache


def test_a_model_directorys_weights_key_the_dense_cache_by_their_digest(tmp_path):
    """A model directory: the dense accuracy is cached under the SHA-256 of its model.safetensors."""
    from types import SimpleNamespace

    from lowrank_vit.cli.densecache import _weights_sha256

    (tmp_path / "model.safetensors").write_bytes(b"some weights")
    source = SimpleNamespace(record={"directory": str(tmp_path)})
    assert _weights_sha256(source) == hashlib.sha256(b"some weights").hexdigest()
    assert _weights_sha256(SimpleNamespace(record={"directory": str(tmp_path / "none")})) is None


@pytest.mark.parametrize("quiet", [False, True])
def test_a_reused_dense_accuracy_is_said_unless_quiet(quiet, capsys, monkeypatch, tmp_path):
    from lowrank_vit.cli import densecache

    where = tmp_path / "entry.json"
    monkeypatch.setattr(densecache, "_dense_cache_entry", lambda *a: (where, {}))
    monkeypatch.setattr(densecache, "_read_cached_accuracy", lambda *a: {"top1": 12.345})
    args = argparse.Namespace(quiet=quiet, no_cache=False)
    metrics, path = densecache.cached_dense_accuracy(args, None, {}, None, None, torch.device("cpu"))
    assert (metrics, path) == ({"top1": 12.345}, where)
    err = capsys.readouterr().err
    assert err == ("" if quiet else f"dense model: top-1 12.35% reused from the cache ({where}); --no-cache "
                                    f"evaluates it again\n")


def test_timms_pretrained_weights_are_described_as_pretrained(monkeypatch):
    from lowrank_vit.cli import sources
    from lowrank_vit.repro import models

    monkeypatch.setattr(sources, "_check_offline_weights", lambda *a: None)
    monkeypatch.setattr(models, "build_model", lambda cfg, progress=True: make_tiny_vit(seed=0))
    args = argparse.Namespace(model=ARCH, model_kwargs={}, checkpoint=None, input_size=None, no_pretrained=False,
                              quiet=True)
    assert sources.timm_source(args).description == f"timm {ARCH}, pretrained"
    args.no_pretrained = True
    assert sources.timm_source(args).description == f"timm {ARCH}, random weights"


# ------------------------------------------------------------------------------------------------ the fine-tune


def _compressed(name: str = "vit_tiny_patch16_224"):
    import timm

    from lowrank_vit import CompressionConfig, compress

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TINY_VIT).eval()
    compress(model, [make_images(32, seed=1)], CompressionConfig(reduction=0.4, calib_samples=32, progress=False))
    return model


def test_the_teacher_stays_frozen():
    """The model before compression is a fixed target: none of its parameters is trained."""
    from lowrank_vit.stages.finetune import PartialFinetune

    teacher = make_tiny_vit(seed=0)
    PartialFinetune(_compressed(), teacher=teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_a_distilled_deit_predicts_with_its_two_heads_averaged():
    """A distilled DeiT trains its two heads apart; the fine-tune's prediction (validation, test) is their average."""
    from lowrank_vit.stages.finetune import PartialFinetune

    module = PartialFinetune(_compressed("deit_tiny_distilled_patch16_224")).train()
    images = make_images(3, seed=2)
    with torch.no_grad():
        cls, dist = module.model(images)
        out = module(images)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, (cls + dist) / 2)


def test_the_finetune_names_its_epoch_checkpoints_and_logs_the_learning_rate_per_step(tmp_path):
    """checkpoint_dir holds ``epochNNN.ckpt`` (the newest epoch) and ``last.ckpt``; with a logger, the learning rate
    is logged every step."""
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lowrank_vit.stages.finetune import finetune
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    g = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(make_images(8, seed=4), torch.randint(0, 10, (8,), generator=g)), batch_size=4)
    logger = CSVLogger(str(tmp_path / "logs"), name="run", version=0)
    finetune(_compressed(), loader, config=FinetuneConfig(epochs=1, lr=1e-3), logger=logger,
             checkpoint_dir=str(tmp_path / "ckpt"), accelerator="cpu", devices=1, progress=False,
             enable_model_summary=False, log_every_n_steps=1)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    lines = (tmp_path / "logs" / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    lr = [name for name in lines[0].split(",") if name.startswith("lr-")]
    assert lr, lines[0]
    column = lines[0].split(",").index(lr[0])
    assert sum(1 for line in lines[1:] if line.split(",")[column]) == 2  # two steps, one figure each


# ------------------------------------------------------------------------------------------------ the export


def test_the_onnx_file_has_the_opset_asked_for(tmp_path):
    import onnx

    from lowrank_vit.io.export import DEFAULT_OPSET, export_onnx

    opset = 16 if DEFAULT_OPSET != 16 else 15
    path = export_onnx(_compressed(), tmp_path / "m.onnx", (1, 28, 28), opset=opset)
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset


# ------------------------------------------------------------------------------------------------ the data


def test_a_missing_data_path_says_what_to_give(tmp_path):
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        build_datamodule(DataConfig(path=str(missing), img_size=8, batch_size=2, num_workers=0)).setup()
    assert str(info.value) == (f"no dataset at {str(missing)!r}: give path= a parquet file, a directory of parquet "
                               f"files, or an image folder (one subfolder per class), or name= a Hugging Face hub "
                               f"dataset")


def test_a_label_column_the_data_lacks_is_refused_naming_the_data(tmp_path):
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    _parquet(tmp_path / "d" / "train.parquet", [0, 1])
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0,
                                     label_column="nope", cache_dir=str(tmp_path / "hf")))
    with pytest.raises(ValueError) as info:
        dm.setup()
    assert str(info.value) == (f"{str(tmp_path / 'd')!r} has no label column 'nope'; its columns are ['img', "
                               f"'label']: set label_column= to one of them")


def test_an_empty_datas_reason_is_cut_to_200_characters(tmp_path, monkeypatch):
    """The reason `datasets` gives for data with no rows is quoted on the one line, cut to 200 characters."""
    import datasets

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    reason = "corresponds to no data " + "x" * 300

    def load_dataset(*args, **kwargs):
        raise ValueError(reason)

    (tmp_path / "d").mkdir()
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError) as info:
        dm.setup()
    assert str(info.value) == f"{str(tmp_path / 'd')!r} has no images ({reason[:197]}...)"


# ------------------------------------------------------------------------------------------------ the allocation


def _two_layers():
    from lowrank_vit.core.budget import LayerBudget

    return [LayerBudget("a", 20, 20, 0, 100 * torch.tensor([2.0 ** -k for k in range(21)])),
            LayerBudget("b", 20, 21, 0, 100 * torch.tensor([3.0 ** -k for k in range(21)]))]


def test_the_marginal_allocation_spends_the_budget_to_the_parameter_where_steps_allow():
    """Rank steps of 40 and 41 parameters can spend 203 exactly (2 x 40 + 3 x 41): by default (tolerance 0) nothing
    is left unspent, even one parameter."""
    from lowrank_vit.core.allocate import allocate_marginal

    allocation = allocate_marginal(_two_layers(), 203)
    assert allocation.params == 203 == 2 * 40 + 3 * 41
    assert allocation.ranks == {"a": 2, "b": 3}


def test_non_finite_energies_are_refused_with_the_likely_cause():
    from lowrank_vit.core.allocate import allocate_marginal
    from lowrank_vit.core.budget import LayerBudget

    layer = LayerBudget("a", 20, 20, 0, torch.full((21,), float("inf")))
    with pytest.raises(RuntimeError) as info:
        allocate_marginal([layer], 200)
    assert str(info.value) == "marginal allocation: no price meets the budget (non-finite energies?)"


# ------------------------------------------------------------------------------------------------ saving


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


def test_a_target_below_the_parameters_kept_says_it_leaves_none():
    """A target smaller than the parameters outside the compressible layers leaves them a negative count: the
    refusal says "none" and why, not a negative number. Rank 1 of a 20 x 20 layer costs 20 + 20 = 40."""
    from lowrank_vit.core.allocate import check_feasible

    with pytest.raises(ValueError) as info:
        check_feasible(_two_layers()[:1], -5)
    assert str(info.value) == ("the target is unreachable: even rank 1 in every compressible layer (with its Z) needs "
                               "40 parameters there, and the target leaves none (it is below the parameters kept as "
                               "they are)")
