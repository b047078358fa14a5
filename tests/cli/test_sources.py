"""Tests of lowrank_vit/cli/sources.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import (
    ARCH,
    CLASSES,
    HEADLESS,
    IMAGE_SIZE,
    KWARGS,
    ONE_BLOCK_KWARGS,
    PER_CLASS,
    SIZE,
    TWO_BLOCK_KWARGS,
    _assert_one_line_error,
    _model,
    _model_args,
    _run,
    _tiny,
    cli,
    make_images,
    make_tiny_vit,
    one_line_error,
    patch_everywhere,
)


def test_the_cli_evaluates_a_pth_exactly_as_the_same_weights_in_safetensors(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from tests.helpers import cli

    for c in range(5):  # a tiny image folder, 4 images a class
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            rgb = np.random.default_rng(10 * c + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    source = _model(4).state_dict()
    torch.save({"state_dict": source}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "w.safetensors"))
    tops = []
    for name in ("w.pth", "w.safetensors"):
        code, out, err = cli(capsys, "evaluate", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / name),
                             "--model-kwargs", json.dumps(KWARGS), "--preprocessing", "timm", "--data",
                             str(tmp_path / "imgs"), "--workers", "0", "--json", "--quiet", "--latency-batches")
        assert code == 0, err
        result = json.loads(out)
        assert result["model"] == "timm vit_tiny_patch16_224, your checkpoint"
        tops.append({k: v for k, v in result.items() if k not in ("model", "latency", "latency_ms", "device")})
    assert tops[0] == tops[1]  # top-1, top-5, counts, size and preprocessing: the same weights


@pytest.mark.usefixtures('one_thread')
def test_a_directory_whose_dense_model_cannot_be_rebuilt_gets_a_note(place, tmp_path, capsys):
    out = tmp_path / "random"
    code, _, err = cli(capsys, "compress", ARCH, "--no-pretrained", "--model-kwargs", json.dumps(HEADLESS),
                       "--input-size", f"1,{SIZE},{SIZE}", "--mean", "0.5", "--std", "0.5", "--data",
                       str(place / "imgs"), "--workers", "0", "--reduction", "0.5", "--calib-samples", "8", "--quiet",
                       "--no-eval", "--output", str(out))
    assert code == 0, err
    code, stdout, err = cli(capsys, "evaluate", str(out), "--data", str(place / "imgs"), "--workers", "0",
                            "--latency-batches")
    assert code == 0, err
    why = (f"the fidelity to the dense model: directory {out} was compressed from random weights, which cannot be "
           f"rebuilt; evaluate measures none")
    assert why in err.splitlines()
    assert stdout.splitlines()[0] == (f"directory {out} on {place / 'imgs'}: no top-1 (the model is not a classifier "
                                      f"(num_classes=0)) and no fidelity ({why})")


def _saved_compressed(path: Path) -> Path:
    from lowrank_vit import CompressionConfig, compress, save_compressed

    model = make_tiny_vit(seed=0)
    compress(model, [make_images(16, seed=1)], CompressionConfig(reduction=0.3, calib_samples=16, progress=False))
    return save_compressed(model, path)


@pytest.mark.usefixtures("offline")
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


@pytest.mark.usefixtures("offline")
def test_a_model_compressed_from_a_directory_records_where_that_came_from(recompressed):
    """report.json's and the plan's source: the input directory, and (``from``) the source that directory recorded,
    so the chain back to the first weights is kept."""
    first = json.loads((recompressed / "dense" / "lowrank_vit.json").read_text())["metadata"]["source"]
    report = json.loads((recompressed / "out" / "report.json").read_text())
    plan = json.loads((recompressed / "out" / "lowrank_vit.json").read_text())
    for source in (report["source"], plan["metadata"]["source"]):
        assert source["directory"] == str(recompressed / "dense") and source["from"] == first
    assert first["timm_name"] == ARCH


@pytest.mark.usefixtures("offline")
def test_a_checkpoint_that_carries_its_input_size_builds_the_model_at_it(images_and_weights, tmp_path, capsys):
    """Without --input-size, a checkpoint's safetensors metadata ``input_size`` [3, 40, 40] builds the timm name at
    40 pixels (docs/cli.md: what the weights carry), not at the name's own 224 (whose position embeddings would not
    fit these weights)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=40, **ONE_BLOCK_KWARGS)
    save_file(model.state_dict(), str(tmp_path / "w40.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "input_size": "[3, 40, 40]"})
    code, _, err = cli(
        capsys,
        "evaluate",
        ARCH,
        "--checkpoint",
        str(tmp_path / "w40.safetensors"),
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--data",
        str(images_and_weights / "imgs"),
        "--workers",
        "0",
        "--latency-batches",
    )
    assert code == 0, err
    line = next(line for line in err.splitlines() if line.startswith("preprocessing:"))
    assert line.startswith("preprocessing: input 3x40x40 (model), ")


@pytest.mark.usefixtures("offline")
def test_timms_pretrained_weights_are_described_as_pretrained(monkeypatch):
    from lowrank_vit.cli import sources
    from lowrank_vit.repro import models

    monkeypatch.setattr(sources, "_check_offline_weights", lambda *a: None)
    patch_everywhere(monkeypatch, models, "build_model", lambda cfg, progress=True: make_tiny_vit(seed=0))
    args = argparse.Namespace(
        model=ARCH, model_kwargs={}, checkpoint=None, input_size=None, no_pretrained=False, quiet=True
    )
    assert sources.timm_source(args).description == f"timm {ARCH}, pretrained"
    args.no_pretrained = True
    assert sources.timm_source(args).description == f"timm {ARCH}, random weights"


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", ["~mymodel", ".mymodel", "runs/mymodel"])
def test_a_name_that_looks_like_a_path_is_refused_as_a_missing_model_directory(name):
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.sources import timm_source

    args = argparse.Namespace(model=name, model_kwargs={}, checkpoint=None, input_size=None, no_pretrained=True,
                              quiet=True)
    with pytest.raises(UserError) as info:
        timm_source(args)
    assert str(info.value) == f"no model directory {name!r} (and it is not a timm model name)"


@pytest.mark.usefixtures("offline")
def test_an_unknown_architecture_with_nothing_close_points_to_timms_list():
    from lowrank_vit.cli.sources import _suggest

    assert _suggest("qqqqqqqqqqqq") == "; see timm.list_models()"


@pytest.mark.usefixtures("offline")
def test_distilling_from_a_model_compressed_from_random_weights_is_refused_with_what_to_do():
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.sources import Source, load_teacher

    source = Source(
        torch.nn.Identity(),
        ARCH,
        "directory out/m",
        metadata={"source": {"timm_name": ARCH, "pretrained": False, "checkpoint": None}},
    )
    with pytest.raises(UserError) as info:
        load_teacher(argparse.Namespace(teacher_checkpoint=None), source)
    assert str(info.value) == (
        "--distill: directory out/m was compressed from random weights, which cannot be "
        "rebuilt; fine-tune without --distill"
    )


def _hub_args():
    return argparse.Namespace(model="hf-hub:someone/tiny-vit")


@pytest.mark.usefixtures("offline")
def test_a_hub_repository_that_is_no_model_directory_gets_timms_own_refusal(monkeypatch, tmp_path):
    """`hf-hub:owner/name` downloaded, but without lowrank_vit.json, and timm refuses the name too: timm's refusal
    is the error, as it is (the hub's download did not fail, so there is no hub reason to quote)."""
    from lowrank_vit.cli import sources
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.io import hub

    def timm_refuses(args):
        raise UserError("timm has no model 'hf-hub:someone/tiny-vit'")

    patch_everywhere(monkeypatch, hub, "download", lambda reference: tmp_path)  # reached: an empty snapshot
    monkeypatch.setattr(sources, "timm_source", timm_refuses)
    with pytest.raises(UserError) as info:
        sources.load_source(_hub_args())
    assert str(info.value) == "timm has no model 'hf-hub:someone/tiny-vit'"


@pytest.mark.usefixtures("offline")
def test_an_unreachable_hub_model_quotes_the_hub_unless_timm_failed_for_another_reason(monkeypatch):
    """The hub unreachable and timm unable to build the name: one line with the hub's reason and timm's. A defect
    in timm or here (a KeyError) is not dressed as the user's input: it is raised as it is."""
    from lowrank_vit.cli import sources
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.io import hub

    def unreachable(reference):
        raise FileNotFoundError("hf-hub:someone/tiny-vit is not in the cache and HF_HUB_OFFLINE=1")

    patch_everywhere(monkeypatch, hub, "download", unreachable)
    for error, expected in ((RuntimeError("no weights"), UserError), (KeyError("blocks"), KeyError)):

        def fails(args, error=error):
            raise error

        monkeypatch.setattr(sources, "timm_source", fails)
        with pytest.raises(expected) as info:
            sources.load_source(_hub_args())
        if expected is UserError:
            assert str(info.value) == (
                "hf-hub:someone/tiny-vit is not in the cache and HF_HUB_OFFLINE=1 (timm could "
                "not build it either: no weights)"
            )


def test_the_cli_says_why_an_unreachable_hub_model_could_not_be_loaded(tmp_path, monkeypatch, capsys):
    """Offline, an hf-hub: name is neither a cached model directory nor a timm model: the hub's reason (offline, go
    online or set HF_TOKEN) is what the user reads, not only timm's "no model"."""
    from lowrank_vit.cli import main as cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = cli.main(["evaluate", "hf-hub:someone/absent", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot get hf-hub:someone/absent from the Hugging Face hub" in err and "HF_HUB_OFFLINE" in err


def test_unknown_model_name_suggests_close_ones(workdir, tmp_path, capsys):
    code, _, err = _run(
        capsys,
        "compress",
        "vit_tiny_patch16_22",
        "--data",
        workdir / "imgs",
        "--reduction",
        "0.5",
        "--output",
        tmp_path / "o",
    )
    _assert_one_line_error(code, err, "vit_tiny_patch16_22", "did you mean", "vit_tiny_patch16_224")
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_architecture(workdir, tmp_path, capsys):
    args = _model_args(workdir)
    args[args.index("--model-kwargs") + 1] = json.dumps({**TWO_BLOCK_KWARGS, "embed_dim": 48})
    code, _, err = _run(
        capsys,
        "compress",
        *args,
        "--data",
        workdir / "imgs",
        "--reduction",
        "0.5",
        "--quiet",
        "--output",
        tmp_path / "o",
    )
    _assert_one_line_error(code, err, "weights.safetensors", "does not fit")
    assert not (tmp_path / "o").exists()


def test_pretrained_weights_out_of_reach_say_what_to_do(workdir, tmp_path, capsys, monkeypatch):
    from lowrank_vit.repro import models

    def offline(*args, **kwargs):
        raise models.SetupError(
            "cannot load timm's pretrained weights for x (offline): run once with network "
            "access, unset HF_HUB_OFFLINE, or use --scale smoke"
        )

    patch_everywhere(monkeypatch, models, "build_model", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline, weights not in the cache are refused earlier
    code, _, err = _run(capsys, "evaluate", ARCH, "--data", workdir / "imgs", "--quiet")
    _assert_one_line_error(code, err, "--no-pretrained")
    assert "--scale smoke" not in err


def test_a_hub_model_directory_is_evaluated_like_a_local_one(compressed, capsys, monkeypatch):
    from lowrank_vit.io import hub

    asked = []

    def from_cache(reference, cache_dir=None, token=None):
        asked.append(reference)
        return compressed  # what snapshot_download returns: a local folder holding the repository's files

    patch_everywhere(monkeypatch, hub, "download", from_cache)
    code, out, err = _run(
        capsys,
        "evaluate",
        "hf-hub:someone/tiny-30",
        "--data",
        compressed.parent / "imgs",
        "--workers",
        "0",
        "--json",
        "--quiet",
        "--latency-batches",
    )
    assert code == 0, err
    assert asked == ["hf-hub:someone/tiny-30"]
    result = json.loads(out)
    assert result["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and result["latency_ms"] == {}


def test_a_timm_config_json_beside_the_checkpoint_carries_preprocessing_and_the_metadata_wins(tmp_path):
    from safetensors.torch import save_file

    from lowrank_vit.cli.sources import _checkpoint_preprocessing

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights), metadata={"std": "[0.2, 0.3, 0.4]"})
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architecture": ARCH,
                "pretrained_cfg": {
                    "mean": [0.1, 0.2, 0.3],
                    "std": [0.9, 0.9, 0.9],
                    "crop_pct": 0.8,
                    "interpolation": "bilinear",
                    "input_size": [3, 40, 40],
                    "num_classes": 7,
                },
            }
        )
    )
    assert _checkpoint_preprocessing(weights) == {
        "mean": [0.1, 0.2, 0.3],
        "std": [0.2, 0.3, 0.4],
        "crop_pct": 0.8,
        "interpolation": "bilinear",
        "input_size": [3, 40, 40],
    }
    (tmp_path / "config.json").write_text("{not json")  # a broken config.json is ignored, the metadata stays
    assert _checkpoint_preprocessing(weights) == {"std": [0.2, 0.3, 0.4]}


def test_the_teacher_is_the_recorded_dense_model_and_must_have_the_students_classes(workdir):
    """load_teacher rebuilds the dense model from the recorded checkpoint (its weights, in eval mode), and refuses a
    rebuilt model whose class count differs from the compressed one's."""
    import argparse

    import timm
    from safetensors.torch import load_file

    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.sources import Source, load_teacher
    from lowrank_vit.repro.models import checkpoint_digest

    weights = workdir / "weights.safetensors"
    student = timm.create_model(ARCH, pretrained=False, img_size=IMAGE_SIZE, **TWO_BLOCK_KWARGS)
    record = {
        "timm_name": ARCH,
        "model_kwargs": {**TWO_BLOCK_KWARGS, "img_size": IMAGE_SIZE},
        "checkpoint": str(weights),
        "checkpoint_sha256": checkpoint_digest(weights),
        "pretrained": False,
    }
    args = argparse.Namespace(teacher_checkpoint=None, quiet=True)
    teacher = load_teacher(args, Source(student, ARCH, "directory m", metadata={"source": record}))
    assert not teacher.training
    expected = load_file(str(weights))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in expected.items())
    other = timm.create_model(ARCH, pretrained=False, img_size=IMAGE_SIZE, **{**TWO_BLOCK_KWARGS, "num_classes": 4})
    with pytest.raises(UserError, match=r"the rebuilt dense model has 3 classes, the compressed one 4"):
        load_teacher(args, Source(other, ARCH, "directory m", metadata={"source": record}))


def test_a_one_channel_input_size_builds_a_one_channel_model_fed_one_channel_images(images, capsys):
    """``--input-size 1,H,W`` on a timm name: the model is built for grayscale input and the data module feeds it
    grayscale images. Were the channel count lost on the way to timm, the user's grayscale model could not be built
    (or would be built for RGB)."""
    code, out, err = cli(
        capsys,
        "evaluate",
        ARCH,
        "--no-pretrained",
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        "1,32,32",
        "--data",
        str(images),
        "--workers",
        "0",
        "--json",
        "--quiet",
        "--latency-batches",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["preprocessing"]["input_size"] == [1, IMAGE_SIZE, IMAGE_SIZE]
    # the parameter count of a ViT whose patch embedding reads 1 channel, counted on a model built here directly
    assert result["params"] == sum(p.numel() for p in _tiny(in_chans=1).parameters())
    assert result["params"] != sum(p.numel() for p in _tiny(in_chans=3).parameters())
    assert result["images"] == CLASSES * PER_CLASS  # every image of the folder was evaluated: they fit the model


def test_the_description_says_the_weights_are_the_users_checkpoint(images, checkpoint, capsys):
    """A model built from ``--checkpoint FILE`` is described as "your checkpoint" in the output, never as random
    weights (which would tell the user their checkpoint was ignored)."""
    code, out, err = cli(
        capsys,
        "evaluate",
        ARCH,
        "--preprocessing",
        "timm",
        "--checkpoint",
        str(checkpoint),
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        str(IMAGE_SIZE),
        "--data",
        str(images),
        "--workers",
        "0",
        "--json",
        "--quiet",
        "--latency-batches",
    )
    assert code == 0, err
    assert json.loads(out)["model"] == f"timm {ARCH}, your checkpoint"


def test_a_hub_reference_to_a_model_directory_loads_that_directory(model_dir, images, capsys, monkeypatch):
    """``hf-hub:owner/name`` holding a model directory: the downloaded snapshot is read like a local model directory
    (its weights, its saved preprocessing). The hub itself is replaced by a local folder, as snapshot_download
    returns one."""
    from lowrank_vit.io import hub

    patch_everywhere(monkeypatch, hub, "download", lambda reference, cache_dir=None, token=None: model_dir)
    code, out, err = cli(
        capsys,
        "evaluate",
        "hf-hub:someone/tiny",
        "--data",
        str(images),
        "--workers",
        "0",
        "--json",
        "--quiet",
        "--latency-batches",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == f"directory {model_dir}"
    assert result["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and result["preprocessing"]["crop_pct"] == 1.0


def test_a_misspelled_name_with_a_pretrained_tag_suggests_the_architecture(images, tmp_path, capsys):
    """A misspelled architecture with its pretrained tag (``vit_base_patch16_22.augreg_in21k``): the suggestion is
    the architecture the user meant (the tag is no part of what is compared with timm's names)."""
    code, _, err = cli(
        capsys,
        "compress",
        "vit_base_patch16_22.augreg_in21k",
        "--data",
        str(images),
        "--reduction",
        "0.5",
        "--output",
        str(tmp_path / "o"),
    )
    assert code == 2
    line = one_line_error(err)
    assert "did you mean vit_base_patch16_224" in line
    assert not (tmp_path / "o").exists()


def test_a_name_with_a_stray_space_is_refused_suggesting_the_name_without_it(images, tmp_path, capsys):
    """``"vit_tiny_patch16_224 "`` (a stray space, as from a quoted shell variable) is no timm name: refused on one
    line that suggests the name the user meant, before any model is built."""
    code, _, err = cli(
        capsys,
        "compress",
        f"{ARCH} ",
        "--no-pretrained",
        "--data",
        str(images),
        "--reduction",
        "0.5",
        "--output",
        str(tmp_path / "o"),
    )
    assert code == 2
    line = one_line_error(err)
    assert f"timm has no model '{ARCH} '" in line and f"did you mean {ARCH}" in line
    assert not (tmp_path / "o").exists()


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache. huggingface_hub reads HF_HOME once, at import: its resolved cache folder is set
    too, as a fresh process with HF_HOME set would have it."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


@pytest.fixture
def build_marker(monkeypatch) -> None:
    """timm is never asked to build the model: reaching it shows as a SetupError naming this marker."""
    from lowrank_vit.repro import models

    def build(*args, **kwargs):
        raise models.SetupError("BUILD-REACHED")

    patch_everywhere(monkeypatch, models, "build_model", build)


@pytest.mark.parametrize("value", ["1", "yes", "True", "ON"])
def test_offline_pretrained_weights_that_are_not_cached_are_refused_at_once(
    value, empty_hf_cache, build_marker, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    code, _, err = cli(capsys, "evaluate", "deit_tiny_patch16_224", "--data", "digits")
    assert code == 2
    line = one_line_error(err)
    assert "BUILD-REACHED" not in line
    for needle in (
        "deit_tiny_patch16_224",
        "HF_HUB_OFFLINE is set (offline)",
        "timm/deit_tiny_patch16_224.fb_in1k",
        "not in the local Hugging Face cache",
        "--checkpoint FILE",
        "unset HF_HUB_OFFLINE",
    ):
        assert needle in line, line


@pytest.mark.parametrize("value", [None, "0", "false"])
def test_online_the_weights_are_left_to_timm(value, empty_hf_cache, build_marker, capsys, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    code, _, err = cli(capsys, "evaluate", "deit_tiny_patch16_224", "--data", "digits")
    assert code == 2 and "BUILD-REACHED" in one_line_error(err)


def test_offline_weights_in_the_cache_pass(empty_hf_cache, build_marker, capsys, monkeypatch):
    """The cache in huggingface_hub's layout (refs/main names the snapshot holding the file): timm may load it."""
    from lowrank_vit.cli.sources import _hub_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo, files, revision = _hub_weights("deit_tiny_patch16_224", {})
    assert (repo, files, revision) == (
        "timm/deit_tiny_patch16_224.fb_in1k",
        ("model.safetensors", "pytorch_model.bin"),
        None,
    )
    folder = empty_hf_cache / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    (folder / "snapshots" / "0123abcd" / "pytorch_model.bin").write_bytes(b"weights")
    code, _, err = cli(capsys, "evaluate", "deit_tiny_patch16_224", "--data", "digits")
    assert code == 2 and "BUILD-REACHED" in one_line_error(err)


def test_weights_from_elsewhere_are_not_checked(empty_hf_cache, monkeypatch):
    """A pretrained_cfg of the user's (--model-kwargs) or a tag timm does not have: timm decides, not this check."""
    from lowrank_vit.cli.sources import _check_offline_weights, _hub_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _hub_weights("deit_tiny_patch16_224", {"pretrained_cfg_overlay": {"file": "w.pth"}}) is None
    assert _hub_weights("deit_tiny_patch16_224.no_such_tag", {}) is None
    _check_offline_weights("deit_tiny_patch16_224.no_such_tag", {})
