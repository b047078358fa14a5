"""``lowrank-vit compress / evaluate / finetune / export`` end to end on a tiny timm ViT and generated data (an image
folder and a parquet file made here, seeded), and their bad-input errors: one line, exit status 2, nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_vit.cli import main as cli
from lowrank_vit.io.surgery import load_compressed, read_plan
from lowrank_vit.nn.factorized import FactorizedLinear

ARCH = "vit_tiny_patch16_224"
KWARGS = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
CLASSES, PER_CLASS, SIZE = 3, 10, 32


def _images(seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """Class c: noise around a class-specific brightness, so classes differ."""
    rng = np.random.default_rng(seed)
    return [((rng.random((SIZE, SIZE, 3)) * 80 + c * 70).astype(np.uint8), c)
            for c in range(CLASSES) for _ in range(PER_CLASS)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("usercli")
    for i, (array, label) in enumerate(_images()):
        folder = root / "imgs" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **KWARGS)
    # the weights say how they were trained: mean/std 0.5 and no crop, unlike timm's ImageNet config for this name
    save_file(model.state_dict(), str(root / "weights.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"})
    return root


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _model_args(workdir: Path) -> list[str]:
    return [ARCH, "--checkpoint", str(workdir / "weights.safetensors"), "--model-kwargs", json.dumps(KWARGS),
            "--input-size", str(SIZE), "--preprocessing", "timm"]


def _compress(capsys, workdir: Path, output: Path, *extra: str) -> tuple[int, str, str]:
    return _run(capsys, "compress", *_model_args(workdir), "--data", workdir / "imgs", "--workers", "0",
                "--calib-samples", "16", "--quiet", "--output", output, *extra)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lowrank-vit: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def compressed(workdir, tmp_path_factory) -> Path:
    """One compressed directory shared by the tests that read it (compressing is the slow part)."""
    out = workdir / "deit-30"
    code = cli.main(["compress", *_model_args(workdir), "--data", str(workdir / "imgs"), "--workers", "0",
                     "--calib-samples", "16", "--quiet", "--reduction", "0.3", "--output", str(out)])
    assert code == 0
    return out


# ----------------------------------------------------------------------------------------------------- compress


def test_compress_writes_a_complete_model_directory(compressed, workdir):
    from lowrank_vit.cli.outputs import model_dir_files

    names = {p.name for p in compressed.iterdir()}
    # exactly what --force may replace: anything else in a model directory is the user's
    assert names == set(model_dir_files()) == {"model.safetensors", "lowrank_vit.json", "report.json", "ranks.png",
                                               "README.md"}
    assert not [p for p in workdir.iterdir() if p.name.startswith(".deit-30")], "a staging directory was left"
    report = json.loads((compressed / "report.json").read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert abs(report["reduction"] - 0.3) < 0.01
    assert report["accuracy"]["before"]["images"] == report["accuracy"]["after"]["images"] == 6  # 20% held out
    # preprocessing: the checkpoint's metadata beats timm's ImageNet config of this name; saved with the model
    pre = read_plan(compressed)["metadata"]["preprocessing"]
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5] and pre["crop_pct"] == 1.0
    assert pre["input_size"] == [3, SIZE, SIZE]
    model = load_compressed(compressed)
    factorized = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert factorized
    card = (compressed / "README.md").read_text()
    assert "load_compressed" in card and "loss-aware" in card and f"`{factorized[0]}`" in card
    assert f"{report['params']['after']:,}" in card


def test_compress_with_the_refit_recipe(workdir, tmp_path, capsys):
    """``--recipe loss-aware-refit``: the refit runs from the CLI on the user's images and the report says so."""
    code, _, err = _compress(capsys, workdir, tmp_path / "refit", "--reduction", "0.5", "--recipe",
                             "loss-aware-refit")
    assert code == 0, err
    report = json.loads((tmp_path / "refit" / "report.json").read_text())
    assert report["compression"]["config"]["refit"] is True
    assert report["compression"]["stage_seconds"]["refit"] > 0
    assert load_compressed(tmp_path / "refit") is not None


def test_compress_refuses_a_model_it_could_not_save_before_calibrating(workdir, tmp_path, capsys, monkeypatch):
    # timm's Swin V2 "cr" variant names its stages and options unlike Swin's: the spec read from its modules does not
    # rebuild it, so its compressed form could never be loaded again. Refused before any calibration.
    import timm
    from safetensors.torch import save_file

    from lowrank_vit import pipeline

    kwargs = {"img_size": SIZE, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4,
              "num_classes": CLASSES}
    torch.manual_seed(0)
    save_file(timm.create_model("swinv2_cr_tiny_224", pretrained=False, **kwargs).state_dict(),
              str(tmp_path / "swin.safetensors"))
    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: pytest.fail("calibration must not start"))
    code, _, err = _run(capsys, "compress", "swinv2_cr_tiny_224", "--preprocessing", "timm", "--checkpoint",
                        tmp_path / "swin.safetensors",
                        "--model-kwargs", json.dumps(kwargs), "--data", workdir / "imgs", "--workers", "0",
                        "--quiet", "--reduction", "0.3", "--output", tmp_path / "out")
    _assert_one_line_error(code, err, "cannot compress swinv2_cr_tiny_224", "could not be saved and loaded again")
    assert not (tmp_path / "out").exists()


def test_compress_prints_the_preprocessing_and_its_origin(workdir, tmp_path, capsys):
    code, out, err = _run(capsys, "compress", *_model_args(workdir), "--data", workdir / "imgs", "--workers", "0",
                          "--calib-samples", "8", "--no-eval", "--recipe", "vanilla", "--reduction", "0.3",
                          "--mean", "0.4", "--output", tmp_path / "m")
    assert code == 0, err
    line = next(line for line in err.splitlines() if line.startswith("preprocessing:"))
    assert "mean 0.4,0.4,0.4 (flag)" in line and "std 0.5,0.5,0.5 (checkpoint" in line
    assert "input 3x32x32" in line
    assert read_plan(tmp_path / "m")["metadata"]["preprocessing"]["mean"] == [0.4, 0.4, 0.4]
    assert str(tmp_path / "m") in out


def test_evaluate_reuses_the_saved_preprocessing(compressed, capsys):
    report = json.loads((compressed / "report.json").read_text())
    code, out, err = _run(capsys, "evaluate", compressed, "--data", compressed.parent / "imgs", "--workers", "0",
                          "--json", "--quiet", "--repeats", "2")
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

    model = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **KWARGS)
    model.load_state_dict(load_file(str(workdir / "weights.safetensors")))
    images = torch.randn(20, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))  # 20: not a batch multiple
    compress(model, [images[:12], images[12:]], recipe("paper", reduction=0.4, compensation=compensation,
                                                       calib_samples=20, progress=False))
    if bits:
        quantize_(model, bits=bits)
    save_compressed(model, tmp_path / "m", model_name=ARCH, model_kwargs={**KWARGS, "img_size": SIZE},
                    metadata={"preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}})
    code, out, err = _run(capsys, "evaluate", tmp_path / "m", "--data", workdir / "imgs", "--workers", "0",
                          "--json", "--quiet", "--latency-batches")
    assert code == 0, err
    stored = _payload_bytes(tmp_path / "m" / "model.safetensors")
    assert json.loads(out)["size_mib"] * 2**20 == pytest.approx(stored, rel=1e-12)
    dense = sum(p.numel() for p in timm.create_model(ARCH, img_size=SIZE, **KWARGS).parameters())
    assert stored < 4 * dense  # compressed: fewer bytes than the dense float32 weights


def test_export_runs_in_onnxruntime_and_matches(compressed, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from lowrank_vit.io.export import onnx_logits

    target = tmp_path / "model.onnx"
    code, out, err = _run(capsys, "export", compressed, "--format", "onnx", "--output", target)
    assert code == 0, err
    assert "relative error" in out
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
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


def test_finetune_writes_a_new_directory_and_leaves_its_input(compressed, tmp_path, capsys):
    weights = compressed / "model.safetensors"
    before = _digest(weights)
    out = tmp_path / "ft"
    code, stdout, err = _run(capsys, "finetune", compressed, "--data", compressed.parent / "imgs", "--workers", "0",
                             "--epochs", "1", "--lr", "1e-2", "--output", out, "--quiet")
    assert code == 0, err
    assert _digest(weights) == before
    assert {"model.safetensors", "lowrank_vit.json", "report.json", "README.md", "ranks.png"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "checkpoints").exists() and not (tmp_path / ".ft.partial").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["steps"] >= 1 and "final" in report["accuracy"] and "after" in report["accuracy"]
    assert report["finetune"]["precision"] == "32-true"
    card = (out / "README.md").read_text()
    assert "Fine-tuned (partial: norms, biases, head, patch embedding)" in card and "distilled" not in card
    trained, original = load_compressed(out).state_dict(), load_compressed(compressed).state_dict()
    changed = [k for k in original if not torch.equal(original[k], trained[k])]
    assert changed and all(not k.endswith((".U", ".V")) for k in changed), changed  # factors stay frozen
    assert read_plan(out)["metadata"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    code, _, err = _run(capsys, "finetune", compressed, "--data", compressed.parent / "imgs", "--epochs", "1",
                        "--output", compressed)
    _assert_one_line_error(code, err, "input")
    assert _digest(weights) == before


def test_finetune_float16_needs_a_gpu(tmp_path, capsys, monkeypatch):
    """--precision 16-mixed on a CPU: one line, exit 2, before any model is read or any directory is made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "model").mkdir()
    code, _, err = _run(capsys, "finetune", tmp_path / "model", "--data", tmp_path, "--epochs", "1",
                        "--precision", "16-mixed", "--output", tmp_path / "out")
    _assert_one_line_error(code, err, "16-mixed needs a GPU", "bf16-mixed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(SystemExit):
        cli.main(["finetune", str(tmp_path / "model"), "--data", str(tmp_path), "--epochs", "1", "--precision",
                  "bf16-true", "--output", str(tmp_path / "out")])


def test_finetune_distills_from_the_recorded_dense_model(compressed, workdir, tmp_path, capsys):
    """--distill rebuilds the dense model from what compress recorded (here: the checkpoint, checked by its digest),
    or from --teacher-checkpoint when the recorded file is gone; --train-factors trains U and V too."""
    out = tmp_path / "ft-distilled"
    args = ["--data", workdir / "imgs", "--workers", "0", "--epochs", "1", "--max-steps", "2", "--quiet"]
    code, _, err = _run(capsys, "finetune", compressed, *args, "--distill", "0.5", "--distill-temperature", "2",
                        "--train-factors", "--output", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (report["finetune"]["distill"], report["finetune"]["distill_temperature"]) == (0.5, 2.0)
    assert report["finetune"]["train_factors"] is True
    card = (out / "README.md").read_text()  # the card says how it was fine-tuned
    assert "Fine-tuned (all weights: the low-rank factors" in card and "distilled from the model before" in card
    trained, original = load_compressed(out).state_dict(), load_compressed(compressed).state_dict()
    assert any(k.endswith(".U") and not torch.equal(original[k], trained[k]) for k in original)  # factors trained
    moved = tmp_path / "moved"  # the same directory, compressed from a checkpoint that is no longer there
    moved.mkdir()
    for f in compressed.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    plan = json.loads((moved / "lowrank_vit.json").read_text())
    plan["metadata"]["source"]["checkpoint"] = str(tmp_path / "gone.safetensors")
    (moved / "lowrank_vit.json").write_text(json.dumps(plan))
    code, _, err = _run(capsys, "finetune", moved, *args, "--distill", "0.5", "--output", tmp_path / "x")
    _assert_one_line_error(code, err, "gone.safetensors", "is gone", "--teacher-checkpoint")
    other = tmp_path / "other.safetensors"  # a file at the recorded path, but not the weights compress read
    other.write_bytes((compressed / "model.safetensors").read_bytes())
    plan["metadata"]["source"]["checkpoint"] = str(other)
    (moved / "lowrank_vit.json").write_text(json.dumps(plan))
    code, _, err = _run(capsys, "finetune", moved, *args, "--distill", "0.5", "--output", tmp_path / "x")
    _assert_one_line_error(code, err, "other.safetensors", "changed", "--teacher-checkpoint")
    assert not (tmp_path / "x").exists()
    code, _, err = _run(capsys, "finetune", moved, *args, "--distill", "0.5", "--output", tmp_path / "y",
                        "--teacher-checkpoint", workdir / "weights.safetensors")
    assert code == 0, err


def test_finetune_distill_needs_a_recorded_dense_model_and_a_weight_in_range(compressed_plain, tmp_path, capsys):
    args = ["--data", tmp_path, "--epochs", "1", "--output", tmp_path / "out"]
    code, _, err = _run(capsys, "finetune", compressed_plain, *args, "--distill", "0.5")
    _assert_one_line_error(code, err, "does not record", "without --distill")
    for flag, value, needle in (("--distill", "1.5", "distill must lie in [0, 1]"),
                                ("--distill-temperature", "0", "distill_temperature must be a positive number")):
        code, _, err = _run(capsys, "finetune", compressed_plain, *args, flag, value)
        _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_parquet_with_named_columns(workdir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for array, label in _images(seed=1):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        rows.append({"picture": {"bytes": buffer.getvalue(), "path": None}, "target": label})
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    common = ["compress", *_model_args(workdir), "--data", path, "--workers", "0", "--calib-samples", "8",
              "--no-eval", "--recipe", "paper", "--reduction", "0.3", "--quiet"]
    code, _, err = _run(capsys, *common, "--output", tmp_path / "a")
    _assert_one_line_error(code, err, "image column")
    assert not (tmp_path / "a").exists()
    code, _, err = _run(capsys, *common, "--image-column", "picture", "--label-column", "wrong",
                        "--output", tmp_path / "a")
    _assert_one_line_error(code, err, "wrong")
    code, _, err = _run(capsys, *common, "--image-column", "picture", "--label-column", "target",
                        "--output", tmp_path / "a")
    assert code == 0, err
    assert read_plan(tmp_path / "a")["metadata"]["recipe"] == "paper"


def test_datamodule_uses_the_configured_normalization(workdir):
    """DataConfig's preprocessing fields reach the transform: with crop_pct 1 at the native size the image is only
    normalized, so each pixel is exactly (x / 255 - mean) / std."""
    from PIL import Image

    from lowrank_vit.stages.data import DataConfig, build_datamodule

    cfg = DataConfig(path=str(workdir / "imgs"), img_size=SIZE, in_chans=3, mean=(0.2, 0.3, 0.4), std=(0.5,),
                     crop_pct=1.0, interpolation="bilinear", augment=False, calib_samples=1)
    dm = build_datamodule(cfg)
    dm.setup()
    assert dm.preprocessing["mean"] == (0.2, 0.3, 0.4) and dm.preprocessing["std"] == (0.5, 0.5, 0.5)
    image, label = dm.val_dataset[0]
    raw = dm.val_dataset.dataset.dataset[dm.val_dataset.indices[0]]["image"]
    expected = (torch.from_numpy(np.asarray(Image.open(raw["path"]) if isinstance(raw, dict) else raw)).float()
                .permute(2, 0, 1) / 255 - torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)) / 0.5
    assert torch.allclose(image, expected, atol=1e-5)
    with pytest.raises(ValueError, match="crop_pct"):
        DataConfig(path="x", crop_pct=1.5)
    with pytest.raises(ValueError, match="std"):
        DataConfig(path="x", std=(0.0,))


def test_the_users_preprocessing_reaches_the_pixels_the_commands_feed(workdir):
    """The audit's defect: --mean/--std printed and saved while the images were normalized with other values. Here
    the flags differ from timm's for the name and from the checkpoint's (0.5 both), and the independent truth is the
    pixel itself: each one the evaluation split yields is (x / 255 - mean) / std for the user's values."""
    from PIL import Image

    from lowrank_vit.cli.data import build_data
    from lowrank_vit.cli.preprocessing import resolve_model_preprocessing
    from lowrank_vit.cli.sources import load_source

    args = cli.build_parser().parse_args(
        ["evaluate", *map(str, _model_args(workdir)), "--data", str(workdir / "imgs"), "--mean", "0.1", "0.2", "0.3",
         "--std", "0.25", "--crop-pct", "1.0", "--interpolation", "bilinear", "--workers", "0"])
    source = load_source(args)
    pre, origin = resolve_model_preprocessing(source, args)
    assert origin["mean"] == origin["std"] == "flag"
    dm = build_data(args, source.model, pre, calib_samples=1)
    for index in (0, len(dm.val_dataset) - 1):
        image, _ = dm.val_dataset[index]
        raw = dm.val_dataset.dataset.dataset[dm.val_dataset.indices[index]]["image"]
        pixels = np.asarray(Image.open(raw["path"]) if isinstance(raw, dict) else raw).astype(np.float32)
        mean = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
        expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean) / 0.25
        assert torch.allclose(image, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- bad input


def test_unknown_model_name_suggests_close_ones(workdir, tmp_path, capsys):
    code, _, err = _run(capsys, "compress", "vit_tiny_patch16_22", "--data", workdir / "imgs", "--reduction", "0.5",
                        "--output", tmp_path / "o")
    _assert_one_line_error(code, err, "vit_tiny_patch16_22", "did you mean", "vit_tiny_patch16_224")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("reduction", ["0", "1", "1.5", "-0.2", "half"])
def test_reduction_outside_the_open_interval(workdir, tmp_path, capsys, reduction):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compress", ARCH, "--data", str(workdir / "imgs"), "--reduction", reduction,
                  "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--reduction" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_missing_data_path_and_folder_without_images(workdir, tmp_path, capsys):
    base = ["compress", *_model_args(workdir), "--workers", "0", "--reduction", "0.5", "--quiet"]
    code, _, err = _run(capsys, *base, "--data", tmp_path / "nowhere", "--output", tmp_path / "o")
    _assert_one_line_error(code, err, "nowhere")
    empty = tmp_path / "empty" / "class0"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    code, _, err = _run(capsys, *base, "--data", tmp_path / "empty", "--output", tmp_path / "o")
    _assert_one_line_error(code, err)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_checkpoint_of_another_architecture(workdir, tmp_path, capsys):
    args = _model_args(workdir)
    args[args.index("--model-kwargs") + 1] = json.dumps({**KWARGS, "embed_dim": 48})
    code, _, err = _run(capsys, "compress", *args, "--data", workdir / "imgs", "--reduction", "0.5", "--quiet",
                        "--output", tmp_path / "o")
    _assert_one_line_error(code, err, "weights.safetensors", "does not fit")
    assert not (tmp_path / "o").exists()


def test_class_count_is_checked_before_calibration(workdir, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **{**KWARGS, "num_classes": 5})
    save_file(model.state_dict(), str(tmp_path / "five.safetensors"))
    code, _, err = _run(capsys, "compress", ARCH, "--preprocessing", "timm", "--checkpoint",
                        tmp_path / "five.safetensors", "--model-kwargs",
                        json.dumps({**KWARGS, "num_classes": 5}), "--input-size", str(SIZE), "--data",
                        workdir / "imgs", "--workers", "0", "--reduction", "0.5", "--quiet",
                        "--output", tmp_path / "o")
    _assert_one_line_error(code, err, "5 classes", "has 3")
    assert not (tmp_path / "o").exists()


def test_output_directory_is_never_overwritten_silently(compressed, workdir, tmp_path, capsys):
    plan_before = (compressed / "lowrank_vit.json").read_text()
    code, _, err = _compress(capsys, workdir, compressed, "--reduction", "0.5", "--no-eval")
    _assert_one_line_error(code, err, f"already holds a model ({ARCH} from ", "--force")
    assert (compressed / "lowrank_vit.json").read_text() == plan_before
    # a directory with the user's own files is refused even with --force
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    code, _, err = _compress(capsys, workdir, mine, "--reduction", "0.5", "--no-eval", "--force")
    _assert_one_line_error(code, err, "holds other files and no model")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    # --force replaces a model directory, and only once the new model is complete
    other = tmp_path / "other"
    assert _compress(capsys, workdir, other, "--reduction", "0.3", "--no-eval", "--recipe", "vanilla")[0] == 0
    code, _, err = _compress(capsys, workdir, other, "--reduction", "0.5", "--no-eval", "--force")
    assert code == 0, err
    assert read_plan(other)["metadata"]["recipe"] == "loss-aware"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "other"]


def test_export_of_a_model_with_an_unknown_layer_kind(compressed_plain, tmp_path, capsys):
    plan = json.loads((compressed_plain / "lowrank_vit.json").read_text())
    first = next(iter(plan["layers"]))
    plan["layers"][first]["z"] = {"kind": "hologram", "rank": 1}
    (compressed_plain / "lowrank_vit.json").write_text(json.dumps(plan))
    code, _, err = _run(capsys, "export", compressed_plain, "--output", tmp_path / "m.onnx")
    _assert_one_line_error(code, err, "hologram")
    assert not (tmp_path / "m.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.fixture
def compressed_plain(tmp_path_factory) -> Path:
    """A compressed directory written by the API (no data needed), fresh for each test that edits it."""
    from lowrank_vit import compress, save_compressed

    from conftest import make_images, make_tiny_vit

    model = make_tiny_vit()
    compress(model, [make_images(16)], reduction=0.4, calib_samples=16, progress=False)
    return save_compressed(model, tmp_path_factory.mktemp("plain") / "model")


def test_unknown_recipe_and_missing_budget(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own error
        cli.main(["compress", ARCH, "--data", str(workdir / "imgs"), "--output", str(tmp_path / "o"), "--reduction",
                  "0.5", "--recipe", "magic"])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # no budget: checked with the recipe (--recipe vmeanba needs none), before anything is loaded
    assert cli.main(["compress", ARCH, "--data", str(workdir / "imgs"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one of --reduction, --target-params and --target-speedup is required" in err[0]
    assert not (tmp_path / "o").exists()


def test_loss_pass_dtype_flag_reaches_the_config_and_is_refused_where_it_does_not_apply(workdir, tmp_path, capsys):
    import argparse

    from lowrank_vit.cli.compress import compression_config

    args = argparse.Namespace(recipe="loss-aware-fast", reduction=0.5, target_params=None, calib_samples=8,
                              rank_multiple=1, quiet=True, loss_pass_dtype="bfloat16")
    config = compression_config(args, torch.device("cpu"))
    assert (config.settings["loss_pass_dtype"], config.settings["grad_fraction"]) == ("bfloat16", 0.5)
    out = tmp_path / "o"
    assert cli.main(["compress", ARCH, "--data", str(workdir / "imgs"), "--output", str(out), "--reduction", "0.5",
                     "--recipe", "paper", "--loss-pass-dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "setting 'loss_pass_dtype'='bfloat16' belongs to decomposition 'loss_aware'" in err[0]
    assert not out.exists()


def test_setting_flags_reach_the_peer_recipes_and_bad_ones_are_one_line(workdir, tmp_path, capsys):
    import argparse

    from lowrank_vit.cli.compress import compression_config

    args = argparse.Namespace(recipe="kfac-lems", reduction=0.5, target_params=None, calib_samples=8, rank_multiple=1,
                              quiet=True, loss_pass_dtype=None,
                              setting=["grad_shrinkage=0.3", "rank_step=4", "temperature=1"])
    config = compression_config(args, torch.device("cpu"))
    assert (config.decomposition, config.allocation) == ("kfac", "lems")
    assert config.settings == {"grad_shrinkage": 0.3, "rank_step": 4, "temperature": 1}
    for setting, needle in (("grad_shrinkage=1.5", "grad_shrinkage must lie in [0, 1)"),
                            ("shrinkage=ledoit-wolf",
                             "setting 'shrinkage'='ledoit-wolf' belongs to decomposition 'flar', not to "),
                            ("rank_floor", "--setting takes KEY=VALUE")):
        out = tmp_path / "o"
        assert cli.main(["compress", ARCH, "--data", str(workdir / "imgs"), "--output", str(out), "--reduction",
                         "0.5", "--recipe", "kfac-lems", "--setting", setting]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not out.exists()


def test_an_interrupted_finetune_resumes_from_its_checkpoints(compressed, tmp_path, capsys, monkeypatch):
    from lowrank_vit.cli import finetune as finetunecli

    out = tmp_path / "ft"
    argv = ["finetune", compressed, "--data", compressed.parent / "imgs", "--workers", "0", "--batch-size", "8",
            "--output", out]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        # after training, before the directory is written
        patch.setattr(finetunecli, "evaluate_on_user_data", interrupted)
        code, _, _ = _run(capsys, *argv, "--epochs", "1", "--quiet", "--checkpoint-every", "2")
    assert code == 130 and not out.exists()
    assert (tmp_path / ".ft.partial" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / ".ft.partial" / "checkpoints" / "step00000002.ckpt").is_file()  # mid-epoch, as asked
    from lowrank_vit.stages.finetune import PartialFinetune

    steps_run = []
    original_step = PartialFinetune.training_step

    def counting_step(self, batch, batch_idx):
        steps_run.append(batch_idx)
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(PartialFinetune, "training_step", counting_step)
    code, _, err = _run(capsys, *argv, "--epochs", "2")
    assert code == 0, err
    assert "resuming from" in err
    steps_per_epoch = 3  # 24 training images in batches of 8
    assert len(steps_run) == steps_per_epoch, "the first epoch ran again instead of resuming"
    assert json.loads((out / "report.json").read_text())["finetune"]["steps"] == 2 * steps_per_epoch
    assert not (tmp_path / ".ft.partial").exists()


@pytest.mark.parametrize("flags, needle", [(["--crop-pct", "1.5"], "crop_pct"), (["--std", "0"], "std"),
                                           (["--mean", "0.1", "0.2"], "mean")])
def test_bad_preprocessing_flags(workdir, tmp_path, capsys, flags, needle):
    code, _, err = _run(capsys, "compress", *_model_args(workdir), "--data", workdir / "imgs", "--workers", "0",
                        "--reduction", "0.5", "--quiet", "--output", tmp_path / "o", *flags)
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_pretrained_weights_out_of_reach_say_what_to_do(workdir, tmp_path, capsys, monkeypatch):
    from lowrank_vit.repro import models

    def offline(*args, **kwargs):
        raise models.SetupError("cannot load timm's pretrained weights for x (offline): run once with network "
                                "access, unset HF_HUB_OFFLINE, or use --scale smoke")

    monkeypatch.setattr(models, "build_model", offline)
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

    monkeypatch.setattr(hub, "download", from_cache)
    code, out, err = _run(capsys, "evaluate", "hf-hub:someone/tiny-30", "--data", compressed.parent / "imgs",
                          "--workers", "0", "--json", "--quiet", "--latency-batches")
    assert code == 0, err
    assert asked == ["hf-hub:someone/tiny-30"]
    result = json.loads(out)
    assert result["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and result["latency_ms"] == {}


def test_checkpoints_of_another_model_are_not_resumed(compressed, workdir, tmp_path, capsys, monkeypatch):
    from lowrank_vit.cli import finetune as finetunecli

    other = tmp_path / "other"
    assert _compress(capsys, workdir, other, "--reduction", "0.5", "--no-eval", "--recipe", "vanilla")[0] == 0
    out = tmp_path / "ft"
    common = ["--data", workdir / "imgs", "--workers", "0", "--epochs", "1", "--output", out, "--quiet"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(finetunecli, "evaluate_on_user_data", interrupted)
        assert _run(capsys, "finetune", compressed, *common)[0] == 130
    code, _, err = _run(capsys, "finetune", other, *common)
    _assert_one_line_error(code, err, "remove", ".ft.partial")
    assert not out.exists()


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


def test_unreachable_pretrained_weights_are_one_line_cut_at_a_word(monkeypatch):
    """timm's error (huggingface_hub's: long, several sentences) is quoted on the one line, shortened at a word."""
    import timm

    from lowrank_vit.repro import models
    from lowrank_vit.repro.registry import ModelConfig

    def offline(*args, **kwargs):
        raise OSError("We could not locate the file on the Hub and cannot find the requested files in the local "
                      "cache. Please check your connection and try again or make sure your Internet connection is "
                      "on.\nsecond line")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(models.SetupError) as info:
        models.build_model(ModelConfig("timm", "vit_tiny_patch16_224", pretrained=True))
    message = str(info.value)
    assert "\n" not in message and "second line" not in message
    assert "try again or make sure your...)" in message  # not inside a word


# ----------------------------------------------------------------------------- outputs around the input, --force


def test_outputs_inside_or_around_the_input_are_refused_before_any_work(compressed_plain, tmp_path, capsys):
    weights = compressed_plain / "model.safetensors"
    before = sorted(p.name for p in compressed_plain.iterdir()), _digest(weights)
    for argv, needle in (
            (["finetune", compressed_plain, "--output", compressed_plain / "sub"], "inside the input directory"),
            (["finetune", compressed_plain, "--output", compressed_plain.parent, "--force"], "holds the input"),
            (["export", compressed_plain, "--output", weights, "--force"], "inside the input directory"),
            (["export", compressed_plain, "--output", compressed_plain / "m.onnx"], "inside the input directory")):
        extra = ["--data", tmp_path / "nowhere", "--epochs", "1"] if argv[0] == "finetune" else []
        code, _, err = _run(capsys, *argv, *extra)
        _assert_one_line_error(code, err, needle)
    assert (sorted(p.name for p in compressed_plain.iterdir()), _digest(weights)) == before


def test_export_force_replaces_only_an_onnx_file(compressed_plain, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = _run(capsys, "export", compressed_plain, "--output", notes, "--force")
    _assert_one_line_error(code, err, "not an .onnx file")
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("command", ["compress", "finetune", "export"])
def test_an_output_below_a_file_is_refused_before_any_work(command, compressed_plain, tmp_path, capsys):
    blocker = tmp_path / "model.onnx"
    blocker.write_text("a file")
    argv = {"compress": [ARCH, "--no-pretrained", "--reduction", "0.5", "--data", tmp_path],
            "finetune": [compressed_plain, "--data", tmp_path, "--epochs", "1"],
            "export": [compressed_plain]}[command]
    code, _, err = _run(capsys, command, *argv, "--output", blocker / "sub")
    _assert_one_line_error(code, err, "cannot be written", "is a file")
    assert blocker.read_text() == "a file"


def test_force_never_deletes_the_users_files_beside_a_model(compressed_plain):
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.outputs import check_output_dir

    (compressed_plain / "NOTES.txt").write_text("mine")
    (compressed_plain / "mydata").mkdir()
    with pytest.raises(UserError, match=r"other files \(NOTES.txt, mydata\), which --force would delete"):
        check_output_dir(compressed_plain, force=True)
    (compressed_plain / "NOTES.txt").unlink()
    (compressed_plain / "mydata").rmdir()
    check_output_dir(compressed_plain, force=True)  # a model directory and nothing else: replaceable


def test_an_existing_empty_directory_is_a_valid_output(tmp_path):
    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.outputs import check_output_dir

    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", force=False)  # made beforehand (mkdir -p out/): nothing to overwrite
    (tmp_path / "notes.txt").write_text("mine")
    for force in (False, True):  # publishing would move the file aside under a hidden name
        with pytest.raises(UserError, match="is a file"):
            check_output_dir(tmp_path / "notes.txt", force=force)
    (tmp_path / "empty" / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files and no model"):
        check_output_dir(tmp_path / "empty", force=False)


@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_publish_puts_the_previous_model_back(tmp_path, monkeypatch, existing):
    """The last step of every command moves the finished directory into place; if that move fails, the model the
    user had there is back where it was, whole, and the error is not swallowed."""
    import os

    from lowrank_vit.cli import outputs

    out, stage = tmp_path / "model", tmp_path / ".model.partial"
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"new")
    if existing:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"old")
    real = os.replace

    def failing(src, dst):
        if Path(src) == stage:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        outputs.publish(stage, out)
    assert (out / "model.safetensors").read_bytes() == b"old" if existing else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model"] * existing + [".model.partial"])
    monkeypatch.setattr(outputs.os, "replace", real)
    outputs.publish(stage, out)
    assert (out / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the previous model removed once replaced


def test_reports_and_json_output_are_strict_json(tmp_path):
    """A NaN or infinite figure (an error that overflowed, a latency that was not timed) is written as null:
    json.dumps alone writes a bare NaN, which jq and browsers refuse. One writer serves reports, the registry's
    results and tables, and the resume record."""
    from lowrank_vit.core.files import strict_json, write_json

    data = {"error": float("nan"), "layers": [{"rank": 3, "error": float("inf")}], "t": (1.5, -float("inf")),
            "path": tmp_path, "device": torch.device("cpu")}
    write_json(tmp_path / "new" / "r.json", data)  # its folder made too
    strict = json.loads((tmp_path / "new" / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict == {"error": None, "layers": [{"rank": 3, "error": None}], "t": [1.5, None],
                      "path": str(tmp_path), "device": "cpu"}
    assert json.loads(strict_json(data)) == strict
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["r.json"]  # no temporary file left beside it
    with pytest.raises(TypeError, match="not JSON-serializable: object"):
        strict_json({"x": object()})


# ----------------------------------------------------------------------------------- resuming, reports, data


@pytest.mark.parametrize("report", [None, "{not json", "[1, 2]"])
def test_finetune_of_a_directory_without_a_readable_report(compressed, tmp_path, capsys, report):
    """A directory written by ``save_compressed`` (the API) has weights and a plan and nothing else, and a report
    edited by hand may not parse: the fine-tune starts its report from scratch instead of failing."""
    import shutil

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("model.safetensors", "lowrank_vit.json"):
        shutil.copy(compressed / name, plain / name)
    if report is not None:
        (plain / "report.json").write_text(report)
    before = sorted((p.name, p.read_bytes()) for p in plain.iterdir())
    code, _, err = _run(capsys, "finetune", plain, "--data", compressed.parent / "imgs", "--workers", "0",
                        "--epochs", "1", "--output", tmp_path / "ft", "--quiet")
    assert code == 0, err
    written = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert set(written["accuracy"]) == {"final"} and written["params"]["after"] > 0 and written["layers"]
    assert sorted((p.name, p.read_bytes()) for p in plain.iterdir()) == before


@pytest.mark.parametrize("command", ["export", "finetune"])
def test_a_model_that_is_not_a_model_directory(command, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    extra = {"export": [], "finetune": ["--data", tmp_path, "--epochs", "1"]}[command]
    for given in (tmp_path / "missing", tmp_path / "model.safetensors"):
        code, _, err = _run(capsys, command, given, *extra, "--output", tmp_path / "out.onnx")
        _assert_one_line_error(code, err, "no model directory", f"{command} takes a directory")
    assert not (tmp_path / "out.onnx").exists()



def test_a_fine_tune_resumes_only_the_run_it_was(tmp_path, capsys):
    import argparse

    from lowrank_vit.cli.base import UserError
    from lowrank_vit.cli.finetune import RESUME_FILE, _resume_or_start

    args = argparse.Namespace(quiet=False)
    stage = tmp_path / ".out.partial"
    run = {"input": "/m", "input_sha256": "ab", "data": "/d", "augment": False, "finetune": {"lr": 1e-4}}
    _resume_or_start(args, stage, run)  # a first run records itself
    assert json.loads((stage / RESUME_FILE).read_text()) == run
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "last.ckpt").write_bytes(b"")
    _resume_or_start(args, stage, run)  # the same command again: resumed
    assert "resuming from" in capsys.readouterr().err
    for changed, needle in (({"input_sha256": "cd"}, "another input_sha256"), ({"finetune": {"lr": 0.5}},
                                                                               "another finetune")):
        with pytest.raises(UserError, match=f"{needle}: rerun that command to resume it, or remove"):
            _resume_or_start(args, stage, {**run, **changed})
    (stage / RESUME_FILE).unlink()  # checkpoints that do not say what they were are not resumed either
    with pytest.raises(UserError, match="does not say what it was"):
        _resume_or_start(args, stage, run)


def test_a_hand_edited_report_does_not_break_the_fine_tune_report(tmp_path):
    from lowrank_vit.cli.finetune import _read_report

    path = tmp_path / "report.json"
    path.write_text(json.dumps({"accuracy": "x", "params": 5, "name": "m", "layers": []}))
    assert _read_report(path) == {"name": "m", "layers": []}
    path.write_text(json.dumps({"accuracy": {"before": {"top1": 50.0}}, "params": {"before": 9}}))
    assert _read_report(path) == {"accuracy": {"before": {"top1": 50.0}}, "params": {"before": 9}}


def test_unreadable_data_is_one_line_naming_it_and_quiet_is_quiet():
    import argparse
    import warnings

    from datasets.exceptions import DatasetGenerationError
    from PIL import UnidentifiedImageError

    from lowrank_vit.cli.base import UserError, user_command

    def worker_error(args):  # what a DataLoader worker re-raises: its whole traceback as the message
        raise UnidentifiedImageError("Caught UnidentifiedImageError in DataLoader worker process 0.\nOriginal "
                                     "Traceback (most recent call last):\n  ...\nPIL.UnidentifiedImageError: cannot "
                                     "identify image file '/d/val/b/0.png'")

    def builder_error(args):
        try:
            raise ValueError("Couldn't cast model.safetensors")
        except ValueError as cause:
            raise DatasetGenerationError("An error occurred while generating the dataset") from cause

    args = argparse.Namespace(data="/d", quiet=False)
    with pytest.raises(UserError, match=r"^--data '/d': PIL.UnidentifiedImageError: cannot identify image file "
                                        r"'/d/val/b/0.png'$"):
        user_command(worker_error)(args)
    with pytest.raises(UserError, match=r"could not be read as a dataset: Couldn't cast model.safetensors$"):
        user_command(builder_error)(args)

    def noisy(args):
        warnings.warn("calibration uses all 40 training images", UserWarning, stacklevel=1)
        return 0

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert user_command(noisy)(argparse.Namespace(data="/d", quiet=True)) == 0
        assert not seen
        user_command(noisy)(args)
        assert len(seen) == 1


def test_an_opset_the_exporter_cannot_write_is_refused_before_tracing(tmp_path):
    from lowrank_vit.io.export import export_onnx, opset_range

    from conftest import make_tiny_vit

    low, high = opset_range()
    for opset in (low - 1, high + 1):
        with pytest.raises(ValueError, match=rf"opset must be an integer in \[{low}, {high}\]"):
            export_onnx(make_tiny_vit(), tmp_path / "m.onnx", (3, 32, 32), opset=opset)
    assert not list(tmp_path.iterdir())


def test_a_stopped_fine_tune_says_how_to_resume(compressed, workdir, tmp_path, capsys, monkeypatch):
    import lowrank_vit.stages.finetune as stage

    written: list[str] = []

    def stopped(*args, checkpoint_dir, **kwargs):  # what Lightning does on Ctrl-C: a graceful shutdown, then exit(1)
        for name in written:  # the checkpoints Lightning had written before the interruption
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_dir) / name).write_bytes(b"")
        raise SystemExit(1)

    monkeypatch.setattr(stage, "finetune", stopped)
    argv = ["finetune", compressed, "--data", workdir / "imgs", "--workers", "0", "--epochs", "1", "--quiet",
            "--output", tmp_path / "ft", "--checkpoint-every", "7"]
    code, _, err = _run(capsys, *argv)  # stopped before the first checkpoint: no promise of a resume
    assert code == 130 and "interrupted" in err and "resumes" not in err
    assert "no checkpoint had been written yet (one every 7 steps and at each epoch's end)" in err
    assert not (tmp_path / "ft").exists()
    shutil.rmtree(tmp_path / ".ft.partial")
    written[:] = ["step00000007.ckpt", "step00000014.ckpt", "epoch000.ckpt", "last.ckpt"]
    code, _, err = _run(capsys, *argv)
    assert code == 130 and "the same command resumes it from its last checkpoint (step 14)" in err


def test_compressing_a_compressed_directory_is_refused_before_the_data(compressed_plain, tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # a folder without images: reading it would fail, so the model must fail first
    code, _, err = _run(capsys, "compress", compressed_plain, "--data", tmp_path / "empty", "--reduction", "0.3",
                        "--output", tmp_path / "o")
    _assert_one_line_error(code, err, "already compressed")  # not "--data ... holds no images": the model fails first
    assert not (tmp_path / "o").exists()


def test_messages_fit_what_was_given(compressed_plain, workdir, tmp_path, capsys):
    code, _, err = _run(capsys, "compress", ARCH, "--checkpoint", tmp_path, "--reduction", "0.5", "--data",
                        workdir / "imgs", "--output", tmp_path / "o")
    _assert_one_line_error(code, err, "is a directory: give --checkpoint a safetensors or PyTorch file")
    # a model directory's class count cannot be changed by --checkpoint or --model-kwargs: not suggested
    code, _, err = _run(capsys, "evaluate", compressed_plain, "--data", workdir / "imgs", "--workers", "0")
    _assert_one_line_error(code, err, "classes", "give data with the classes it was compressed for")
    assert "--model-kwargs" not in err


def test_data_errors_name_the_flags_not_the_library_fields(compressed_plain, workdir, tmp_path, capsys):
    # a label column the data does not have (a folder of one class, which the folder builder gives no labels, used
    # to be the example: a classifier now reads such data without labels, tests/test_cli_any_output.py)
    code, _, err = _run(capsys, "evaluate", compressed_plain, "--data", workdir / "imgs", "--workers", "0",
                        "--label-column", "nope")
    _assert_one_line_error(code, err, "has no label column 'nope'", "--label-column")
    assert "label_column=" not in err


def test_an_unreachable_target_is_refused_before_the_data(tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # a folder without images: reading it would fail
    for budget, needle in ((["--target-params", "99999999"], "is not below the model's"),
                           (["--reduction", "0.999"], "largest reachable reduction")):
        code, _, err = _run(capsys, "compress", ARCH, "--no-pretrained", "--model-kwargs", json.dumps(KWARGS),
                            "--input-size", str(SIZE), "--data", tmp_path / "empty", *budget,
                            "--output", tmp_path / "o")
        _assert_one_line_error(code, err, needle)  # not "--data ... holds no images": the data is not read yet


def test_top5_is_left_out_where_every_image_is_in_the_top_5():
    """With 5 classes or fewer top-5 is 100% whatever the model: the CLI's lines and the model card leave it out
    rather than print a constant; a report from before the class count was recorded keeps its figure."""
    from lowrank_vit.cli.data import top5_text
    from lowrank_vit.io.modelcard import render_card

    assert top5_text({"top5": 100.0, "classes": 3}, ", ") == ""
    assert top5_text({"top5": 100.0, "classes": 5}, ", ") == ""
    assert top5_text({"top5": 97.1, "classes": 6}, ", ") == ", top-5 97.10%"
    assert top5_text({"top5": 97.1}, "(", ")") == "(top-5 97.10%)"
    for classes, cell in ((3, "—"), (10, "97.10"), (None, "97.10")):
        metrics = {"top1": 90.0, "top5": 97.1, "images": 50} | ({"classes": classes} if classes else {})
        card = render_card({"accuracy": {"after": metrics}}, "model")
        assert f"| after compression | 90.00 | {cell} | 50 |" in card, card



# ----------------------------------------------------------- small helpers, against truths computed here

@pytest.mark.parametrize("text, expected", [("1,28,28", (1, 28, 28)), ("3x32x48", (3, 32, 48)), ("24", (None, 24, 24)),
                                            ("16x1", (None, 16, 1))])
def test_input_size_accepts_every_positive_size_one_included(text, expected):
    from lowrank_vit.cli.args import _input_size

    assert _input_size(text) == expected


@pytest.mark.parametrize("text", ["0,28,28", "32x0", "1,2,3,4", "a"])
def test_input_size_refuses_what_is_not_a_size(text):
    import argparse

    from lowrank_vit.cli.args import _input_size

    with pytest.raises(argparse.ArgumentTypeError, match="expected H, HxW or C,H,W"):
        _input_size(text)


def test_cores_counts_the_cores_this_process_may_use(monkeypatch):
    import os

    from lowrank_vit.cli import data as userdata

    assert userdata._cores() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS and Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert userdata._cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert userdata._cores() == 1


def test_a_timm_config_json_beside_the_checkpoint_carries_preprocessing_and_the_metadata_wins(tmp_path):
    from safetensors.torch import save_file

    from lowrank_vit.cli.sources import _checkpoint_preprocessing

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights), metadata={"std": "[0.2, 0.3, 0.4]"})
    (tmp_path / "config.json").write_text(json.dumps({"architecture": ARCH, "pretrained_cfg": {
        "mean": [0.1, 0.2, 0.3], "std": [0.9, 0.9, 0.9], "crop_pct": 0.8, "interpolation": "bilinear",
        "input_size": [3, 40, 40], "num_classes": 7}}))
    assert _checkpoint_preprocessing(weights) == {"mean": [0.1, 0.2, 0.3], "std": [0.2, 0.3, 0.4], "crop_pct": 0.8,
                                                  "interpolation": "bilinear", "input_size": [3, 40, 40]}
    (tmp_path / "config.json").write_text("{not json")  # a broken config.json is ignored, the metadata stays
    assert _checkpoint_preprocessing(weights) == {"std": [0.2, 0.3, 0.4]}


def test_rank_multiple_is_one_unless_asked_or_a_latency_table_is_used():
    import argparse

    from lowrank_vit.cli.compress import compression_config

    base = dict(recipe="paper", reduction=0.5, target_params=None, target_speedup=None, calib_samples=8, quiet=True,
                loss_pass_dtype=None, setting=[], latency_table=None, params_only=False, rank_multiple=None)
    assert compression_config(argparse.Namespace(**base), torch.device("cpu")).rank_multiple == 1
    assert compression_config(argparse.Namespace(**{**base, "rank_multiple": 4}), torch.device("cpu")).rank_multiple \
        == 4
    with_table = compression_config(argparse.Namespace(**{**base, "latency_table": "auto"}), torch.device("cpu"))
    assert (with_table.rank_multiple, with_table.latency_table) == (8, "auto")
    # a speedup target without a table profiles the model: the table's grid step again
    speed = compression_config(argparse.Namespace(**{**base, "recipe": "loss-aware", "reduction": None,
                                                      "target_speedup": 1.5}), torch.device("cpu"))
    assert (speed.rank_multiple, speed.latency_table, speed.target_speedup) == (8, "auto", 1.5)


def test_the_model_card_says_what_the_report_holds():
    """Every figure of the card against a report written here: the reduction in percent, the parameter counts,
    a dense layer as "dense", the fine-tune (partial or of every weight), VMeanba's blocks."""
    from lowrank_vit.io.modelcard import render_card

    layers = [{"name": "blocks.0.attn.qkv", "in_features": 48, "out_features": 144, "rank": None,
               "dense_params": 6912, "factored_params": 6912},
              {"name": "blocks.0.mlp.fc1", "in_features": 48, "out_features": 96, "rank": 7,
               "dense_params": 4608, "factored_params": 1008}]
    report = {"source": {"architecture": "vit_x", "description": "my model"}, "recipe": "paper",
              "params": {"before": 123456, "after": 70123}, "size_mib": {"before": 0.47, "after": 0.27},
              "reduction": 0.4321, "calib_images": 96, "data": "imgs/", "layers": layers,
              "finetune": {"epochs": 3, "lr": 0.001, "steps": 30, "train_factors": False}}
    card = render_card(report, "m")
    assert "`vit_x` (my model) compressed by `lowrank_vit` with the **paper** recipe" in card
    assert "| before | 123,456 | 0.5 |" in card and "| after | 70,123 | 0.3 |" in card
    assert "Reduction: 43.2% of the parameters. Calibration: 96 images of `imgs/`." in card
    assert "| `blocks.0.attn.qkv` | 48→144 | dense / 48 | 6,912 / 6,912 |" in card
    assert "| `blocks.0.mlp.fc1` | 48→96 | 7 / 48 | 1,008 / 4,608 |" in card
    assert "Fine-tuned (partial: norms, biases, head, patch embedding) for 3 epoch(s), lr 0.001, 30 steps." in card
    assert "VMeanba" not in card
    report["finetune"] |= {"train_factors": True, "distill": 0.5}
    report["vmeanba"] = {"chosen": ["layers.1.blocks.0.op", "layers.0.blocks.1.op"], "kl": 0.01234}
    card = render_card(report, "m")
    assert ("Fine-tuned (all weights: the low-rank factors, norms, biases, head, patch embedding) for 3 epoch(s), lr "
            "0.001, 30 steps, distilled from the model before compression (weight 0.5, temperature 1.0).") in card
    assert ("Selective scans: 2 block(s) run VMeanba's channel-mean scan (`layers.1.blocks.0.op`, "
            "`layers.0.blocks.1.op`), KL to the model before 0.0123 on the calibration images.") in card


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
    student = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **KWARGS)
    record = {"timm_name": ARCH, "model_kwargs": {**KWARGS, "img_size": SIZE}, "checkpoint": str(weights),
              "checkpoint_sha256": checkpoint_digest(weights), "pretrained": False}
    args = argparse.Namespace(teacher_checkpoint=None, quiet=True)
    teacher = load_teacher(args, Source(student, ARCH, "directory m", metadata={"source": record}))
    assert not teacher.training
    expected = load_file(str(weights))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in expected.items())
    other = timm.create_model(ARCH, pretrained=False, img_size=SIZE, **{**KWARGS, "num_classes": 4})
    with pytest.raises(UserError, match=r"the rebuilt dense model has 3 classes, the compressed one 4"):
        load_teacher(args, Source(other, ARCH, "directory m", metadata={"source": record}))


def test_the_card_of_a_model_only_vmeanba_touched_says_no_weight_changed():
    from lowrank_vit.io.modelcard import render_card

    card = render_card({"recipe": "vmeanba", "layers": [], "vmeanba": {"chosen": ["layers.0.blocks.0.op"],
                                                                       "kl": 0.002}}, "m")
    assert "the selective scans of the blocks listed below run VMeanba's channel-mean scan; no weight changed" in card
    assert "low-rank product" not in card
