"""The command line on a model that is not a classifier (a headless timm ViT: pooled features) and on data without
labels: ``compress`` / ``evaluate`` / ``finetune --distill 1`` end to end on an image folder with no class
subfolders, the fidelity figures ``evaluate`` reports instead of top-1 (each metric against a hand computation),
the data read without labels, and the refusals (one line, exit status 2, nothing written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_vit.cli import fidelity as fid
from lowrank_vit.cli.main import build_parser
from lowrank_vit.io.surgery import read_plan

from conftest import cli, one_line_error

ARCH = "vit_tiny_patch16_224"
HEADLESS = {"num_classes": 0, "patch_size": 7, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}
CLASSIFIER = {**HEADLESS, "num_classes": 3}
SIZE, IMAGES = 28, 20  # 20 images, none labelled: a seeded 20% (4) held out for the evaluation


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, no oversubscription


def _weights(path: Path, kwargs: dict) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **kwargs)
    save_file(model.state_dict(), str(path), metadata={"mean": "[0.5]", "std": "[0.5]", "crop_pct": "1.0"})
    return path


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """Grayscale PNGs, some directly in ``imgs/``, some nested at other depths (no class subfolders), and the
    headless and classifier weights, read from files so that the dense model can be rebuilt."""
    from PIL import Image

    root = tmp_path_factory.mktemp("anyoutput")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = root / "imgs" / ("" if i % 2 else ("deep/er" if i % 4 else "deep"))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((SIZE, SIZE)) * 120 + (i % 5) * 30).astype(np.uint8), mode="L").save(
            folder / f"{i}.png")
    _weights(root / "headless.safetensors", HEADLESS)
    _weights(root / "classifier.safetensors", CLASSIFIER)
    return root


def _model_argv(place: Path, kwargs: dict = HEADLESS, weights: str = "headless.safetensors") -> list[str]:
    return [ARCH, "--checkpoint", str(place / weights), "--model-kwargs", json.dumps(kwargs), "--input-size",
            f"1,{SIZE},{SIZE}"]


def _compress(capsys, place: Path, out: Path, *extra: str, kwargs: dict = HEADLESS,
              weights: str = "headless.safetensors") -> tuple[int, str, str]:
    return cli(capsys, "compress", *_model_argv(place, kwargs, weights), "--data", str(place / "imgs"), "--workers",
               "0", "--reduction", "0.5", "--calib-samples", "8", "--quiet", "--output", str(out), *extra)


def _evaluate(capsys, model: Path, data: Path, *extra: str) -> dict:
    code, out, err = cli(capsys, "evaluate", str(model), "--data", str(data), "--workers", "0", "--quiet", "--json",
                         "--latency-batches", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def compressed(place) -> Path:
    from lowrank_vit.cli.main import main

    out = place / "emb-50"
    assert main(["compress", *_model_argv(place), "--data", str(place / "imgs"), "--workers", "0", "--reduction",
                 "0.5", "--calib-samples", "8", "--quiet", "--output", str(out)]) == 0
    return out


def _assert_sane(fidelity: dict, images: int = 4) -> None:
    assert fidelity["images"] == images and fidelity["likelihood"] == "gaussian" and fidelity["output_shape"] == [32]
    assert 0 < fidelity["cosine"] <= 1 and fidelity["relative_l2"] >= 0
    assert fidelity["retrieval_k"] == (images - 1) // 2 and 0 <= fidelity["retrieval_agreement"] <= 1


# ---------------------------------------------------------------------------------------------- end to end


def test_compress_evaluate_finetune_evaluate_a_headless_vit_on_unlabelled_images(place, compressed, capsys):
    # compress: the gaussian likelihood (auto: no classes), recorded in the directory, said in the summary
    plan = read_plan(compressed)
    meta = plan["metadata"]
    assert meta["output"] == {"likelihood": "gaussian", "output_key": None}
    assert meta["compression_config"]["likelihood"] == "auto" and meta["compression_config"]["output_key"] is None
    report = json.loads((compressed / "report.json").read_text())
    assert report["compression"]["config"]["likelihood"] == "gaussian"
    assert report["accuracy"] == {} and report["params"]["after"] < report["params"]["before"]
    _assert_sane(report["fidelity"]["after"])

    # evaluate: the fidelity to the dense model, rebuilt from the checkpoint compress read
    result = _evaluate(capsys, compressed, place / "imgs")
    assert "top1" not in result and result["images"] == 4
    _assert_sane(result["fidelity"])
    assert result["fidelity"]["cosine"] == pytest.approx(report["fidelity"]["after"]["cosine"], rel=1e-9)
    code, out, err = cli(capsys, "evaluate", str(compressed), "--data", str(place / "imgs"), "--workers", "0",
                         "--latency-batches")
    assert code == 0, err
    assert "the model is not a classifier (num_classes=0): fidelity to the dense model instead of top-1" in err
    assert out.splitlines()[0].startswith(f"directory {compressed} on {place / 'imgs'}: fidelity to the dense model "
                                          f"(gaussian likelihood, outputs of 32 per image, 4 images): cosine ")
    assert "relative L2 error" in out and "1-NN retrieval agreement" in out and "top-1" not in out

    # finetune --distill 1: the dense model's outputs under the gaussian likelihood, two steps
    ft = place / "emb-50-ft"
    code, out, err = cli(capsys, "finetune", str(compressed), "--data", str(place / "imgs"), "--workers", "0",
                         "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--distill", "1", "--quiet",
                         "--output", str(ft))
    assert code == 0, err
    assert out.startswith(f"{ft}: fine-tuned 2 steps, fidelity to the dense model: cosine ")
    ft_report = json.loads((ft / "report.json").read_text())
    assert ft_report["finetune"]["distill"] == 1 and ft_report["finetune"]["steps"] == 2
    _assert_sane(ft_report["fidelity"]["final"])
    assert read_plan(ft)["metadata"]["output"]["likelihood"] == "gaussian"

    again = _evaluate(capsys, ft, place / "imgs")
    _assert_sane(again["fidelity"])
    assert again["fidelity"]["cosine"] == pytest.approx(ft_report["fidelity"]["final"]["cosine"], rel=1e-9)
    assert again["fidelity"]["cosine"] != result["fidelity"]["cosine"]  # the fine-tune moved the outputs


def test_the_summary_names_the_likelihood_and_the_directory_records_the_flags(place, tmp_path, capsys):
    out = tmp_path / "direction"
    code, stdout, err = _compress(capsys, place, out, "--likelihood", "gaussian-direction", "--no-eval")
    assert code == 0, err
    assert ", likelihood gaussian-direction" in stdout and "fidelity" not in stdout  # --no-eval: none measured
    meta = read_plan(out)["metadata"]
    assert meta["compression_config"]["likelihood"] == "gaussian-direction"
    assert meta["output"] == {"likelihood": "gaussian-direction", "output_key": None}
    report = json.loads((out / "report.json").read_text())
    assert report["compression"]["config"]["likelihood"] == "gaussian-direction"


def test_output_key_reads_an_integer_as_a_tuple_index(place):
    from lowrank_vit.cli.args import compression_config

    base = ["compress", *_model_argv(place), "--data", "d", "--reduction", "0.5", "--output", "o"]
    args = build_parser().parse_args([*base, "--output-key", "1"])
    assert args.output_key == 1 and compression_config(args, torch.device("cpu")).output_key == 1
    args = build_parser().parse_args([*base, "--output-key", "pooler_output", "--likelihood", "bernoulli"])
    cfg = compression_config(args, torch.device("cpu"))
    assert (cfg.output_key, cfg.likelihood) == ("pooler_output", "bernoulli")
    assert cfg.to_dict()["output_key"] == "pooler_output"
    assert build_parser().parse_args(base).likelihood == "auto"


def test_evaluate_with_a_sigmoid_likelihood_adds_masks_and_correlation(place, compressed, capsys):
    result = _evaluate(capsys, compressed, place / "imgs", "--likelihood", "bernoulli")
    fidelity = result["fidelity"]
    assert fidelity["likelihood"] == "bernoulli"
    assert 0 <= fidelity["mask_iou"] <= 1 and -1 <= fidelity["pearson_r"] <= 1
    plain = _evaluate(capsys, compressed, place / "imgs", "--no-fidelity")
    assert "fidelity" not in plain and plain["params"] == result["params"]


def test_a_classifier_on_unlabelled_data_compresses_reports_fidelity_and_finetunes_only_by_distillation(
        place, tmp_path, capsys):
    out = tmp_path / "cls"
    code, stdout, err = _compress(capsys, place, out, kwargs=CLASSIFIER, weights="classifier.safetensors")
    assert code == 0, err
    assert ", likelihood categorical" in stdout and "top-1 agreement" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["compression"]["config"]["likelihood"] == "categorical"  # labels drawn from the model itself
    code, stdout, err = cli(capsys, "evaluate", str(out), "--data", str(place / "imgs"), "--workers", "0",
                            "--latency-batches")
    assert code == 0, err
    assert "the data has no labels" in err and "fidelity to the dense model instead of top-1" in err
    assert "top-1 agreement" in stdout and "top-1 " not in stdout.replace("top-1 agreement", "")
    fidelity = _evaluate(capsys, out, place / "imgs")["fidelity"]
    assert fidelity["likelihood"] == "categorical" and fidelity["output_shape"] == [3]
    assert 0 <= fidelity["top1_agreement"] <= 1 and "retrieval_agreement" not in fidelity

    code, _, err = cli(capsys, "finetune", str(out), "--data", str(place / "imgs"), "--workers", "0", "--epochs",
                       "1", "--output", str(tmp_path / "ft"), "--quiet")
    assert code == 2
    assert one_line_error(err) == (f"lowrank-vit: error: --data {str(place / 'imgs')!r} has no labels: a fine-tune "
                                   f"without labels learns from the dense model's outputs alone, give --distill 1 "
                                   f"(got 0)")
    assert not (tmp_path / "ft").exists() and not any(p.name.startswith(".ft") for p in tmp_path.iterdir())


def test_a_labelled_classifier_keeps_its_top1_and_gains_the_fidelity_beside_it(place, tmp_path, capsys):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "classes", classes=3, per_class=5, size=SIZE)
    out = tmp_path / "cls"
    code, stdout, err = cli(capsys, "compress", *_model_argv(place, CLASSIFIER, "classifier.safetensors"), "--data",
                            str(tmp_path / "classes"), "--workers", "0", "--reduction", "0.5", "--calib-samples", "8",
                            "--quiet", "--output", str(out))
    assert code == 0, err
    assert ", likelihood categorical, top-1 " in stdout and "fidelity" not in stdout  # compress: as before
    result = _evaluate(capsys, out, tmp_path / "classes")
    report = json.loads((out / "report.json").read_text())
    assert result["top1"] == pytest.approx(report["accuracy"]["after"]["top1"]) and result["images"] == 3
    assert result["fidelity"]["likelihood"] == "categorical" and result["fidelity"]["images"] == 3
    assert 0 <= result["fidelity"]["top1_agreement"] <= 1


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


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("distill", [None, "0.5"])
def test_finetune_of_a_headless_model_needs_distill_1(place, compressed, tmp_path, capsys, distill):
    extra = [] if distill is None else ["--distill", distill]
    code, _, err = cli(capsys, "finetune", str(compressed), "--data", str(place / "imgs"), "--workers", "0",
                       "--epochs", "1", "--output", str(tmp_path / "ft"), "--quiet", *extra)
    assert code == 2
    assert one_line_error(err) == (f"lowrank-vit: error: {str(compressed)!r} holds a model that is not a classifier "
                                   f"(num_classes=0): it fine-tunes toward the dense model's outputs alone, give "
                                   f"--distill 1 (got {distill or 0})")
    assert not (tmp_path / "ft").exists() and not any(p.name.startswith(".ft") for p in tmp_path.iterdir())


def test_a_temperature_is_refused_for_a_likelihood_without_one(place, compressed, tmp_path, capsys):
    code, _, err = cli(capsys, "finetune", str(compressed), "--data", str(place / "imgs"), "--epochs", "1",
                       "--distill", "1", "--distill-temperature", "2", "--output", str(tmp_path / "ft"), "--quiet")
    assert code == 2
    assert "--distill-temperature softens class logits only; the 'gaussian' likelihood" in one_line_error(err)


def test_categorical_on_a_headless_model_is_one_line_before_any_data(place, tmp_path, capsys):
    code, _, err = cli(capsys, "compress", *_model_argv(place), "--data", str(tmp_path / "empty-but-there"),
                       "--reduction", "0.5", "--likelihood", "categorical", "--output", str(tmp_path / "new"))
    assert code == 2 and "no data at" in one_line_error(err)  # the data path is checked first, as ever
    (tmp_path / "empty-but-there").mkdir()  # a folder without images: reading it would fail, and it is not read
    code, _, err = cli(capsys, "compress", *_model_argv(place), "--data", str(tmp_path / "empty-but-there"),
                       "--reduction", "0.5", "--likelihood", "categorical", "--output", str(tmp_path / "new"),
                       "--quiet")
    assert code == 2
    line = one_line_error(err)
    assert "the 'categorical' likelihood weighs each layer by the gradient of the classification loss" in line
    assert "num_classes=0 (a feature extractor): use --likelihood gaussian" in line
    assert not (tmp_path / "new").exists()


def test_a_label_column_for_a_model_that_is_not_a_classifier_is_refused(place, compressed, capsys):
    code, _, err = cli(capsys, "evaluate", str(compressed), "--data", str(place / "imgs"), "--label-column", "label",
                       "--quiet")
    assert code == 2
    assert one_line_error(err) == ("lowrank-vit: error: --label-column 'label': the model is not a classifier "
                                   "(num_classes=0), its data is read without labels; drop --label-column")


def test_an_output_key_naming_nothing_is_one_line(place, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    code, _, err = cli(capsys, "compress", *_model_argv(place), "--data", str(tmp_path / "d"), "--reduction", "0.5",
                       "--output-key", "pooler_output", "--output", str(tmp_path / "new"), "--quiet")
    assert code == 2
    line = one_line_error(err)
    assert "output_key='pooler_output' names no tensor of it" in line and "--output-key" in line
    assert not (tmp_path / "new").exists()


def test_evaluate_without_labels_or_a_dense_model_says_what_it_cannot_measure(place, capsys):
    code, out, err = cli(capsys, "evaluate", *_model_argv(place), "--data", str(place / "imgs"), "--workers", "0",
                         "--latency-batches", "--quiet")
    assert code == 0, err
    assert out.splitlines()[0] == (f"timm {ARCH}, your checkpoint on {place / 'imgs'}: no top-1 (the model is not a "
                                   f"classifier (num_classes=0)) and no fidelity (not a compressed model directory)")


# --------------------------------------------------------------------------------------- data without labels


def _datamodule(path: Path, labels: str, **extra):
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    dm = build_datamodule(DataConfig(path=str(path), labels=labels, img_size=SIZE, in_chans=1, batch_size=4,
                                     calib_samples=4, num_workers=0, augment=False, **extra))
    dm.setup()
    return dm


def test_an_image_folder_without_class_subfolders_is_read_without_labels(place):
    from lowrank_vit.stages.data_config import DataFormatError

    dm = _datamodule(place / "imgs", "optional")
    assert not dm.labelled and dm.num_classes == 0
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (16, 4)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.calibration_dataloader()):
        batch = next(iter(loader))
        assert isinstance(batch, torch.Tensor) and batch.shape[1:] == (1, SIZE, SIZE)
    with pytest.raises(DataFormatError, match="no label column"):  # the library's default: a classification set
        _datamodule(place / "imgs", "required")


def test_labels_none_ignores_class_subfolders_and_optional_reads_them(tmp_path):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "classes", classes=2, per_class=5, size=SIZE)
    none = _datamodule(tmp_path / "classes", "none")
    assert not none.labelled and isinstance(next(iter(none.val_dataloader())), torch.Tensor)
    optional = _datamodule(tmp_path / "classes", "optional")
    assert optional.labelled and optional.num_classes == 2
    images, labels = next(iter(optional.val_dataloader()))
    assert images.shape[1:] == (1, SIZE, SIZE) and labels.dtype == torch.int64


def test_a_parquet_file_without_a_label_column_is_read_without_labels(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(seed: int) -> dict:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    pq.write_table(pa.table({"image": [png(i) for i in range(10)]}), tmp_path / "train.parquet")
    dm = _datamodule(tmp_path / "train.parquet", "optional", cache_dir=str(tmp_path / "hf"))
    assert not dm.labelled and (len(dm.train_dataset), len(dm.val_dataset)) == (8, 2)
    assert isinstance(dm.val_dataset[0], torch.Tensor)


def test_flat_train_and_val_folders_without_labels_are_two_splits(tmp_path, place):
    import shutil

    images = sorted((place / "imgs").glob("*.png"))
    for split, part in (("train", images[:6]), ("val", images[6:9])):
        (tmp_path / split).mkdir()
        for image in part:
            shutil.copy(image, tmp_path / split / image.name)
    dm = _datamodule(tmp_path, "optional", cache_dir=str(tmp_path / "hf"))
    assert not dm.labelled and (len(dm.train_dataset), len(dm.val_dataset)) == (6, 3)


def test_the_unlabelled_hold_out_is_seeded_and_never_empties_a_side():
    from lowrank_vit.stages.data_readers import random_split

    train, val = random_split(20, 0.2, 0)
    assert len(val) == 4 and len(train) == 16 and sorted(torch.cat([train, val]).tolist()) == list(range(20))
    assert torch.equal(random_split(20, 0.2, 0)[1], val) and not torch.equal(random_split(20, 0.2, 1)[1], val)
    assert [len(v) for _, v in (random_split(2, 0.2, 0), random_split(3, 0.9, 0), random_split(1, 0.2, 0))] == [1, 2, 0]


# ------------------------------------------------------------------------------------- the fidelity metrics


def test_mean_cosine_flattens_each_image():
    dense = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 2.0]]])  # (3, 1, 2)
    other = torch.tensor([[[0.0, 3.0]], [[2.0, 2.0]], [[1.0, 1.0]]])
    # by hand: orthogonal 0; parallel 1; (0,2).(1,1) = 2 over 2 * sqrt(2): 1/sqrt(2)
    per_image = fid.cosine_similarities(dense, other)
    assert per_image.tolist() == pytest.approx([0.0, 1.0, 1 / math.sqrt(2)])
    assert fid.mean_cosine(dense, other) == pytest.approx((1 + 1 / math.sqrt(2)) / 3)
    assert fid.cosine_similarities(torch.zeros(1, 2), torch.ones(1, 2)).tolist() == [0.0]


def test_relative_l2_error_pools_every_image():
    dense = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    other = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    # by hand: differences (0, -4) and (0, 3): sqrt(16 + 9) = 5, over ||dense|| = 5
    assert fid.relative_l2_error(dense, other) == pytest.approx(1.0)
    assert fid.relative_l2_error(dense, dense) == 0.0
    assert fid.relative_l2_error(torch.zeros(1, 2), torch.ones(1, 2)) == math.inf


def test_mask_iou_per_image_and_probabilities():
    dense = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4]])
    other = torch.tensor([[0.9, 0.1, 0.7, 0.2], [0.2, 0.1, 0.5, 0.0]])
    # by hand: image 0: masks {0, 1} and {0, 2}: 1 shared of 3; image 1: both empty (0.5 is not above 0.5): 1
    assert fid.mask_ious(dense, other).tolist() == pytest.approx([1 / 3, 1.0])
    assert fid.mask_iou(dense, other) == pytest.approx(2 / 3)
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    assert fid.probabilities(logits, "bernoulli").tolist()[0] == pytest.approx(
        [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))])
    assert fid.probabilities(torch.tensor([[1.2, -0.1, 0.25]]), "bernoulli-probabilities").tolist() == [[1, 0, 0.25]]
    with pytest.raises(ValueError, match="sigmoid"):
        fid.probabilities(logits, "gaussian")


def test_pearson_r_pools_every_entry():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[2.0, 4.0], [5.0, 9.0]])
    # by hand: deviations (-1.5, -0.5, 0.5, 1.5) and (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert fid.pearson_r(x, y) == pytest.approx(11 / math.sqrt(130))
    assert fid.pearson_r(x, -x) == pytest.approx(-1.0)
    assert math.isnan(fid.pearson_r(torch.ones(2, 2), y))


def _at(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_retrieval_agreement_counts_the_neighbours_kept():
    dense = _at(0, 10, 30, 90)  # images a, b, c, d
    other = _at(0, 10, 85, 90)  # c moved next to d
    # by hand, the 2 nearest of each (cosine, the smallest angle): dense a {b, c}, b {a, c}, c {b, a}, d {c, b};
    # other a {b, c}, b {a, c}, c {d, b}, d {c, b}: kept 1, 1, 1/2, 1: 3.5 / 4. The nearest one alone: dense
    # a b, b a, c b, d c; other a b, b a, c d, d c: 3 / 4
    assert fid.retrieval_agreement(dense, other, k=2) == pytest.approx(3.5 / 4)
    assert fid.retrieval_agreement(dense, other, k=1) == pytest.approx(3 / 4)
    assert fid.retrieval_agreement(dense, other, k=5) == 1.0  # k capped at the 3 other images: all of them
    assert fid.retrieval_agreement(dense, other) == pytest.approx(3 / 4)  # default k: half the 3 others, 1
    assert fid.retrieval_agreement(dense, dense * 3.0) == 1.0  # the norms do not matter
    assert [fid.retrieval_k(n) for n in (1, 2, 3, 4, 8, 20, 21, 50)] == [0, 0, 1, 1, 3, 9, 10, 10]
    assert math.isnan(fid.retrieval_agreement(dense[:2], other[:2]))


def test_top1_agreement():
    dense = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    other = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.0, 0.0, 2.0]])
    assert fid.top1_agreement(dense, other) == pytest.approx(3 / 4)


@pytest.mark.parametrize("likelihood, shape", [("gaussian", (8,)), ("bernoulli", (1, 3, 3)), ("categorical", (5,))])
def test_the_meter_over_batches_equals_the_functions_on_all_images(likelihood, shape):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(7, *shape, generator=g)
    other = dense + 0.5 * torch.randn(7, *shape, generator=g)
    meter = fid.FidelityMeter(likelihood)
    for start in (0, 3, 5):
        stop = {0: 3, 3: 5, 5: 7}[start]
        meter.update(dense[start:stop], other[start:stop])
    result = meter.result()
    assert result["images"] == 7 and result["output_shape"] == list(shape)
    assert result["cosine"] == pytest.approx(fid.mean_cosine(dense, other), rel=1e-12)
    assert result["relative_l2"] == pytest.approx(fid.relative_l2_error(dense, other), rel=1e-12)
    if likelihood == "bernoulli":
        p, q = fid.probabilities(dense, "bernoulli"), fid.probabilities(other, "bernoulli")
        assert result["mask_iou"] == pytest.approx(fid.mask_iou(p, q), rel=1e-12)
        assert result["pearson_r"] == pytest.approx(fid.pearson_r(p, q), rel=1e-9)
    else:
        assert "mask_iou" not in result
    if likelihood == "gaussian":
        assert result["retrieval_agreement"] == pytest.approx(fid.retrieval_agreement(dense, other))
        assert result["retrieval_k"] == 3
    else:
        assert "retrieval_agreement" not in result
    assert ("top1_agreement" in result) == (likelihood == "categorical")
    if likelihood == "categorical":
        assert result["top1_agreement"] == pytest.approx(fid.top1_agreement(dense, other))


def test_fidelity_text_names_each_figure():
    text = fid.fidelity_text({"cosine": 0.99876, "relative_l2": 0.05, "mask_iou": 0.9, "pearson_r": None,
                              "retrieval_k": 10, "retrieval_agreement": 0.925, "top1_agreement": 0.5})
    assert text == ("cosine 0.9988, relative L2 error 0.0500, top-1 agreement 50.00%, mask IoU 0.9000, Pearson r n/a "
                    "(a constant map), 10-NN retrieval agreement 0.925")
    assert fid.fidelity_text({"cosine": 1.0, "relative_l2": 0.0, "retrieval_k": 0, "retrieval_agreement": None}) == (
        "cosine 1.0000, relative L2 error 0.0000, 0-NN retrieval agreement n/a (fewer than 3 images)")
