"""Tests of experiments/calib_distill_probe.py."""

from __future__ import annotations

import pytest
import timm
import torch

from experiments.calib_distill_probe import main, parse_variant, probe


def test_parse_variant_reads_steps_rate_and_what_trains():
    assert parse_variant("32:3e-5:all") == (32, 3e-5, "all", False)
    assert parse_variant("128:5e-5:factors:mix") == (128, 5e-5, "factors", True)
    for bad in ("0:1e-3:all", "8:0:all", "8:1e-3:heads", "8:1e-3", "x:1e-3:all", "8:1e-3:all:cutmix",
                "8:1e-3:all:mix:mix"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_a_bad_variant_or_base_is_a_one_line_error_with_status_2(capsys, tmp_path):
    assert main(["--cifar10", str(tmp_path), "--variants", "8:1e-3:heads", "--json", str(tmp_path / "x.json")]) == 2
    assert main(["--cifar10", str(tmp_path), "--variants", "8:1e-3:all", "--bases", "nope",
                 "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "heads" in err[0] and "nope" in err[1]
    assert not (tmp_path / "x.json").exists()


def test_probe_pairs_each_variant_against_the_compressed_model_before_it():
    """A variant whose steps cannot move the weights (learning rate 1e-12) keeps the base's predictions image by
    image; one that trains moves them, and its paired counts are those of its own records."""
    from experiments.loss_aware_study import paired

    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                              depth=2, num_heads=2, num_classes=4).eval()
    data = {"train_x": torch.randn(64, 3, 16, 16), "train_y": torch.randint(0, 4, (64,)),
            "eval_x": torch.randn(40, 3, 16, 16), "eval_y": torch.randint(0, 4, (40,))}
    cell = probe("tiny", dense, data, "vanilla", 0.6, ["2:1e-12:all", "16:3e-3:all"], calib=64, say=lambda _: None)
    assert set(cell) == {"", "2:1e-12:all", "16:3e-3:all"}
    assert cell["2:1e-12:all"]["correct"] == cell[""]["correct"]
    assert cell["16:3e-3:all"]["kl"] != cell[""]["kl"]
    assert paired(cell["2:1e-12:all"], cell[""])[:2] == (0, 0)
