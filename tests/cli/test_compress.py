"""Tests of lowrank_vit/cli/compress.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lowrank_vit.io.surgery import load_compressed, read_plan
from lowrank_vit.nn.adapters import get_adapter
from lowrank_vit.nn.factorized import FactorizedLinear
from tests.helpers import (
    ARCH,
    CLASSES,
    CLASSIFIER,
    CLI_MODEL,
    HEADLESS,
    IMAGE_SIZE,
    ONE_BLOCK_KWARGS,
    QKV,
    SIZE,
    TWO_BLOCK_KWARGS,
    _assert_one_line_error,
    _checkpoint_argv,
    _cli,
    _cli_compress,
    _cli_workdir,
    _compress,
    _compress_argv,
    _compress_checkpoint,
    _digest,
    _fabricated,
    _latency_model,
    _model_argv,
    _report,
    _run,
    cli,
    edit_plan,
    make_tiny_vit,
    one_line_error,
    patch_everywhere,
)


def _compress_headless(capsys, place: Path, out: Path, *extra: str, kwargs: dict = HEADLESS,
              weights: str = "headless.safetensors") -> tuple[int, str, str]:
    return cli(capsys, "compress", *_model_argv(place, kwargs, weights), "--data", str(place / "imgs"), "--workers",
               "0", "--reduction", "0.5", "--calib-samples", "8", "--quiet", "--output", str(out), *extra)


def _evaluate(capsys, model: Path, data: Path, *extra: str) -> dict:
    code, out, err = cli(capsys, "evaluate", str(model), "--data", str(data), "--workers", "0", "--quiet", "--json",
                         "--latency-batches", *extra)
    assert code == 0, err
    return json.loads(out)


def _assert_sane(fidelity: dict, images: int = 4) -> None:
    assert fidelity["images"] == images and fidelity["likelihood"] == "gaussian" and fidelity["output_shape"] == [32]
    assert 0 < fidelity["cosine"] <= 1 and fidelity["relative_l2"] >= 0
    assert fidelity["retrieval_k"] == (images - 1) // 2 and 0 <= fidelity["retrieval_agreement"] <= 1


@pytest.mark.usefixtures('one_thread')
def test_compress_evaluate_finetune_evaluate_a_headless_vit_on_unlabelled_images(place, compressed_headless, capsys):
    # compress: the gaussian likelihood (auto: no classes), recorded in the directory, said in the summary
    plan = read_plan(compressed_headless)
    meta = plan["metadata"]
    assert meta["output"] == {"likelihood": "gaussian", "output_key": None}
    assert meta["compression_config"]["likelihood"] == "auto" and meta["compression_config"]["output_key"] is None
    report = _report(compressed_headless)
    assert report["compression"]["config"]["likelihood"] == "gaussian"
    assert report["accuracy"] == {} and report["params"]["after"] < report["params"]["before"]
    _assert_sane(report["fidelity"]["after"])

    # evaluate: the fidelity to the dense model, rebuilt from the checkpoint compress read, on every image (no
    # validation split; compress measured its 4 held out)
    result = _evaluate(capsys, compressed_headless, place / "imgs")
    assert "top1" not in result and result["images"] == 20
    _assert_sane(result["fidelity"], images=20)
    code, out, err = cli(capsys, "evaluate", str(compressed_headless), "--data", str(place / "imgs"), "--workers", "0",
                         "--latency-batches")
    assert code == 0, err
    assert "the model is not a classifier (num_classes=0): fidelity to the dense model instead of top-1" in err
    assert f"{place / 'imgs'} has no validation split: every one of its 20 images is evaluated" in err
    assert out.splitlines()[0].startswith(
        f"directory {compressed_headless} on {place / 'imgs'}: fidelity to the dense model "
        f"(gaussian likelihood, outputs of 32 per image, 20 images): cosine "
    )
    assert "relative L2 error" in out and "9-NN retrieval agreement" in out and "top-1" not in out

    # finetune --distill 1: the dense model's outputs under the gaussian likelihood, two steps
    ft = place / "emb-50-ft"
    code, out, err = cli(
        capsys,
        "finetune",
        str(compressed_headless),
        "--data",
        str(place / "imgs"),
        "--workers",
        "0",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--distill",
        "1",
        "--quiet",
        "--output",
        str(ft),
    )
    assert code == 0, err
    assert out.startswith(f"{ft}: fine-tuned 2 steps, fidelity to the dense model: cosine ")
    ft_report = _report(ft)
    assert ft_report["finetune"]["distill"] == 1 and ft_report["finetune"]["steps"] == 2
    _assert_sane(ft_report["fidelity"]["final"])
    assert read_plan(ft)["metadata"]["output"]["likelihood"] == "gaussian"

    again = _evaluate(capsys, ft, place / "imgs")
    _assert_sane(again["fidelity"], images=20)
    assert again["fidelity"]["cosine"] != result["fidelity"]["cosine"]  # the fine-tune moved the outputs


@pytest.mark.usefixtures("one_thread")
def test_the_summary_names_the_likelihood_and_the_directory_records_the_flags(place, tmp_path, capsys):
    out = tmp_path / "direction"
    code, stdout, err = _compress_headless(capsys, place, out, "--likelihood", "gaussian-direction", "--no-eval")
    assert code == 0, err
    assert ", likelihood gaussian-direction" in stdout and "fidelity" not in stdout  # --no-eval: none measured
    meta = read_plan(out)["metadata"]
    assert meta["compression_config"]["likelihood"] == "gaussian-direction"
    assert meta["output"] == {"likelihood": "gaussian-direction", "output_key": None}
    report = _report(out)
    assert report["compression"]["config"]["likelihood"] == "gaussian-direction"


@pytest.mark.usefixtures("one_thread")
def test_evaluate_with_a_sigmoid_likelihood_adds_masks_and_correlation(place, compressed_headless, capsys):
    result = _evaluate(capsys, compressed_headless, place / "imgs", "--likelihood", "bernoulli")
    fidelity = result["fidelity"]
    assert fidelity["likelihood"] == "bernoulli"
    assert 0 <= fidelity["mask_iou"] <= 1 and -1 <= fidelity["pearson_r"] <= 1
    plain = _evaluate(capsys, compressed_headless, place / "imgs", "--no-fidelity")
    assert "fidelity" not in plain and plain["params"] == result["params"]


@pytest.mark.usefixtures("one_thread")
def test_distill_steps_on_a_headless_model_distils_its_features_on_unlabelled_images(place, compressed_headless,
                                                                                     tmp_path, capsys):
    """``--distill-steps`` after the default recipe on a model with no classes: the stage runs under the gaussian
    likelihood on the unlabelled images, and the weights it writes are the default's exactly when its check restored
    them, different (with a lower calibration loss) when it kept the steps."""
    out = tmp_path / "distilled"
    code, _, err = _compress_headless(capsys, place, out, "--distill-steps", "4")
    assert code == 0, err
    report = _report(out)["compression"]
    assert report["config"]["likelihood"] == "gaussian" and report["config"]["distill_steps"] == 4
    distillation = report["distillation"]
    assert distillation["steps"] == 4 and distillation["likelihood"] == "gaussian" and distillation["loss_before"] > 0
    mine, default = (load_compressed(path).state_dict() for path in (out, compressed_headless))
    assert mine.keys() == default.keys()
    same = all(torch.equal(mine[name], default[name]) for name in mine)
    assert same != distillation["kept"]
    assert not distillation["kept"] or distillation["loss_after"] < distillation["loss_before"]


@pytest.mark.usefixtures("one_thread")
def test_a_classifier_on_unlabelled_data_compresses_reports_fidelity_and_finetunes_only_by_distillation(
    place, tmp_path, capsys
):
    out = tmp_path / "cls"
    code, stdout, err = _compress_headless(capsys, place, out, kwargs=CLASSIFIER, weights="classifier.safetensors")
    assert code == 0, err
    assert ", likelihood categorical" in stdout and "top-1 agreement" in stdout
    report = _report(out)
    assert report["compression"]["config"]["likelihood"] == "categorical"  # labels drawn from the model itself
    code, stdout, err = cli(
        capsys, "evaluate", str(out), "--data", str(place / "imgs"), "--workers", "0", "--latency-batches"
    )
    assert code == 0, err
    assert "the data has no labels" in err and "fidelity to the dense model instead of top-1" in err
    assert "top-1 agreement" in stdout and "top-1 " not in stdout.replace("top-1 agreement", "")
    fidelity = _evaluate(capsys, out, place / "imgs")["fidelity"]
    assert fidelity["likelihood"] == "categorical" and fidelity["output_shape"] == [3]
    assert 0 <= fidelity["top1_agreement"] <= 1 and "retrieval_agreement" not in fidelity

    code, _, err = cli(
        capsys,
        "finetune",
        str(out),
        "--data",
        str(place / "imgs"),
        "--workers",
        "0",
        "--epochs",
        "1",
        "--output",
        str(tmp_path / "ft"),
        "--quiet",
    )
    assert code == 2
    assert one_line_error(err) == (
        f"lowrank-vit: error: --data {str(place / 'imgs')!r} has no labels: a fine-tune "
        f"without labels learns from the dense model's outputs alone, give --distill 1 "
        f"(got 0)"
    )
    assert not (tmp_path / "ft").exists() and not any(p.name.startswith(".ft") for p in tmp_path.iterdir())


@pytest.mark.usefixtures("one_thread")
def test_a_labelled_classifier_keeps_its_top1_and_gains_the_fidelity_beside_it(place, tmp_path, capsys):
    from tests.helpers import write_image_folder

    write_image_folder(tmp_path / "classes", classes=3, per_class=5, size=SIZE)
    out = tmp_path / "cls"
    code, stdout, err = cli(
        capsys,
        "compress",
        *_model_argv(place, CLASSIFIER, "classifier.safetensors"),
        "--data",
        str(tmp_path / "classes"),
        "--workers",
        "0",
        "--reduction",
        "0.5",
        "--calib-samples",
        "8",
        "--quiet",
        "--output",
        str(out),
    )
    assert code == 0, err
    assert ", likelihood categorical, top-1 " in stdout and "fidelity" not in stdout  # compress: as before
    result = _evaluate(capsys, out, tmp_path / "classes")
    report = _report(out)
    assert report["accuracy"]["after"]["images"] == 3  # compress: a stratified 20% held out of the 15 images
    assert 0 <= result["top1"] <= 100 and result["images"] == 15  # evaluate: every image (no validation split)
    assert result["fidelity"]["likelihood"] == "categorical" and result["fidelity"]["images"] == 15
    assert 0 <= result["fidelity"]["top1_agreement"] <= 1


def _write_pngs(folder: Path, count: int, classes: int = 0, seed: int = 1) -> Path:
    """``count`` grayscale PNGs of SIZE pixels in ``folder``, or spread over ``class{c}/`` subfolders (the image's
    index modulo ``classes``) where ``classes`` is given."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        where = folder / (f"class{i % classes}" if classes else "")
        where.mkdir(parents=True, exist_ok=True)
        pixels = rng.random((SIZE, SIZE)) * 80 + (i % max(classes, 1)) * 60
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(where / f"{i}.png")
    return folder


@pytest.mark.usefixtures("one_thread")
def test_evaluate_scores_every_image_of_data_without_a_validation_split(place, tmp_path, capsys):
    """A headless model compressed on a plain folder of 23 images: compress holds out a seeded 20% (5) for its
    fidelity, evaluate (which learns from none) scores all 23 and says so; a classifier's test folder (class
    subfolders, no train/ or val/) likewise."""
    flat = _write_pngs(tmp_path / "photos", 23)
    out = tmp_path / "emb"
    code, _, err = cli(capsys, "compress", *_model_argv(place), "--data", str(flat), "--workers", "0", "--reduction",
                       "0.5", "--calib-samples", "8", "--quiet", "--output", str(out))
    assert code == 0, err
    assert _report(out)["fidelity"]["after"]["images"] == 5  # the hold-out
    code, stdout, err = cli(capsys, "evaluate", str(out), "--data", str(flat), "--workers", "0", "--latency-batches")
    assert code == 0, err
    assert f"{flat} has no validation split: every one of its 23 images is evaluated (--val-split names one)" in err
    assert "outputs of 32 per image, 23 images): cosine " in stdout.splitlines()[0]
    assert _evaluate(capsys, out, flat)["fidelity"]["images"] == 23

    test_folder = _write_pngs(tmp_path / "test", 23, classes=3)
    code, stdout, err = cli(capsys, "evaluate", *_model_argv(place, CLASSIFIER, "classifier.safetensors"), "--data",
                            str(test_folder), "--workers", "0", "--latency-batches")
    assert code == 0, err
    assert f"{test_folder} has no validation split: every one of its 23 images is evaluated" in err
    assert stdout.splitlines()[0].endswith("(23 images)") and " top-1 " in stdout


@pytest.mark.usefixtures("one_thread")
def test_evaluate_reads_the_validation_split_the_data_has_or_the_one_named(place, tmp_path, capsys):
    """train/ (23 images) beside test/ (7): evaluate scores test/ by default and says nothing of a missing split;
    --val-split train selects the training images, all of them; a split the data lacks is one line, status 2."""
    _write_pngs(tmp_path / "data" / "train", 23, classes=3)
    _write_pngs(tmp_path / "data" / "test", 7, classes=3, seed=2)
    argv = ["evaluate", *_model_argv(place, CLASSIFIER, "classifier.safetensors"), "--data", str(tmp_path / "data"),
            "--workers", "0", "--latency-batches"]
    code, stdout, err = cli(capsys, *argv)
    assert code == 0, err
    assert stdout.splitlines()[0].endswith("(7 images)") and "no validation split" not in err
    code, stdout, err = cli(capsys, *argv, "--val-split", "train")
    assert code == 0, err
    assert stdout.splitlines()[0].endswith("(23 images)") and "no validation split" not in err
    code, _, err = cli(capsys, *argv, "--val-split", "holdout", "--quiet")
    assert code == 2 and one_line_error(err).endswith("has no split 'holdout'; its splits are ['train', 'test']: "
                                                      "set --val-split")


@pytest.mark.usefixtures("one_thread")
def test_categorical_on_a_headless_model_is_one_line_before_any_data(place, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "compress",
        *_model_argv(place),
        "--data",
        str(tmp_path / "empty-but-there"),
        "--reduction",
        "0.5",
        "--likelihood",
        "categorical",
        "--output",
        str(tmp_path / "new"),
    )
    assert code == 2 and "no data at" in one_line_error(err)  # the data path is checked first, as ever
    (tmp_path / "empty-but-there").mkdir()  # a folder without images: reading it would fail, and it is not read
    code, _, err = cli(
        capsys,
        "compress",
        *_model_argv(place),
        "--data",
        str(tmp_path / "empty-but-there"),
        "--reduction",
        "0.5",
        "--likelihood",
        "categorical",
        "--output",
        str(tmp_path / "new"),
        "--quiet",
    )
    assert code == 2
    line = one_line_error(err)
    assert "the 'categorical' likelihood weighs each layer by the gradient of the classification loss" in line
    assert "num_classes=0 (a feature extractor): use --likelihood gaussian" in line
    assert not (tmp_path / "new").exists()


@pytest.mark.usefixtures("one_thread")
def test_an_output_key_naming_nothing_is_one_line(place, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    code, _, err = cli(
        capsys,
        "compress",
        *_model_argv(place),
        "--data",
        str(tmp_path / "d"),
        "--reduction",
        "0.5",
        "--output-key",
        "pooler_output",
        "--output",
        str(tmp_path / "new"),
        "--quiet",
    )
    assert code == 2
    line = one_line_error(err)
    assert "output_key='pooler_output' names no tensor of it" in line and "--output-key" in line
    assert not (tmp_path / "new").exists()


@pytest.mark.usefixtures("one_thread")
def test_evaluate_without_labels_or_a_dense_model_says_what_it_cannot_measure(place, capsys):
    code, out, err = cli(
        capsys,
        "evaluate",
        *_model_argv(place),
        "--data",
        str(place / "imgs"),
        "--workers",
        "0",
        "--latency-batches",
        "--quiet",
    )
    assert code == 0, err
    assert out.splitlines()[0] == (
        f"timm {ARCH}, your checkpoint on {place / 'imgs'}: no top-1 (the model is not a "
        f"classifier (num_classes=0)) and no fidelity (not a compressed model directory)"
    )


@pytest.mark.usefixtures("offline")
def test_evaluate_times_the_model_in_the_precision_asked_for(images_and_weights, capsys, monkeypatch):
    """`evaluate --dtype bfloat16`: the accuracy is measured in float32 and the latency in bfloat16 (its help): the
    model's forward sees both, the timing's input in bfloat16."""
    from timm.models.vision_transformer import VisionTransformer

    seen: list[torch.dtype] = []
    real = VisionTransformer.forward

    def forward(self, x):
        seen.append(x.dtype)
        return real(self, x)

    monkeypatch.setattr(VisionTransformer, "forward", forward)
    code, out, err = cli(
        capsys,
        "evaluate",
        *_checkpoint_argv(images_and_weights),
        "--latency-batches",
        "1",
        "--repeats",
        "1",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--quiet",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["latency"]["dtype"] == "bfloat16"
    assert torch.float32 in seen and torch.bfloat16 in seen


@pytest.mark.usefixtures("offline")
def test_the_report_records_the_device_the_compression_ran_on(recompressed):
    report = _report(recompressed / "out")
    assert report["device"] == "cpu" and report["compression"]["config"]["device"] == "cpu"


@pytest.mark.usefixtures("offline")
def test_a_compress_without_a_low_rank_step_passes_the_checks_before_the_data(monkeypatch):
    """`compress --recipe vmeanba` has no compression config (None): the checks made before any data is read
    (latency table, target, rebuild) pass it through rather than read a field of nothing."""
    from lowrank_vit.cli import compress as usercli
    from lowrank_vit.cli.sources import Source

    source = Source(make_tiny_vit(seed=0), ARCH, "a model")
    monkeypatch.setattr(usercli, "load_source", lambda args: source)
    checked = usercli._compressible_source(argparse.Namespace(model="m"), None, None, torch.device("cpu"))
    assert checked == (source, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_compress_device_cuda_matches_cpu(tmp_path, capsys):
    """``lowrank-vit compress --device cuda``: test_usercli's image folder and weights, the CPU's ranks and sizes."""
    model_args = _cli_workdir(tmp_path)
    reports = {}
    for device in ("cpu", "cuda"):
        _cli_compress(capsys, tmp_path, model_args, device)
        reports[device] = _report(tmp_path / device)
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["params"] == cpu["params"]
    assert [layer["rank"] for layer in gpu["layers"]] == [layer["rank"] for layer in cpu["layers"]]
    assert gpu["accuracy"]["after"]["images"] == cpu["accuracy"]["after"]["images"] == 6
    assert abs(gpu["accuracy"]["after"]["top1"] - cpu["accuracy"]["after"]["top1"]) <= 100 / 6 + 1e-9  # one image


def test_cli_compress_refuses_a_stale_table_and_an_unreachable_speedup_in_one_line(capsys, tmp_path):
    model = _latency_model()
    stale = _fabricated(model, versions={"torch": "0.0.1"}).save(tmp_path / "stale.json")
    good = _fabricated(model).save(tmp_path / "good.json")
    (tmp_path / "nodata").mkdir()  # a folder without images: both refusals come before any data is read
    base = [
        "compress",
        *CLI_MODEL,
        "--no-pretrained",
        "--data",
        str(tmp_path / "nodata"),
        "--quiet",
        "--output",
        str(tmp_path / "out"),
    ]
    code, _, err = cli(capsys, *base, "--reduction", "0.3", "--latency-table", str(stale))
    assert code == 2 and "re-profile" in one_line_error(err)
    code, _, err = cli(capsys, *base, "--target-speedup", "40", "--latency-table", str(good))
    assert code == 2 and "out of reach" in one_line_error(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("one_thread_module")
@pytest.mark.parametrize(
    "change",
    [lambda p: p.update(metadata="oops"), lambda p: p["layers"][QKV].update(rank=-5)],
    ids=["metadata", "rank"],
)
def test_cli_refuses_a_plan_with_bad_fields(saved, tmp_path, capsys, change):
    from lowrank_vit.cli import main as cli

    edit_plan(saved, change)
    code = cli.main(["export", str(saved), "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "lowrank_vit.json is malformed" in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_compress_writes_a_complete_model_directory(compressed, workdir):
    from lowrank_vit.cli.outputs import model_dir_files

    names = {p.name for p in compressed.iterdir()}
    # exactly what --force may replace: anything else in a model directory is the user's
    assert (
        names
        == set(model_dir_files())
        == {"model.safetensors", "lowrank_vit.json", "report.json", "ranks.png", "README.md"}
    )
    assert not [p for p in workdir.iterdir() if p.name.startswith(".deit-30")], "a staging directory was left"
    report = _report(compressed)
    assert report["params"]["after"] < report["params"]["before"]
    assert abs(report["reduction"] - 0.3) < 0.01
    assert report["accuracy"]["before"]["images"] == report["accuracy"]["after"]["images"] == 6  # 20% held out
    # preprocessing: the checkpoint's metadata beats timm's ImageNet config of this name; saved with the model
    pre = read_plan(compressed)["metadata"]["preprocessing"]
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5] and pre["crop_pct"] == 1.0
    assert pre["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    model = load_compressed(compressed)
    factorized = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert factorized
    card = (compressed / "README.md").read_text()
    assert "load_compressed" in card and "loss-aware" in card and f"`{factorized[0]}`" in card
    assert f"{report['params']['after']:,}" in card


def test_compress_with_the_refit_recipe(workdir, tmp_path, capsys):
    """``--recipe loss-aware-refit``: the refit runs from the CLI on the user's images and the report says so."""
    code, _, err = _compress(capsys, workdir, tmp_path / "refit", "--reduction", "0.5", "--recipe", "loss-aware-refit")
    assert code == 0, err
    report = _report(tmp_path / "refit")
    assert report["compression"]["config"]["refit"] is True
    assert report["compression"]["stage_seconds"]["refit"] > 0
    assert load_compressed(tmp_path / "refit") is not None


def test_compress_with_the_block_recipe(workdir, tmp_path, capsys):
    """``--recipe loss-aware-block``: the block stage runs from the CLI in the Fisher metric, without labels, and
    the model it writes loads back."""
    code, _, err = _compress(capsys, workdir, tmp_path / "block", "--reduction", "0.5", "--recipe", "loss-aware-block")
    assert code == 0, err
    report = _report(tmp_path / "block")
    config = report["compression"]["config"]
    assert config["block_reconstruction"] == "factors" and config["block_metric"] == "fisher"
    assert report["compression"]["stage_seconds"]["block_reconstruction"] > 0
    assert load_compressed(tmp_path / "block") is not None


def test_compress_with_the_distillation_recipe(workdir, tmp_path, capsys):
    """``--recipe loss-aware-distill``: the refit and the distillation run from the CLI without labels; the report
    records what the distillation did, and the model it writes loads back."""
    code, _, err = _compress(capsys, workdir, tmp_path / "distill", "--reduction", "0.5", "--recipe",
                             "loss-aware-distill")
    assert code == 0, err
    report = _report(tmp_path / "distill")["compression"]
    assert report["config"]["refit"] is True and report["config"]["distill_steps"] == 128
    assert report["stage_seconds"]["distillation"] > 0
    assert report["distillation"]["steps"] == 128 and isinstance(report["distillation"]["kept"], bool)
    assert load_compressed(tmp_path / "distill") is not None


def test_distill_steps_sets_the_distillation_of_any_recipe_and_a_negative_count_is_one_line(workdir, tmp_path, capsys):
    """``--distill-steps N`` replaces the recipe's steps (loss-aware-distill's 128) and turns the stage on after a
    recipe without one; 0 turns it off; a negative count is argparse's one line, exit 2, nothing written."""
    code, _, err = _compress(capsys, workdir, tmp_path / "long", "--reduction", "0.5", "--recipe",
                             "loss-aware-distill", "--distill-steps", "3")
    assert code == 0, err
    report = _report(tmp_path / "long")["compression"]
    assert report["config"]["distill_steps"] == 3 and report["distillation"]["steps"] == 3
    code, _, err = _compress(capsys, workdir, tmp_path / "off", "--reduction", "0.5", "--recipe",
                             "loss-aware-distill", "--distill-steps", "0")
    assert code == 0, err
    report = _report(tmp_path / "off")["compression"]
    assert report["config"]["distill_steps"] == 0 and not report.get("distillation")
    assert "distillation" not in report["stage_seconds"]
    code, _, err = _compress(capsys, workdir, tmp_path / "default", "--reduction", "0.5", "--distill-steps", "2")
    assert code == 0, err
    report = _report(tmp_path / "default")["compression"]
    assert report["config"]["refit"] is False and report["distillation"]["steps"] == 2
    with pytest.raises(SystemExit) as info:
        _compress(capsys, workdir, tmp_path / "bad", "--reduction", "0.5", "--distill-steps", "-1")
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --distill-steps: expected an integer >= 0, got '-1'")
    assert not (tmp_path / "bad").exists()


SWINV2_CR = {"img_size": IMAGE_SIZE, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4,
             "num_classes": CLASSES}


def _swinv2_cr_argv(tmp_path: Path, workdir: Path, out: Path) -> list:
    """timm's Swin V2 "cr" variant names its stages and options unlike Swin's: the spec read from its modules does
    not rebuild it; the --model-kwargs that built it do."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("swinv2_cr_tiny_224", pretrained=False, **SWINV2_CR).state_dict(),
              str(tmp_path / "swin.safetensors"))
    return ["compress", "swinv2_cr_tiny_224", "--preprocessing", "timm", "--checkpoint", tmp_path / "swin.safetensors",
            "--model-kwargs", json.dumps(SWINV2_CR), "--data", workdir / "imgs", "--workers", "0", "--quiet",
            "--calib-samples", "8", "--no-dense-eval", "--reduction", "0.3", "--output", out,
            "--recipe", "paper"]  # random weights: timm starts the post-norms at zero, so no loss gradient reaches qkv


def test_compress_saves_a_model_with_the_arguments_that_built_it(workdir, tmp_path, capsys):
    """The plan records the timm name and --model-kwargs the model was built with, where the adapter's reading of
    its modules would not rebuild it; the directory loads back with its factorized layers."""
    code, _, err = _run(capsys, *_swinv2_cr_argv(tmp_path, workdir, tmp_path / "out"))
    assert code == 0, err
    plan = read_plan(tmp_path / "out")
    assert (plan["architecture"], plan["model_kwargs"]) == ("swinv2_cr_tiny_224", SWINV2_CR)
    loaded = load_compressed(tmp_path / "out")
    assert any(isinstance(m, FactorizedLinear) for m in loaded.modules())


def test_compress_refuses_a_model_it_could_not_save_before_calibrating(workdir, tmp_path, capsys, monkeypatch):
    """Where the command does not hold the arguments that built the model (a hub name's), and the adapter's reading
    does not rebuild it, the model is refused before any calibration."""
    from lowrank_vit import pipeline
    from lowrank_vit.cli import compress as command

    loaded = command.load_source
    monkeypatch.setattr(command, "load_source", lambda args: dataclasses.replace(loaded(args), rebuild=None))
    patch_everywhere(monkeypatch, pipeline, "compress", lambda *a, **k: pytest.fail("calibration must not start"))
    code, _, err = _run(capsys, *_swinv2_cr_argv(tmp_path, workdir, tmp_path / "out"))
    _assert_one_line_error(code, err, "cannot compress swinv2_cr_tiny_224", "could not be saved and loaded again")
    assert not (tmp_path / "out").exists()


def test_evaluate_reuses_the_saved_preprocessing(compressed, capsys):
    report = _report(compressed)
    code, out, err = _run(
        capsys,
        "evaluate",
        compressed,
        "--data",
        compressed.parent / "imgs",
        "--workers",
        "0",
        "--json",
        "--quiet",
        "--repeats",
        "2",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    # same split, same preprocessing: the same accuracy compress measured right after compressing
    assert result["top1"] == pytest.approx(report["accuracy"]["after"]["top1"])
    assert result["classes"] == report["accuracy"]["after"]["classes"] == CLASSES
    assert result["params"] == report["params"]["after"]
    assert set(result["latency_ms"]) == {"1", "32"} and all(v > 0 for v in result["latency_ms"].values())
    # the size both commands report is the bytes of the saved float32 tensors (an independent count of the file)
    from safetensors import safe_open

    with safe_open(str(compressed / "model.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert result["size_mib"] == pytest.approx(stored / 2**20, rel=1e-9)
    assert report["size_mib"]["after"] == pytest.approx(stored / 2**20, rel=1e-9)
    assert report["size_mib"]["before"] == pytest.approx(4 * report["params"]["before"] / 2**20, rel=1e-9)


def _payload_bytes(weights: Path) -> int:
    """The bytes of a safetensors file's tensors, read off the file itself: its size less the 8-byte length field
    and the JSON header that field gives (the format's layout), an account independent of any tensor code."""
    raw = weights.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("bits", [None, 8, 4], ids=["float32", "8-bit", "4-bit"])
@pytest.mark.parametrize("compensation", ["none", "lowrank", "sparse", "diagonal", "structured"])
def test_the_size_evaluate_reports_is_the_bytes_its_file_holds(workdir, tmp_path, capsys, compensation, bits):
    """Every Z kind, float32 and quantized: the size ``evaluate`` prints is the saved weights' bytes (quantized codes
    with their scales and zero points, a sparse Z's index lists), not an accounting that differs from the disk."""
    import timm
    from safetensors.torch import load_file

    from lowrank_vit import compress, quantize_
    from lowrank_vit.config import recipe
    from lowrank_vit.io.surgery import save_compressed

    model = timm.create_model(ARCH, pretrained=False, img_size=IMAGE_SIZE, **TWO_BLOCK_KWARGS)
    model.load_state_dict(load_file(str(workdir / "weights.safetensors")))
    images = torch.randn(
        20, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3)
    )  # 20: not a batch multiple
    compress(
        model,
        [images[:12], images[12:]],
        recipe("paper", reduction=0.4, compensation=compensation, calib_samples=20, progress=False),
    )
    if bits:
        quantize_(model, bits=bits)
    save_compressed(
        model,
        tmp_path / "m",
        model_name=ARCH,
        model_kwargs={**TWO_BLOCK_KWARGS, "img_size": IMAGE_SIZE},
        metadata={"preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}},
    )
    code, out, err = _run(
        capsys,
        "evaluate",
        tmp_path / "m",
        "--data",
        workdir / "imgs",
        "--workers",
        "0",
        "--json",
        "--quiet",
        "--latency-batches",
    )
    assert code == 0, err
    stored = _payload_bytes(tmp_path / "m" / "model.safetensors")
    assert json.loads(out)["size_mib"] * 2**20 == pytest.approx(stored, rel=1e-12)
    dense = sum(p.numel() for p in timm.create_model(ARCH, img_size=IMAGE_SIZE, **TWO_BLOCK_KWARGS).parameters())
    assert stored < 4 * dense  # compressed: fewer bytes than the dense float32 weights


def test_export_runs_in_onnxruntime_and_matches(compressed, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from lowrank_vit.io.export import onnx_logits

    target = tmp_path / "model.onnx"
    code, out, err = _run(capsys, "export", compressed, "--format", "onnx", "--output", target)
    assert code == 0, err
    assert "relative error" in out
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_compressed(compressed)(images)
    assert float((onnx_logits(target, images) - expected).norm() / expected.norm()) <= 1e-4
    import onnx

    props = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert json.loads(props["lowrank_vit.preprocessing"])["mean"] == [0.5, 0.5, 0.5]
    # an existing file is not replaced without --force
    before = _digest(target)
    code, _, err = _run(capsys, "export", compressed, "--fold", "--output", target)
    _assert_one_line_error(code, err, "--force")
    assert _digest(target) == before


def test_export_of_a_model_with_an_unknown_layer_kind(compressed_plain, tmp_path, capsys):
    plan = json.loads((compressed_plain / "lowrank_vit.json").read_text())
    first = next(iter(plan["layers"]))
    plan["layers"][first]["z"] = {"kind": "hologram", "rank": 1}
    (compressed_plain / "lowrank_vit.json").write_text(json.dumps(plan))
    code, _, err = _run(capsys, "export", compressed_plain, "--output", tmp_path / "m.onnx")
    _assert_one_line_error(code, err, "hologram")
    assert not (tmp_path / "m.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_export_quantized_as_qdq(compressed_plain, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    from lowrank_vit import quantize_, save_compressed

    model = load_compressed(compressed_plain)
    quantize_(model, bits=8)
    directory = save_compressed(model, tmp_path / "q8")
    target = tmp_path / "q8.onnx"
    code, out, err = _run(capsys, "export", directory, "--quantized", "qdq", "--output", target, "--quiet")
    assert code == 0, err
    ops = [node.op_type for node in onnx.load(str(target)).graph.node]
    assert ops.count("DequantizeLinear") > 0 and "QuantizeLinear" not in ops
    assert float(out.split("relative error ")[1].split()[0]) <= 1e-4


def test_export_force_replaces_only_an_onnx_file(compressed_plain, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = _run(capsys, "export", compressed_plain, "--output", notes, "--force")
    _assert_one_line_error(code, err, "not an .onnx file")
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("command", ["export", "finetune"])
def test_a_model_that_is_not_a_model_directory(command, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    extra = {"export": [], "finetune": ["--data", tmp_path, "--epochs", "1"]}[command]
    for given in (tmp_path / "missing", tmp_path / "model.safetensors"):
        code, _, err = _run(capsys, command, given, *extra, "--output", tmp_path / "out.onnx")
        _assert_one_line_error(code, err, "no model directory", f"{command} takes a directory")
    assert not (tmp_path / "out.onnx").exists()


def test_compressing_a_compressed_directory_is_refused_before_the_data(compressed_plain, tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # a folder without images: reading it would fail, so the model must fail first
    code, _, err = _run(
        capsys,
        "compress",
        compressed_plain,
        "--data",
        tmp_path / "empty",
        "--reduction",
        "0.3",
        "--output",
        tmp_path / "o",
    )
    _assert_one_line_error(code, err, "already compressed")  # not "--data ... holds no images": the model fails first
    assert not (tmp_path / "o").exists()


def test_an_unreachable_target_is_refused_before_the_data(tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # a folder without images: reading it would fail
    for budget, needle in (
        (["--target-params", "99999999"], "is not below the model's"),
        (["--reduction", "0.999"], "largest reachable reduction"),
    ):
        code, _, err = _run(
            capsys,
            "compress",
            ARCH,
            "--no-pretrained",
            "--model-kwargs",
            json.dumps(TWO_BLOCK_KWARGS),
            "--input-size",
            str(IMAGE_SIZE),
            "--data",
            tmp_path / "empty",
            *budget,
            "--output",
            tmp_path / "o",
        )
        _assert_one_line_error(code, err, needle)  # not "--data ... holds no images": the data is not read yet


def test_export_writes_float_weights_unless_qdq_is_asked(model_dir, tmp_path, capsys):
    """The default of ``--quantized`` is ``dequantized``: a quantized model exports with its weights as float
    values (no DequantizeLinear node, no uint8 tensor), the form every ONNX runtime reads."""
    onnx = pytest.importorskip("onnx")
    target = tmp_path / "model.onnx"
    code, _, err = cli(capsys, "export", str(model_dir), "--output", str(target), "--no-check", "--quiet")
    assert code == 0, err
    graph = onnx.load(str(target)).graph
    assert "DequantizeLinear" not in {node.op_type for node in graph.node}
    assert all(t.data_type != onnx.TensorProto.UINT8 for t in graph.initializer)


def test_evaluate_limit_takes_the_first_n_validation_images(checkpoint, images, capsys):
    """`evaluate --limit N`: a quick look on the first N images of the validation split, always the same ones."""
    base = [
        "evaluate",
        ARCH,
        "--checkpoint",
        str(checkpoint),
        "--model-kwargs",
        json.dumps(ONE_BLOCK_KWARGS),
        "--input-size",
        str(IMAGE_SIZE),
        "--preprocessing",
        "timm",
        "--data",
        str(images),
        "--workers",
        "0",
        "--json",
        "--quiet",
        "--latency-batches",
    ]
    code, out, err = cli(capsys, *base, "--limit", "2")
    assert code == 0, err
    assert json.loads(out)["images"] == 2
    code, out, _ = cli(capsys, *base, "--limit", "100000")
    code_all, out_all, _ = cli(capsys, *base)
    assert code == code_all == 0 and json.loads(out)["images"] == json.loads(out_all)["images"] > 2
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal
        cli(capsys, *base, "--limit", "0")
    assert exit_.value.code == 2 and "--limit" in one_line_error(capsys.readouterr().err)


def test_no_dense_eval_leaves_the_before_accuracy_out(
    class_folder, plain_checkpoint, cache, evaluations, tmp_path, capsys
):
    code, out, err = _compress_checkpoint(
        capsys, class_folder, plain_checkpoint, tmp_path / "a", "--preprocessing", "timm", "--no-dense-eval"
    )
    assert code == 0, err
    assert evaluations == ["evaluate compressed"]
    report = _report(tmp_path / "a")
    assert set(report["accuracy"]) == {"after"} and "evaluate_before" not in report["timings_s"]
    after = report["accuracy"]["after"]["top1"]
    assert f"top-1 {after:.2f}% compressed" in out and "->" not in out.split("top-1")[1]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "after compression" in card and "starting model" not in card
    assert not (cache / "dense").exists()  # nothing evaluated, nothing cached


def test_cli_compresses_a_state_space_model_with_vmeanba_and_with_both(ssm_workdir, tmp_path, capsys):

    from lowrank_vit import load_compressed
    from lowrank_vit.io.surgery import read_plan

    code, out, err = _cli(
        capsys, ssm_workdir, "--recipe", "vmeanba", "--vmeanba-blocks", "2", "--no-timing", "--output", tmp_path / "v"
    )
    assert code == 0, err
    report = _report(tmp_path / "v")
    assert len(report["vmeanba"]["chosen"]) == 2 and report["reduction"] == 0
    assert sorted(read_plan(tmp_path / "v")["mean_scan"]) == sorted(report["vmeanba"]["chosen"])
    assert "VMeanba on 2 block(s)" in out
    loaded = load_compressed(tmp_path / "v")
    assert sum(op.mean_scan for op in get_adapter(loaded).scan_modules(loaded).values()) == 2

    code, out, err = _cli(
        capsys,
        ssm_workdir,
        "--recipe",
        "loss-aware",
        "--reduction",
        "0.3",
        "--vmeanba-blocks",
        "1",
        "--no-timing",
        "--output",
        tmp_path / "both",
    )
    assert code == 0, err
    report = _report(tmp_path / "both")
    assert len(report["vmeanba"]["chosen"]) == 1 and report["reduction"] == pytest.approx(0.3, abs=0.02)
    assert report["accuracy"]["after"]["top1"] >= 0 and "VMeanba on 1 block(s)" in out


def test_cli_vmeanba_on_a_vision_transformer_is_one_line(tmp_path, capsys):
    from lowrank_vit.cli import main as cli

    code = cli.main(
        [
            "compress",
            "vit_tiny_patch16_224",
            "--no-pretrained",
            "--model-kwargs",
            '{"depth": 2, "embed_dim": 16, "num_heads": 2, "num_classes": 3}',
            "--input-size",
            "32",
            "--data",
            str(tmp_path),
            "--recipe",
            "vmeanba",
            "--vmeanba-blocks",
            "1",
            "--output",
            str(tmp_path / "m"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "VisionTransformer has no selective-scan block (found 2 attention block(s))" in err


@pytest.mark.usefixtures("one_thread")
def test_evaluate_rebuilds_the_dense_model_from_dense_checkpoint_when_the_recorded_weights_moved(
        place, compressed_headless, tmp_path, capsys):
    """The dense weights compress read were moved: evaluate cannot rebuild the dense model from the recorded path
    and says so (no fidelity, a note naming --dense-checkpoint), and with `--dense-checkpoint FILE` (the moved
    file) it measures the same fidelity as the untouched directory does."""
    import shutil

    expected = _evaluate(capsys, compressed_headless, place / "imgs")["fidelity"]
    moved = tmp_path / "moved"
    shutil.copytree(compressed_headless, moved)
    weights = tmp_path / "dense.safetensors"  # the weights compress read, under another name
    weights.write_bytes((place / "headless.safetensors").read_bytes())
    edit_plan(moved, lambda plan: plan["metadata"]["source"].update(checkpoint=str(tmp_path / "gone.safetensors")))

    code, out, err = cli(capsys, "evaluate", str(moved), "--data", str(place / "imgs"), "--workers", "0", "--json",
                         "--latency-batches")
    assert code == 0, err
    assert "fidelity" not in json.loads(out)
    assert (f"the fidelity to the dense model: the dense weights compress read, "
            f"{str(tmp_path / 'gone.safetensors')!r}, is gone since; give --dense-checkpoint FILE") in err

    rebuilt = _evaluate(capsys, moved, place / "imgs", "--dense-checkpoint", str(weights))["fidelity"]
    assert rebuilt == expected


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("recipe", "reduction", "hinted"), [("loss-aware", "0.5", True), ("loss-aware", "0.45", False),
                                                             ("loss-aware-refit", "0.7", False),
                                                             ("loss-aware-anchored", "0.7", False)])
def test_compress_points_to_the_refit_for_a_model_shipped_without_finetune(place, tmp_path, capsys, recipe,
                                                                             reduction, hinted):
    """From -50% with the default recipe, stderr names the refit and the fine-tune command; not below it, not when
    the refit is already the recipe, and stdout's one line is unchanged."""
    out = tmp_path / f"{recipe}-{reduction}"
    code, stdout, err = cli(capsys, "compress", *_model_argv(place, HEADLESS, "headless.safetensors"), "--data",
                            str(place / "imgs"), "--workers", "0", "--reduction", reduction, "--calib-samples", "8",
                            "--recipe", recipe, "--no-eval", "--output", str(out))
    assert code == 0, err
    assert stdout.count("\n") == 1
    hint = (f"shipping it without a fine-tune? --recipe loss-aware-anchored keeps more of the dense model at this "
            f"reduction, for about three times the time, --recipe loss-aware-distill more still, for far more (a GPU's "
            f"work; docs/loss_aware.md); to fine-tune it: lowrank-vit finetune {out} --data DATA --output NEWDIR")
    assert (hint in err) == hinted


@pytest.mark.usefixtures("offline")
def test_an_auto_latency_table_is_profiled_on_the_device_compress_runs_on(images_and_weights, tmp_path, capsys,
                                                                            monkeypatch):
    """`--latency-table auto` without --latency-device profiles on --device (its help: "default: --device"), so
    `--device cpu` on a machine with a GPU gets a table of the CPU, the device the compressed model is meant for."""
    from lowrank_vit import speed

    asked = []

    def profile(model, **kwargs):
        asked.append(kwargs["device"])
        raise ValueError("stop here")  # refused as the user's error: enough to see what was asked

    patch_everywhere(monkeypatch, speed, "cached_profile", profile)
    for extra, device in ((["--device", "cpu"], "cpu"), (["--device", "cpu", "--latency-device", "cuda"], "cuda")):
        code, _, err = cli(capsys, *_compress_argv(images_and_weights, tmp_path / "l", "--latency-table", "auto",
                                                   "--quiet", *extra))
        assert code == 2 and "stop here" in err
        assert asked[-1] == device
