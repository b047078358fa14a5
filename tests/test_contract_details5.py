"""More details a user meets that the larger tests passed over, each found by a survivor of the tenth mutation run
(docs/mutation.md): the hardware flags reaching a registry row, the dense model's cache (which data it keys, its file
name, the device it evaluates on), an output directory written by the library's own save_compressed, a fine-tune
restarted before its first checkpoint or resumed with another checkpoint interval, the words of a few refusals,
``trainer.test`` on the fine-tune module, the per-tensor fake quantization of the QDQ export, and a torch checkpoint
that is never unpickled even where the environment asks torch to. Each is checked against what the docs promise or a
figure computed by hand, on tiny models (seconds)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import cli, make_tiny_vit
from test_contract_details import ARCH, KWARGS, SIZE, _compressed, _loader, _offline, place  # noqa: F401  (the same tiny ViT)

# ------------------------------------------------------------------------------------------------ the commands


def test_the_hardware_flags_reach_the_row_that_runs(capsys, monkeypatch, tmp_path):
    """`lowrank-vit run NAME --devices 2 --num-nodes 3 --accelerator cpu`: the row runs with those, as typed."""
    from lowrank_vit.repro import runner

    seen = {}
    monkeypatch.setattr(runner, "run_row", lambda exp, scale, **kw: seen.update(kw, name=exp.name, scale=scale))
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "smoke", "--devices", "2", "--num-nodes",
                       "3", "--accelerator", "cpu", "--output", str(tmp_path), "--quiet")
    assert code == 0, err
    assert (seen["name"], seen["scale"]) == ("table2/deit_s/ours-50", "smoke")
    assert (seen["devices"], seen["num_nodes"], seen["accelerator"]) == (2, 3, "cpu")
    assert seen["progress"] is False and seen["output"] == str(tmp_path)


def _source(architecture: str = ARCH):
    from lowrank_vit.cli.sources import Source

    return Source(torch.nn.Identity(), architecture, f"timm {architecture}, your checkpoint",
                  record={"timm_name": ARCH, "model_kwargs": KWARGS, "checkpoint_sha256": "ab" * 32})


def _cache_args(data: str) -> argparse.Namespace:
    return argparse.Namespace(data=data, limit=None, train_split="train", val_split=None, image_column=None,
                              label_column=None)


def test_the_dense_cache_key_names_the_data_it_was_measured_on(tmp_path):
    """A local folder is keyed by its absolute path (two copies of one folder are two entries), a dataset name by
    the name as typed."""
    from lowrank_vit.cli.densecache import _dense_cache_entry

    folder = tmp_path / "imgs"
    folder.mkdir()
    cpu = torch.device("cpu")
    _, key = _dense_cache_entry(_cache_args(str(folder)), _source(), {}, cpu)
    assert key["data"]["path"] == str(folder.resolve())
    _, key = _dense_cache_entry(_cache_args("someone/dataset"), _source(), {}, cpu)
    assert key["data"] == {"name": "someone/dataset"}


def test_the_dense_cache_file_is_named_after_the_architecture_made_safe(tmp_path):
    """The file name starts with the architecture, each character a file name cannot safely hold replaced by one
    underscore, then a 24-digit hex digest."""
    import re

    from lowrank_vit.cli.densecache import _dense_cache_entry

    path, _ = _dense_cache_entry(_cache_args("someone/dataset"), _source("hf-hub:timm/vit tiny"), {},
                                 torch.device("cpu"))
    assert re.fullmatch(r"hf-hub_timm_vit_tiny-[0-9a-f]{24}\.json", path.name), path.name


def test_the_dense_model_is_evaluated_on_the_device_the_command_chose(monkeypatch, tmp_path):
    from lowrank_vit.cli import densecache

    seen = []
    monkeypatch.setattr(densecache, "_dense_cache_entry", lambda *a: None)
    monkeypatch.setattr(densecache, "evaluate_on_user_data",
                        lambda model, dm, device, args, desc: seen.append(device) or {})
    device = torch.device("meta")
    densecache.cached_dense_accuracy(argparse.Namespace(no_cache=False), _source(), {}, torch.nn.Identity(), None,
                                     device)
    assert seen == [device]


def test_an_output_written_by_save_compressed_is_described_by_its_architecture(tmp_path):
    """A model directory the library's save_compressed wrote (no record of where the model came from) is still
    named in the refusal to overwrite it."""
    from lowrank_vit import save_compressed
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.outputs import check_output_dir

    out = save_compressed(_compressed(), tmp_path / "m")
    with pytest.raises(UserError) as info:
        check_output_dir(out, force=False)
    assert str(info.value) == (f"--output {str(out)!r} already holds a model (vit_tiny_patch16_224): give --force "
                               f"to replace it, or another directory")


# ------------------------------------------------------------------------------------------------- the fine-tune


def test_a_finetune_stopped_before_its_first_checkpoint_starts_over_in_the_same_stage(tmp_path):
    """The staging directory of a run interrupted before any checkpoint exists (with its record): the same command
    starts over there, recording the run it now is."""
    from lowrank_vit.cli.finetune import RESUME_FILE, _resume_or_start

    stage = tmp_path / ".out.partial"
    (stage / "checkpoints").mkdir(parents=True)
    (stage / RESUME_FILE).write_text(json.dumps({"input": "/old"}))
    run = {"input": "/m", "data": "/d", "augment": False, "finetune": {"lr": 1e-4}}
    _resume_or_start(argparse.Namespace(quiet=True), stage, run)
    assert json.loads((stage / RESUME_FILE).read_text()) == run


def test_the_checkpoint_interval_is_not_part_of_what_makes_a_finetune_the_same_run(tmp_path):
    """Like --epochs and --max-steps, --checkpoint-every may differ when an interrupted run is resumed."""
    from lowrank_vit.cli.finetune import _finetune_run
    from lowrank_vit.io.surgery import WEIGHTS_FILE
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    (tmp_path / WEIGHTS_FILE).write_bytes(b"weights")
    args = argparse.Namespace(data="someone/dataset", augment=False)
    runs = [_finetune_run(args, tmp_path, FinetuneConfig(epochs=1, checkpoint_every_n_steps=every))
            for every in (50, 500)]
    assert runs[0] == runs[1]
    assert "lr" in runs[0]["finetune"]


def test_trainer_test_reports_the_fraction_of_images_right():
    """`Trainer.test(PartialFinetune(model), loader)` logs test/top1 as the fraction of images whose top class is
    the label (counted here by hand)."""
    import lightning as L

    from lowrank_vit.stages.finetune import PartialFinetune

    model = _compressed()
    loader = _loader()
    with torch.no_grad():
        right = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    total = sum(len(y) for _, y in loader)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (metrics,) = trainer.test(PartialFinetune(model), loader, verbose=False)
    assert metrics["test/top1"] == pytest.approx(right / total, abs=1e-6)


def test_the_finetune_runs_on_one_node_unless_told(monkeypatch):
    """The Trainer is built for one node by default (two would wait for a second machine that never comes)."""
    from lowrank_vit.stages import finetune as stage
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    class Built(Exception):
        pass

    def trainer(**options):
        raise Built(options)

    monkeypatch.setattr(stage.L, "Trainer", trainer)
    with pytest.raises(Built) as info:
        stage.finetune(_compressed(), _loader(), config=FinetuneConfig(epochs=1), accelerator="cpu", devices=1,
                       progress=False)
    assert info.value.args[0]["num_nodes"] == 1


# -------------------------------------------------------------------------------------------------- the words


def test_an_unknown_architecture_with_nothing_close_points_to_timms_list():
    from lowrank_vit.cli.sources import _suggest

    assert _suggest("qqqqqqqqqqqq") == "; see timm.list_models()"


def test_a_message_of_exactly_the_limit_is_kept_whole():
    from lowrank_vit.stages.data_config import one_line

    assert one_line("a" * 10, limit=10) == "a" * 10
    assert one_line("a" * 11, limit=10) == "a" * 7 + "..."


def test_val_labels_without_a_validation_folder_says_where_to_put_the_images(tmp_path):
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError
    from lowrank_vit.stages.data_readers import flat_val_dir

    (tmp_path / "train").mkdir()
    with pytest.raises(DataFormatError) as info:
        flat_val_dir(tmp_path, DataConfig(path=str(tmp_path), val_split="val", val_labels="labels.txt"))
    assert str(info.value) == (f"val_labels= is the ground truth of a flat validation folder, but {str(tmp_path)!r} "
                               f"has none of ['val']: put the validation images in {str(tmp_path / 'val')!r}")


# ------------------------------------------------------------------------------------------------------ the files


def test_the_per_tensor_fake_quantization_rounds_onto_its_own_8bit_grid():
    """`_FakeQuantize` with no channel axis: q = clamp(round(w / s) + z, 0, 255), w' = (q - z) s, by hand."""
    from lowrank_vit.io.export import _FakeQuantize

    scale, zero = 0.5, 3
    weight = torch.tensor([[-3.0, -1.26, 0.0], [0.74, 100.0, 200.0]])
    by_hand = (torch.clamp(torch.round(weight / scale) + zero, 0, 255) - zero) * scale
    fake = _FakeQuantize(torch.tensor([scale]), torch.tensor([zero]), axis=None)
    assert torch.equal(fake(weight), by_hand)
    assert by_hand.max().item() == (255 - zero) * scale  # the top code is 255, not 256


class _Ran:
    ran = False


def _mark_ran() -> str:
    _Ran.ran = True
    return "ran"


class _Payload:
    def __reduce__(self):
        return _mark_ran, ()


def test_a_torch_checkpoint_is_never_unpickled_even_where_the_environment_asks_torch_to(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch.load's default to full unpickling; the library asks for
    weights only explicitly, so a file naming code is still refused and the code never runs."""
    from lowrank_vit.io.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "w.pt"
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, str(path))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _Ran.ran = False
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors"):
        read_state_dict(path)
    assert _Ran.ran is False


def test_an_empty_training_split_is_named_as_the_training_split(tmp_path):
    """(Reached with a split that loads and holds nothing: what the loaders gave is replaced here.)"""
    from types import SimpleNamespace

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, EmptySplitError

    dm = build_datamodule(DataConfig(path=str(tmp_path), img_size=8, batch_size=2, num_workers=0))
    dm._build = lambda: SimpleNamespace(train=[], val=[0], train_eval=[])
    with pytest.raises(EmptySplitError) as info:
        dm.setup()
    assert str(info.value) == f"the training split of {str(tmp_path)!r} has no images"


def test_an_unreadable_dataset_quotes_at_most_200_characters_of_the_reason(tmp_path, monkeypatch):
    import datasets

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError

    def refuse(*args, **kwargs):
        raise ValueError("x" * 500)

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    (tmp_path / "data").mkdir()
    dm = build_datamodule(DataConfig(path=str(tmp_path / "data"), img_size=8, batch_size=2, num_workers=0))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert str(info.value) == f"could not read {str(tmp_path / 'data')!r}: {'x' * 197}..."


def test_val_labels_given_as_a_path_is_kept_as_its_text(tmp_path):
    from lowrank_vit.stages.data_config import DataConfig

    cfg = DataConfig(path=str(tmp_path), val_labels=tmp_path / "labels.txt")
    assert cfg.val_labels == str(tmp_path / "labels.txt")


def test_a_checkpoint_without_normalization_is_refused_even_by_a_command_without_preprocessing_flags():
    """`finetune` has no --preprocessing flag; a model that records a checkpoint but carries no mean and std is
    still refused in words, never guessed (nor an AttributeError)."""
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.preprocessing import resolve_model_preprocessing
    from lowrank_vit.cli.sources import Source

    source = Source(make_tiny_vit(seed=0), ARCH, "a model", record={"checkpoint": "w.pt"})
    with pytest.raises(UserError, match=r"^--checkpoint w\.pt carries no mean or std: give the values"):
        resolve_model_preprocessing(source, argparse.Namespace())


def test_a_pattern_finer_than_the_model_input_comes_out_grey():
    """A one-pixel checkerboard shrunk threefold is averaged (antialiased), not sampled back into black and white."""
    from lowrank_vit.stages.data_transforms import TensorImageTransform

    board = (torch.arange(48)[:, None] + torch.arange(48)[None, :]) % 2 * 255
    out = TensorImageTransform((1, 16, 16), (0.0,), (1.0,))(board[None].to(torch.uint8))
    assert out.shape == (1, 16, 16)
    assert (out - 0.5).abs().max().item() < 0.1


@pytest.mark.parametrize("shape", [(0, 0), (5,), (0, 4, 3)])
def test_an_array_of_no_pixels_or_the_wrong_rank_is_refused_naming_its_shape(shape):
    import numpy as np

    from lowrank_vit.stages.data_config import DataFormatError
    from lowrank_vit.stages.data_transforms import to_pil

    with pytest.raises(DataFormatError) as info:
        to_pil(np.zeros(shape, dtype=np.float32))
    assert str(info.value) == f"cannot read an image from an array of shape {shape}"


# -------------------------------------------------------------------------------------------- the allocation


def test_a_greedy_setting_out_of_range_is_refused_by_its_name():
    from lowrank_vit.core.allocate import GreedySettings

    with pytest.raises(ValueError) as info:
        GreedySettings(greedy_iterations=0)
    assert str(info.value) == "greedy_iterations must be a positive integer, got 0"


def _layer(name, fin, fout, z, losses):
    from lowrank_vit.core.budget import LayerBudget

    return LayerBudget(name, fin, fout, z, torch.tensor(losses))


def test_the_greedy_final_cut_hits_the_budget_rather_than_overshoot_it_by_one():
    """With no schedule left (iterations=0), the one cut asked for is 5 parameters: layer b removes exactly 5
    (rank 3 of 5x10), layer a would remove 6 (rank 3 of 8x8 with a 10-parameter Z) at a lower loss. The default
    tolerance of 0 takes the exact cut: params a 64 + b 45 = 109, the budget."""
    from lowrank_vit.core.allocate import allocate_greedy

    a = _layer("a", 8, 8, 10, [1, .5, .1, .01, 0, 0, 0, 0, 0])
    b = _layer("b", 5, 10, 0, [1, .9, .7, .5, .2, 0])
    result = allocate_greedy([a, b], 109, iterations=0)
    assert result.ranks == {"a": None, "b": 3}
    assert result.params == 109


def test_the_greedy_schedule_starts_at_its_first_step():
    """The first cut follows eq. (9) at t = 1: the count it reaches is at most the schedule's value there."""
    from lowrank_vit.core.allocate import allocate_greedy, schedule

    layers = [_layer(f"l{i}", 64, 48 + 16 * i, 0, torch.linspace(1, 0, 49).tolist()) for i in range(3)]
    start = sum(layer.dense_params for layer in layers)
    result = allocate_greedy(layers, start // 2, gamma=10.0)
    first = result.trace[0]
    assert first["step"] == 1
    assert first["params"] <= schedule(1, start, start // 2, 10.0)


def test_a_compress_without_a_low_rank_step_passes_the_checks_before_the_data(monkeypatch):
    """`compress --recipe vmeanba` has no compression config (None): the checks made before any data is read
    (latency table, target, rebuild) pass it through rather than read a field of nothing."""
    from lowrank_vit.cli import compress as usercli
    from lowrank_vit.cli.sources import Source

    source = Source(make_tiny_vit(seed=0), ARCH, "a model")
    monkeypatch.setattr(usercli, "load_source", lambda args: source)
    checked = usercli._compressible_source(argparse.Namespace(model="m"), None, None, torch.device("cpu"))
    assert checked == (source, None)


def test_distilling_from_a_model_compressed_from_random_weights_is_refused_with_what_to_do():
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.sources import Source, load_teacher

    source = Source(torch.nn.Identity(), ARCH, "directory out/m",
                    metadata={"source": {"timm_name": ARCH, "pretrained": False, "checkpoint": None}})
    with pytest.raises(UserError) as info:
        load_teacher(argparse.Namespace(teacher_checkpoint=None), source)
    assert str(info.value) == ("--distill: directory out/m was compressed from random weights, which cannot be "
                               "rebuilt; fine-tune without --distill")


def test_a_float_image_on_the_unit_scale_with_a_white_pixel_is_scaled_to_255():
    """Floats in [0, 1] whose brightest pixel is exactly 1.0 (white) are on the unit scale: scaled by 255."""
    import numpy as np

    from lowrank_vit.stages.data_transforms import to_pil

    pixels = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)
    assert np.asarray(to_pil(pixels)).tolist() == [[0, 127], [63, 255]]
