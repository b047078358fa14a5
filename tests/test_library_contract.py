"""Library contracts a user meets outside the compression itself: the uniform allocation's common fraction, saving
without side effects, hub downloads (revision, only the model's files), the model card's code blocks and figure,
image arrays, tokens, data errors that stay readable, and the fine-tune's precision, progress bar and hyperparameters.

Everything is offline: the hub is a Hugging Face cache filled by the test or a stand-in of ``snapshot_download``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lowrank_vit import compress, load_compressed, save_compressed
from lowrank_vit.core.allocate import allocate_uniform
from lowrank_vit.core.budget import LayerBudget

from conftest import make_images, make_tiny_vit


@pytest.fixture(scope="module")
def compressed() -> torch.nn.Module:
    """A tiny ViT compressed by 40% (shared: tests copy it before changing it)."""
    model = make_tiny_vit()
    compress(model, [make_images(16)], reduction=0.4, calib_samples=16, progress=False)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Uniform allocation: one common fraction, the largest that fits


def _uniform_problem(seed: int) -> list[LayerBudget]:
    """Four layers of random shapes, some with a Z of one rank step."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(4):
        k, m = (int(v) for v in torch.randint(8, 96, (2,), generator=g))
        z = int(torch.randint(0, 2, (1,), generator=g)) * (k + m)
        layers.append(LayerBudget(f"l{i}", k, m, z, torch.linspace(1, 0, min(k, m) + 1, dtype=torch.float64)))
    return layers


def _ranks_at(layers: list[LayerBudget], f: Fraction) -> dict[str, int]:
    """Exactly: the largest rank whose cost is at most f of the layer's dense cost (at least 1, at most max_rank)."""
    return {layer.name: min(max(math.floor((f * layer.dense_params - layer.z_params) / layer.rank_step), 1),
                            layer.max_rank) for layer in layers}


def _largest_common_fraction(layers: list[LayerBudget], budget: int) -> Fraction:
    """Brute force over every fraction at which some layer's rank steps up."""
    candidates = {Fraction(0)} | {Fraction(layer.params(r), layer.dense_params)
                                  for layer in layers for r in range(1, layer.max_rank + 1)}
    fits = [f for f in candidates
            if sum(layer.params(r) for layer, r in zip(layers, _ranks_at(layers, f).values(), strict=True)) <= budget]
    return max(fits)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_uniform_allocation_keeps_every_layer_at_the_largest_common_fraction_that_fits(seed, fraction):
    """"uniform" promises the same retained fraction in every layer, the largest that fits the budget (then the
    rounding slack is topped up). A search that missed that fraction would starve some layers while others got
    more than the common share: every layer must keep at least its rank at the brute-forced fraction."""
    layers = _uniform_problem(seed)
    budget = int(fraction * sum(layer.dense_params for layer in layers))
    allocation = allocate_uniform(layers, budget)
    floor = _ranks_at(layers, _largest_common_fraction(layers, budget))
    assert all(allocation.ranks[name] >= rank for name, rank in floor.items()), (allocation.ranks, floor)
    assert sum(layer.params(allocation.ranks[layer.name]) for layer in layers) == allocation.params <= budget


# --------------------------------------------------------------------------------------------------------------------
# Saving has no side effects


def test_saving_a_model_leaves_the_global_random_stream_alone(compressed, tmp_path):
    """save_compressed checks that the plan rebuilds the model, building the skeleton on the meta device (no memory,
    no initialization). Built for real it would draw every initial weight from torch's global generator, so a
    seeded run that saves a checkpoint midway would continue with other random numbers than one that does not (and a
    large model would cost its full memory and seconds of initialization just to be checked)."""
    torch.manual_seed(5)
    expected = torch.rand(8)
    torch.manual_seed(5)
    save_compressed(compressed, tmp_path / "saved")
    assert torch.equal(torch.rand(8), expected)


# --------------------------------------------------------------------------------------------------------------------
# Hub downloads


COMMITS = {"main": "1" * 40, "v2": "2" * 40}


def _two_revisions(compressed, tmp_path) -> tuple[Path, torch.nn.Module]:
    """A hub cache (the layout huggingface_hub writes) of someone/tiny whose ``main`` holds the compressed model and
    whose ``v2`` holds a copy with another head; returns the cache and the v2 model."""
    second = copy.deepcopy(compressed)
    with torch.no_grad():
        second.head.weight.add_(1.0)
    repo = tmp_path / "cache" / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    for ref, model in (("main", compressed), ("v2", second)):
        save_compressed(model, tmp_path / ref)
        (repo / "refs" / ref).write_text(COMMITS[ref])
        shutil.copytree(tmp_path / ref, repo / "snapshots" / COMMITS[ref])
    return tmp_path / "cache", second


def test_a_hub_reference_with_a_revision_loads_that_revision(compressed, tmp_path):
    """``hf-hub:owner/name@v2`` must give v2's weights, not the default branch's: a user pinning a revision for
    reproducibility would otherwise evaluate another model without any sign of it."""
    cache, second = _two_revisions(compressed, tmp_path)
    x = make_images(3, seed=7)
    with torch.no_grad():
        pinned = load_compressed("hf-hub:someone/tiny@v2", cache_dir=cache)(x)
        default = load_compressed("hf-hub:someone/tiny", cache_dir=cache)(x)
        assert torch.equal(pinned, second(x))
        assert torch.equal(default, compressed(x))
    assert not torch.equal(pinned, default)


def test_a_hub_download_fetches_only_the_model_files(compressed, tmp_path, monkeypatch):
    """A model repository may hold much more than the model (training checkpoints, pickles, data); loading fetches
    only the model's own files. The hub is a stand-in that serves a folder through huggingface_hub's own pattern
    filter, as ``snapshot_download`` does."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    remote = save_compressed(compressed, tmp_path / "remote")
    (remote / "optimizer.pt").write_bytes(b"\0" * 4096)  # what must not be downloaded
    (remote / "train.parquet").write_bytes(b"\0" * 4096)
    calls = []

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, token=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision))
        local = tmp_path / "downloaded"
        local.mkdir(exist_ok=True)
        for name in filter_repo_objects([p.name for p in remote.iterdir()], allow_patterns=allow_patterns):
            shutil.copy(remote / name, local / name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = load_compressed("hf-hub:someone/tiny@v3")
    assert calls == [("someone/tiny", "v3")]
    files = {p.name for p in (tmp_path / "downloaded").iterdir()}
    assert {"model.safetensors", "lowrank_vit.json"} <= files
    assert not files & {"optimizer.pt", "train.parquet"}
    x = make_images(2, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))


# --------------------------------------------------------------------------------------------------------------------
# The model card and its figure


def _fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block (CommonMark backtick fences at the start of a line)."""
    blocks, info, body = [], None, []
    for line in markdown.splitlines():
        if info is None:
            if line.startswith("```"):
                info, body = line[3:].strip(), []
        elif line.strip() == "```":
            blocks.append((info, "\n".join(body)))
            info = None
        else:
            body.append(line)
    assert info is None, "a code block is never closed"
    return blocks


REPORT = {
    "name": "tiny-40", "command": "compress", "recipe": "paper", "data": "mnist-5k", "calib_images": 16,
    "source": {"architecture": "vit_tiny_patch16_224", "description": "timm model"},
    "preprocessing": {"input_size": [1, 28, 28], "interpolation": "bicubic", "mean": [0.5], "std": [0.25],
                      "crop_pct": 1.0, "crop_mode": "center"},
    "params": {"before": 27_000, "after": 18_000}, "size_mib": {"before": 0.1, "after": 0.07}, "reduction": 0.4,
    "layers": [{"name": "blocks.0.mlp.fc1", "in_features": 32, "out_features": 128, "rank": 8, "dense_params": 4096,
                "factored_params": 1280}],
}


def test_the_model_cards_code_blocks_are_valid_json_and_python_that_loads_the_model(compressed, tmp_path):
    """The card's preprocessing block is what a user copies into their own pipeline, and its "How to load" block is
    what they paste into Python: the json block must parse to the preprocessing, and the python block must run and
    load the model."""
    from lowrank_vit.io.modelcard import render_card

    directory = save_compressed(compressed, tmp_path / "tiny-40")
    card = render_card(REPORT, str(directory))
    blocks = _fenced_blocks(card)
    json_blocks = [body for info, body in blocks if info == "json"]
    python_blocks = [body for info, body in blocks if info == "python"]
    assert len(json_blocks) == 1 and len(python_blocks) == 1
    assert json.loads(json_blocks[0]) == REPORT["preprocessing"]
    namespace: dict = {}
    exec(compile(python_blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - the card's own snippet
    x = make_images(2, seed=4)
    with torch.no_grad():
        assert torch.equal(namespace["model"](x), compressed(x))


def test_the_ranks_figure_is_drawn_for_a_report_without_a_source(tmp_path):
    """plot_ranks reads a report as render_card does, every field optional but the layers: a report without its
    source (written by hand, or by an older version) still gives the figure rather than a crash."""
    from PIL import Image

    from lowrank_vit.io.modelcard import plot_ranks

    report = {key: value for key, value in REPORT.items() if key not in ("source", "recipe")}
    path = plot_ranks(report, tmp_path / "ranks.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400


# --------------------------------------------------------------------------------------------------------------------
# Images from arrays, tokens, configuration


def test_a_one_channel_channels_first_array_becomes_a_grey_image():
    """A Hugging Face image column may hold (1, H, W) arrays (a grey image stored channels first): each must become
    the H x W grey picture, not a one-pixel-high strip or an error."""
    from lowrank_vit.stages.data import to_pil

    pixels = np.random.default_rng(0).integers(0, 256, (7, 5), dtype=np.uint8)
    image = to_pil(pixels[None])
    assert image.mode == "L" and image.size == (5, 7)
    assert np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("variable", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_the_hugging_face_token_is_read_from_either_environment_variable(variable, monkeypatch):
    """huggingface_hub reads both HF_TOKEN and the older HUGGING_FACE_HUB_TOKEN; a gated dataset (ImageNet) must work
    with either set, and an explicit token still wins over the environment."""
    from lowrank_vit.stages.data import resolve_token

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("lowrank_vit.stages.data._stored_token", lambda: None)
    assert resolve_token() is None
    monkeypatch.setenv(variable, "hf_from_env")
    assert resolve_token() == "hf_from_env"
    assert resolve_token("hf_given") == "hf_given"


@pytest.mark.parametrize("size", [0, -32])
def test_a_non_positive_image_size_is_refused(size):
    """img_size=0 (or negative) would fail later inside timm's transforms with an unrelated message: the config
    refuses it at once, naming the field."""
    from lowrank_vit.stages.data import DataConfig

    with pytest.raises(ValueError, match="img_size must be a positive integer"):
        DataConfig(name="mnist-5k", img_size=size)


# --------------------------------------------------------------------------------------------------------------------
# Data errors keep what the user needs to read


def test_a_missing_column_error_lists_every_column_of_a_wide_table_and_the_fix(tmp_path):
    """A table with dozens of columns: the error must still list them all and end with the fix (set image_column=),
    not be cut off before it (data errors are kept to one line of at most 1,000 characters)."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from lowrank_vit.stages.data import DataConfig, DataFormatError, build_datamodule

    columns = {f"measurement_column_{i:02d}": list(range(4)) for i in range(30)}
    columns["img"] = [Image.new("L", (8, 8), i) for i in range(4)]
    columns["label"] = [0, 1, 0, 1]
    path = tmp_path / "wide.parquet"
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "hf_cache"), batch_size=2, image_column="picture")
    with pytest.raises(DataFormatError) as err:
        build_datamodule(cfg, make_tiny_vit()).setup()
    message = str(err.value)
    assert "\n" not in message and len(message) > 400
    assert all(repr(name) in message for name in columns)
    assert message.endswith("set image_column= to one of them")


def test_an_unreachable_hub_dataset_says_why(tmp_path):
    """Offline, an unknown or uncached hub dataset: the one-line error names the underlying failure (its type and
    text), which is what tells "offline" from "no such dataset" from "gated"."""
    datasets = pytest.importorskip("datasets")
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (the test must not reach the network)")
    from lowrank_vit.stages.data import DataConfig, DataNotFoundError, build_datamodule

    dm = build_datamodule(DataConfig(name="nobody/no-such-dataset", cache_dir=str(tmp_path / "hf_cache")),
                          make_tiny_vit())
    with pytest.raises(DataNotFoundError) as err:
        dm.setup()
    cause = err.value.__cause__
    assert cause is not None
    message = str(err.value)
    assert f"({type(cause).__name__}: " in message
    assert " ".join(str(cause).split())[:40] in message


# --------------------------------------------------------------------------------------------------------------------
# The fine-tune


QUIET = dict(devices=1, progress=False, enable_model_summary=False)


def _loader(n: int = 16, seed: int = 3) -> DataLoader:
    return DataLoader(TensorDataset(make_images(n, seed=seed), torch.arange(n) % 10), batch_size=8)


def test_a_trainer_precision_passed_by_the_caller_wins_over_the_configs(compressed, one_thread):
    """finetune(..., precision=...) is a Trainer argument that overrides FinetuneConfig.precision: a config that
    says 16-mixed (a GPU's) with precision="32-true" given for a CPU run trains in 32-true, instead of being
    refused for a precision it will not use."""
    from lowrank_vit.stages.finetune import FinetuneConfig, finetune

    model = copy.deepcopy(compressed)
    _, trainer = finetune(model, _loader(), config=FinetuneConfig(epochs=1, precision="16-mixed"),
                          precision="32-true", accelerator="cpu", **QUIET)
    assert trainer.precision == "32-true" and trainer.global_step == 2


def test_16_mixed_is_accepted_for_a_gpu_fine_tune(compressed, monkeypatch):
    """On a GPU (accelerator "cuda" or "gpu"), 16-mixed is a valid precision: it must reach the Trainer, not be
    refused as if the run were on a CPU. The Trainer is a stand-in that records its arguments (no GPU needed)."""
    import lightning

    from lowrank_vit.stages.finetune import FinetuneConfig, finetune

    class Reached(Exception):
        pass

    seen = {}

    def trainer(**options):
        seen.update(options)
        raise Reached

    monkeypatch.setattr(lightning, "Trainer", trainer)
    for accelerator in ("cuda", "gpu"):
        seen.clear()
        with pytest.raises(Reached):
            finetune(copy.deepcopy(compressed), _loader(), config=FinetuneConfig(epochs=1, precision="16-mixed"),
                     accelerator=accelerator, **QUIET)
        assert seen["precision"] == "16-mixed" and seen["accelerator"] == accelerator


def test_the_progress_bar_shows_the_validation_accuracy(compressed, one_thread):
    """What a user watches during a fine-tune: the bar carries val/top1 beside the training loss."""
    from lowrank_vit.stages.finetune import FinetuneConfig, finetune

    _, trainer = finetune(copy.deepcopy(compressed), _loader(), _loader(seed=4), config=FinetuneConfig(epochs=1),
                          accelerator="cpu", **QUIET)
    shown = trainer.progress_bar_metrics
    assert "val/top1" in shown and 0.0 <= shown["val/top1"] <= 1.0
    assert "train/loss_step" in shown


def test_the_logged_hyperparameters_count_the_trainable_and_total_parameters(compressed):
    """A logger (W&B, CSV) records how much of the model the fine-tune trains: trainable_params and total_params,
    counted here independently from the parameters' requires_grad flags."""
    from lowrank_vit.stages.finetune import PartialFinetune

    model = copy.deepcopy(compressed)
    module = PartialFinetune(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert module.hparams["total_params"] == total
    assert module.hparams["trainable_params"] == trainable
    assert module.hparams["trainable_fraction"] == pytest.approx(trainable / total)


def test_a_data_config_on_the_0_255_scale_is_refused():
    """From the API as from the CLI: pixels are scaled to [0, 1] before normalizing, so 123.675 is a unit slip."""
    from lowrank_vit.stages.data_config import DataConfig

    with pytest.raises(ValueError, match=r"mean 123.675 116.28 103.53 looks like the 0-255 scale.*"
                                         r"\(0.485 0.456 0.406\)"):
        DataConfig(name="mnist-5k", mean=(123.675, 116.28, 103.53), std=(0.229, 0.224, 0.225))
    assert DataConfig(name="mnist-5k", mean=(0.0,), std=(1.0,)).std == (1.0,)  # no normalization: still allowed


def test_an_unknown_preprocessing_field_is_named_with_the_known_ones():
    from lowrank_vit.stages.data_config import PREPROCESSING_FIELDS, check_preprocessing

    with pytest.raises(ValueError) as err:
        check_preprocessing({"normalise": 0.5})
    assert "'normalise'" in str(err.value) and all(f in str(err.value) for f in PREPROCESSING_FIELDS)
