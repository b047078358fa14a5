"""More details a user meets that the larger tests passed over, each found by a survivor of the twelfth to fourteenth
mutation runs or the exhaustive run of the dense cache and the compression flow (docs/mutation.md): where a dry run
looks for finished rows, an output whose parents do not exist yet, the hub cache and revision a lookup reads, the
split of a labelled set without a validation split, timm's crop mode, the labels' type, the dense cache's key,
compress_model's steps, and options reaching the compression the right way round. Each is checked against what the
docs promise or a truth computed independently, on tiny inputs (seconds)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_contract_details5 import _cache_args, _source

from conftest import cli
from test_contract_details import (  # noqa: F401  (_offline, place: fixtures; the same tiny ViT and images)
    ARCH,
    KWARGS,
    _compress_argv,
    _compressed,
    _loader,
    _offline,
    _parquet,
    place,
)

# ------------------------------------------------------------------------------------------------ the commands


@pytest.mark.parametrize("scale", ["full", "smoke"])
def test_a_dry_run_without_output_looks_where_the_scales_results_go(scale, capsys, monkeypatch, tmp_path):
    """`reproduce --dry-run` without --output checks the directory the run itself would write: results/ for the
    full scale, results/smoke/ for the smoke one (docs: the two never overwrite each other)."""
    from lowrank_vit.repro import runner

    seen = []
    monkeypatch.setattr(runner, "finished", lambda exp, cfg, output: seen.append(output))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "reproduce", "table2", "--rows", "table2/deit_s/ours-50", "--scale", scale,
                         "--dry-run")
    assert code == 0, err
    assert out == "table2/deit_s/ours-50: would run\n"
    assert seen == [Path("results") if scale == "full" else Path("results", "smoke")]


def test_compress_writes_an_output_whose_parents_do_not_exist_yet(place, tmp_path, capsys):  # noqa: F811
    """`--output runs/today/deit-50`, neither folder there yet: made, as `mkdir -p` would, not an OSError."""
    out = tmp_path / "runs" / "today" / "deit-50"
    code, _, err = cli(capsys, *_compress_argv(place, out, "--quiet", "--no-eval"))
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["deit-50"]  # the staging folder is gone


# ------------------------------------------------------------------------------------------------------ the hub


def _hub_cache(root: Path, repo: str, filename: str) -> Path:
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/<file>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    path = repo_dir / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    return path


def test_a_cached_file_is_found_in_the_cache_directory_asked_for(tmp_path, monkeypatch):
    """`cache_dir` (timm's `cache_dir` model argument) is where the lookup reads, not the default cache."""
    from lowrank_vit.io.hub import cached_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "default"))
    (tmp_path / "default").mkdir()
    path = _hub_cache(tmp_path / "mine", "someone/tiny-vit", "model.safetensors")
    assert cached_file("someone/tiny-vit", ["open_clip_model.safetensors", "model.safetensors"],
                       cache_dir=tmp_path / "mine") == path
    assert cached_file("someone/tiny-vit", ["model.safetensors"]) is None  # the default cache does not hold it


# ------------------------------------------------------------------------------------------------------ the data


def test_a_stratified_split_holds_out_the_first_of_each_class_in_the_seeds_order():
    """Without a validation split, the held-out images of each class are the first round(fraction * n_c) of that
    class in the order of the seed's permutation, on any machine: computed here class by class in plain Python. (An
    unstable sort would pick others: torch's unstable CPU sort reorders ties at this size.)"""
    from lowrank_vit.stages.data_readers import stratified_split

    labels = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(7)).tolist()
    held = []
    for c in range(3):
        members = [i for i in perm if labels[i] == c]
        held += members[:round(0.25 * len(members))]
    train, val = stratified_split(labels, 0.25, seed=7)
    assert val.tolist() == sorted(held)
    assert train.tolist() == sorted(set(range(200)) - set(held))


def test_labels_are_read_as_int64_whatever_integer_type_the_file_stores(tmp_path):
    """`label_array` promises int64 (uint8 labels cannot hold the -1 an empty split's maximum starts from)."""
    import datasets

    from lowrank_vit.stages.data_readers import label_array

    for dtype in ("uint8", "int16", "int32"):
        ds = datasets.Dataset.from_dict({"label": [0, 2, 1]}, features=datasets.Features({"label":
                                                                                          datasets.Value(dtype)}))
        labels = label_array(ds, "label")
        assert labels.dtype == np.int64 and labels.tolist() == [0, 2, 1]


def test_timms_squash_crop_mode_keeps_the_whole_width_of_the_image():
    """`crop_mode: squash` (a model's pretrained config may say so) resizes the whole image to the model's size; the
    default center crop of a 4:1 image keeps its middle quarter. Four vertical stripes tell them apart: the first
    output column is the first stripe's colour when squashed and the second's when center-cropped."""
    from PIL import Image

    from lowrank_vit.stages.data_transforms import create_transforms

    stripes = np.zeros((16, 64, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    for i, colour in enumerate(colours):
        stripes[:, 16 * i:16 * (i + 1)] = colour
    image = Image.fromarray(stripes)
    base = {"input_size": (3, 16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3, "crop_pct": 1.0,
            "interpolation": "bilinear"}
    for mode, first in (("squash", colours[0]), ("center", colours[1])):
        _, eval_tf = create_transforms({**base, "crop_mode": mode}, augment=False)
        column = eval_tf(image)[:, 8, 0]
        assert column.tolist() == pytest.approx([v / 255 for v in first], abs=0.02), mode


def test_a_cached_file_is_found_at_the_revision_asked_for(tmp_path):
    """`revision` (a pinned commit of a hub model) reads that snapshot, not the branch's newest."""
    from lowrank_vit.io.hub import cached_file

    newest = _hub_cache(tmp_path, "someone/tiny-vit", "model.safetensors")
    pinned = newest.parents[1] / ("f" * 40) / "model.safetensors"
    pinned.parent.mkdir()
    pinned.write_text("{}")
    assert cached_file("someone/tiny-vit", ["model.safetensors"], cache_dir=tmp_path) == newest
    assert cached_file("someone/tiny-vit", ["model.safetensors"], revision="f" * 40, cache_dir=tmp_path) == pinned


# ------------------------------------------------------------------------------------------- the model's source


def _hub_args():
    return argparse.Namespace(model="hf-hub:someone/tiny-vit")


def test_a_hub_repository_that_is_no_model_directory_gets_timms_own_refusal(monkeypatch, tmp_path):
    """`hf-hub:owner/name` downloaded, but without lowrank_vit.json, and timm refuses the name too: timm's refusal
    is the error, as it is (the hub's download did not fail, so there is no hub reason to quote)."""
    from lowrank_vit.cli import sources
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.io import hub

    def timm_refuses(args):
        raise UserError("timm has no model 'hf-hub:someone/tiny-vit'")

    monkeypatch.setattr(hub, "download", lambda reference: tmp_path)  # reached: an empty snapshot
    monkeypatch.setattr(sources, "timm_source", timm_refuses)
    with pytest.raises(UserError) as info:
        sources.load_source(_hub_args())
    assert str(info.value) == "timm has no model 'hf-hub:someone/tiny-vit'"


def test_an_unreachable_hub_model_quotes_the_hub_unless_timm_failed_for_another_reason(monkeypatch):
    """The hub unreachable and timm unable to build the name: one line with the hub's reason and timm's. A defect
    in timm or here (a KeyError) is not dressed as the user's input: it is raised as it is."""
    from lowrank_vit.cli import sources
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.io import hub

    def unreachable(reference):
        raise FileNotFoundError("hf-hub:someone/tiny-vit is not in the cache and HF_HUB_OFFLINE=1")

    monkeypatch.setattr(hub, "download", unreachable)
    for error, expected in ((RuntimeError("no weights"), UserError), (KeyError("blocks"), KeyError)):
        def fails(args, error=error):
            raise error

        monkeypatch.setattr(sources, "timm_source", fails)
        with pytest.raises(expected) as info:
            sources.load_source(_hub_args())
        if expected is UserError:
            assert str(info.value) == ("hf-hub:someone/tiny-vit is not in the cache and HF_HUB_OFFLINE=1 (timm could "
                                       "not build it either: no weights)")


# ------------------------------------------------------------------------------------------------- compression


def test_the_compression_shows_progress_as_the_command_says_whatever_its_config_says(monkeypatch):
    """`run ROW --quiet` hands compress_model a row's config whose progress is on (the dataclass default): the
    command's word wins, and the other way round."""
    from lowrank_vit import CompressionConfig, pipeline
    from lowrank_vit.repro.flow import compress_model

    seen = []
    monkeypatch.setattr(pipeline, "compress", lambda model, images, config: seen.append(config.progress))
    for config_says, command_says in ((True, False), (False, True)):
        compress_model(torch.nn.Linear(2, 2), lambda: [], CompressionConfig(reduction=0.5, progress=config_says),
                       device=torch.device("cpu"), progress=command_says)
        assert seen[-1] is command_says


# ------------------------------------------------------------------------------------------------ the fine-tune


@pytest.mark.parametrize("field", ["train_tokens", "train_factors"])
def test_a_fine_tune_switch_that_is_not_a_boolean_is_refused_by_name(field):
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    with pytest.raises(ValueError) as info:
        FinetuneConfig(**{field: "yes"})
    assert str(info.value) == f"{field} must be true or false, got 'yes'"


def test_data_of_one_class_counts_one_class(tmp_path):
    """Labels 0 only, in both splits: one class (the class count is the largest label plus one, from either split),
    which the head check then compares with the model's."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    _parquet(tmp_path / "d" / "train.parquet", [0, 0, 0])
    _parquet(tmp_path / "d" / "validation.parquet", [0, 0])
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0,
                                     cache_dir=str(tmp_path / "hf")))
    dm.setup()
    assert dm.num_classes == 1


# ------------------------------------------------------------------------------------------- the dense cache


def test_the_dense_cache_key_holds_everything_the_accuracy_depends_on(tmp_path):
    """Entry by entry, what the cache's docs list: the weights' content, the model's name and arguments, the data
    (a folder by its path and stamp) and its splits and columns, the preprocessing, --limit, the device type and the
    library versions. A dependency missing from the key would let one model's figure stand for another's."""
    import timm

    from lowrank_vit import __version__
    from lowrank_vit.cli.densecache import _data_stamp, _dense_cache_entry

    folder = tmp_path / "imgs"
    folder.mkdir()
    args = argparse.Namespace(data=str(folder), limit=7, train_split="tr", val_split="va", image_column="img",
                              label_column="y")
    _, key = _dense_cache_entry(args, _source(), {"mean": (0.1, 0.2, 0.3)}, torch.device("cpu"))
    assert key == {
        "weights_sha256": "ab" * 32, "architecture": ARCH, "model": {"timm_name": ARCH, "model_kwargs": KWARGS},
        "data": {"path": str(folder.resolve()), "stamp": _data_stamp(folder)},
        "splits": {"train_split": "tr", "val_split": "va", "image_column": "img", "label_column": "y"},
        "preprocessing": {"mean": [0.1, 0.2, 0.3]}, "limit": 7, "device": "cpu",
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "lowrank_vit": __version__}}


def test_a_cached_accuracy_is_reused_only_under_its_own_key_and_whole(tmp_path):
    """A cache file is read back only if the key stored in it is the one asked for, and its top-1, top-5 and image
    count are numbers: anything else (another key, a hand-edited figure) is evaluated again."""
    import json

    from lowrank_vit.cli.densecache import _read_cached_accuracy

    path = tmp_path / "entry.json"
    good = {"top1": 71.5, "top5": 90.0, "images": 50}
    for stored, read in (({"key": {"a": 1}, "accuracy": good}, good),
                         ({"key": {"a": 2}, "accuracy": good}, None),
                         ({"key": {"a": 1}, "accuracy": {**good, "top1": "n/a"}}, None),
                         ([{"a": 1}, good], None)):
        path.write_text(json.dumps(stored))
        assert _read_cached_accuracy(path, {"a": 1}) == read, stored


@pytest.mark.parametrize("quiet", [False, True])
def test_a_dense_accuracy_that_cannot_be_cached_is_said_unless_quiet(quiet, capsys, monkeypatch, tmp_path):
    """The cache's folder cannot be made (a file is in the way): the figure is still returned, and a note says
    it was not cached, except under --quiet."""
    from lowrank_vit.cli import densecache

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(densecache, "_dense_cache_entry", lambda *a: (tmp_path / "file" / "entry.json", {}))
    monkeypatch.setattr(densecache, "evaluate_on_user_data", lambda *a: {"top1": 50.0})
    metrics, reused = densecache.cached_dense_accuracy(argparse.Namespace(quiet=quiet, no_cache=False), None, {}, None,
                                                 None, torch.device("cpu"))
    assert (metrics, reused) == ({"top1": 50.0}, None)
    err = capsys.readouterr().err
    assert (err == "") if quiet else err.startswith("the dense model's top-1 was not cached (")


def test_the_dense_cache_file_does_not_depend_on_the_order_the_preprocessing_was_given_in(tmp_path):
    """The same preprocessing in another order (a checkpoint's metadata, a directory's plan) is the same entry."""
    from lowrank_vit.cli.densecache import _dense_cache_entry

    args = _cache_args("someone/dataset")
    one = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "crop_pct": 0.9}
    other = dict(reversed(list(one.items())))
    cpu = torch.device("cpu")
    assert _dense_cache_entry(args, _source(), one, cpu)[0] == _dense_cache_entry(args, _source(), other, cpu)[0]


# -------------------------------------------------------------------------------- compress_model's VMeanba step


def _scans(monkeypatch, seconds: float = 0.0):
    from lowrank_vit.methods import vmeanba as method

    seen = {}

    class Report:
        def to_dict(self):
            return {"chosen": []}

    def scans(model, batches, cfg, calib_samples):
        seen["calib_samples"], seen["cfg"] = calib_samples, cfg
        time.sleep(seconds)
        return Report()

    monkeypatch.setattr(method, "apply_vmeanba", scans)
    return method.VMeanbaConfig, seen


def test_vmeanbas_step_is_announced_and_reads_no_more_images_than_there_are(monkeypatch):
    """The announcement names the scans' count, or the speedup they are chosen for; the scans are told to read
    the images the data holds when it holds fewer than asked (their report counts what they had)."""
    from lowrank_vit.repro.flow import compress_model

    config, seen = _scans(monkeypatch)
    said = []
    cpu = torch.device("cpu")
    compress_model(torch.nn.Identity(), lambda: [], None, config(num_blocks=2, calib_samples=8), device=cpu,
                   progress=False, available=3, say=said.append)
    assert said == ["VMeanba, the channel-mean scan in 2 block(s)"] and seen["calib_samples"] == 3
    compress_model(torch.nn.Identity(), lambda: [], None, config(target_speedup=1.5, calib_samples=8), device=cpu,
                   progress=False, say=said.append)
    assert said[-1] == "VMeanba, the channel-mean scan in the blocks that reach 1.5x" and seen["calib_samples"] == 8


def test_compress_model_moves_the_model_to_the_device_and_keeps_no_copy_unless_asked(monkeypatch):
    """The model goes to the device the command chose (recorded here, as this machine has one device); a copy of
    it before the low-rank step (a whole second model in memory) is kept only when asked for."""
    from lowrank_vit import CompressionConfig, pipeline
    from lowrank_vit.repro.flow import compress_model

    moved = []

    class Model(torch.nn.Linear):
        def to(self, *args, **kwargs):
            moved.append(args)
            return super().to(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compress", lambda model, images, config: "report")
    cpu = torch.device("cpu")
    done = compress_model(Model(2, 2), lambda: [], CompressionConfig(reduction=0.5), device=cpu, progress=False)
    assert moved == [(cpu,)] and done.report == "report" and done.before_lowrank is None
    done = compress_model(Model(2, 2), lambda: [], CompressionConfig(reduction=0.5), device=cpu, progress=False,
                          keep_before_lowrank=True)
    assert isinstance(done.before_lowrank, Model)


def test_compress_models_low_rank_step_is_announced_timed_and_told_the_device(monkeypatch):
    """The step's announcement names the recipe; the compression runs on the command's device with its progress
    setting; its wall time is recorded to the millisecond; the copy kept from before it is a copy (the step works in
    place, and a shallow copy would change with it)."""
    from lowrank_vit import CompressionConfig, pipeline
    from lowrank_vit.repro.flow import compress_model

    seen = []

    def compress(model, images, config):
        seen.append(config)
        time.sleep(0.02)
        with torch.no_grad():
            model.weight.zero_()  # in place, as the real step
        return "report"

    monkeypatch.setattr(pipeline, "compress", compress)
    model, said = torch.nn.Linear(2, 2), []
    config = CompressionConfig(reduction=0.5, decomposition="whitened", allocation="greedy", compensation="none",
                               progress=True)
    done = compress_model(model, lambda: [], config, device=torch.device("cpu"), progress=False,
                          keep_before_lowrank=True, say=said.append)
    assert said == ["compressing (whitened SVD, greedy ranks, Z none)"]
    assert (seen[0].device, seen[0].progress) == ("cpu", False)
    assert 0.015 <= done.seconds["compress"] < 1.0 and done.seconds["compress"] == round(done.seconds["compress"], 3)
    assert torch.count_nonzero(model.weight) == 0 and torch.count_nonzero(done.before_lowrank.weight) == 4


def test_vmeanbas_step_is_timed_to_the_millisecond(monkeypatch):
    """compress_model times VMeanba's scans (the report's timings_s): a step of about 20 ms is not rounded to 0."""
    from lowrank_vit.repro.flow import compress_model

    config, _ = _scans(monkeypatch, seconds=0.02)
    done = compress_model(torch.nn.Identity(), lambda: [], None, config(num_blocks=1), device=torch.device("cpu"),
                          progress=False)
    assert 0.015 <= done.seconds["vmeanba"] < 1.0
    assert done.seconds["vmeanba"] == round(done.seconds["vmeanba"], 3)


@pytest.mark.parametrize("progress", [False, True])
def test_vmeanbas_scans_show_progress_as_the_command_says(progress, monkeypatch):
    from lowrank_vit.repro.flow import compress_model

    config, seen = _scans(monkeypatch)
    compress_model(torch.nn.Identity(), lambda: [], None, config(num_blocks=1, progress=not progress),
                   device=torch.device("cpu"), progress=progress)
    assert seen["cfg"].progress is progress


# ---------------------------------------------------------------------------------------- more of the commands


def test_demo_publish_says_each_file_it_wrote(capsys, monkeypatch, tmp_path):
    from lowrank_vit.repro import demo

    monkeypatch.setattr(demo, "run_demo", lambda output, **kwargs: {})
    monkeypatch.setattr(demo, "publish", lambda summary: [Path("docs/demo.md"), Path("docs/figures/demo.png")])
    code, out, err = cli(capsys, "demo", "--publish", "--quiet", "--output", str(tmp_path))
    assert code == 0 and out == ""
    assert err == "demo: wrote docs/demo.md\ndemo: wrote docs/figures/demo.png\n"


def test_compress_options_reach_the_compression_config_the_right_way_round():
    """A latency table caps each rank at its break-even unless --params-only; progress is shown unless --quiet."""
    from lowrank_vit.cli.args import compression_config

    base = dict(recipe="paper", reduction=0.5, target_params=None, target_speedup=None, calib_samples=8, quiet=False,
                loss_pass_dtype=None, setting=[], latency_table="auto", params_only=False, rank_multiple=None)
    cfg = compression_config(argparse.Namespace(**base), torch.device("cpu"))
    assert (cfg.latency_limit, cfg.progress) == (True, True)
    cfg = compression_config(argparse.Namespace(**{**base, "params_only": True, "quiet": True}), torch.device("cpu"))
    assert (cfg.latency_limit, cfg.progress) == (False, False)


@pytest.mark.parametrize("quiet", [False, True])
def test_profiling_a_model_for_compress_shows_progress_unless_quiet(quiet, monkeypatch, tmp_path):
    from lowrank_vit import speed
    from lowrank_vit.cli.speed import resolve_latency_table

    seen = {}

    def profile(model, **kwargs):
        seen.update(kwargs)
        return None, tmp_path / "table.json", True

    monkeypatch.setattr(speed, "cached_profile", profile)
    args = argparse.Namespace(latency_table="auto", target_speedup=None, latency_device=None, latency_batch=1,
                              latency_runtime="torch", latency_dtype="float32", quiet=quiet)
    assert resolve_latency_table(args, torch.nn.Identity(), "tiny", "cpu") == str(tmp_path / "table.json")
    assert seen["progress"] is (not quiet) and seen["device"] == "cpu"


@pytest.mark.parametrize("value", [1.5, "3", -1])
def test_warmup_steps_that_are_not_a_count_are_refused(value):
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    with pytest.raises(ValueError) as info:
        FinetuneConfig(warmup_steps=value)
    assert str(info.value) == f"warmup_steps must be a non-negative integer, got {value!r}"


def test_the_tensor_transform_resizes_with_half_pixel_centres():
    """Two pixels (0 and 255) stretched to four: sampled at the centres of the new pixels (x_src = (x + 0.5) / 2 -
    0.5, clamped), they read 0, 1/4, 3/4 and 1; corner-aligned sampling would give thirds."""
    from lowrank_vit.stages.data_transforms import TensorImageTransform

    image = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    out = TensorImageTransform((1, 1, 4), mean=(0.0,), std=(1.0,))(image)
    assert out.flatten().tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0], abs=1e-6)


def test_the_fine_tune_runs_where_lightning_chooses_when_not_told():
    """`finetune(model, loader)` without accelerator or devices: Lightning's "auto" for both (here one CPU)."""
    from lowrank_vit.stages.finetune import finetune
    from lowrank_vit.stages.finetune_config import FinetuneConfig

    _, trainer = finetune(_compressed(), _loader(), config=FinetuneConfig(epochs=1, max_steps=1), progress=False,
                          enable_model_summary=False, logger=False)
    assert trainer.num_devices == 1 and trainer.global_step == 1


def test_a_label_column_of_floats_is_refused_not_truncated_to_classes(tmp_path):
    """Labels 0.0, 1.5, 2.0 are not classes: refused naming the column and what it holds (read as integers they
    would silently become 0, 1, 2)."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError

    _parquet(tmp_path / "d" / "train.parquet", [0.0, 1.5, 2.0], dtype="float32")
    dm = build_datamodule(DataConfig(path=str(tmp_path / "d"), img_size=8, batch_size=2, num_workers=0,
                                     cache_dir=str(tmp_path / "hf")))
    with pytest.raises(DataFormatError) as info:
        dm.setup()
    assert "label column 'label' of" in str(info.value) and "not integer classes" in str(info.value)


def test_normalization_statistics_that_fit_no_channel_count_are_refused_with_both():
    from lowrank_vit.stages.data_transforms import _match_channels

    assert _match_channels((0.2, 0.4, 0.6), 1) == pytest.approx((0.4,))
    with pytest.raises(ValueError) as info:
        _match_channels((0.5, 0.5), 3)
    assert str(info.value) == "normalization statistics (0.5, 0.5) do not fit in_chans=3"
