"""Tests of lowrank_vit/repro/models.py."""

from __future__ import annotations

import pytest
import timm
import torch

from lowrank_vit.repro.models import SetupError, load_checkpoint_
from tests.helpers import KWARGS, QUICK_SETS, TINY_TIMM, _hf, _model, cli, one_line_error, patch_everywhere


def test_a_mismatch_after_unwrapping_says_what_was_unwrapped(tmp_path):
    torch.save({"model": _model(1).state_dict()}, tmp_path / "w.pth")
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**KWARGS, "depth": 3})
    with pytest.raises(SetupError, match=r"missing blocks\.2\..*read with the weights under 'model'"):
        load_checkpoint_(other, tmp_path / "w.pth")


def test_a_distilled_deit_in_a_plain_name_says_what_it_was(tmp_path):
    source = _hf("deit-teacher")
    source.save_pretrained(tmp_path)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=5)
    with pytest.raises(SetupError, match=r"unexpected dist_token, head_dist.*converted from hf-deit.*distilled"):
        load_checkpoint_(model, tmp_path / "model.safetensors")


@pytest.mark.usefixtures("_offline")
def test_more_classes_than_the_head_fails_before_calibration(capsys, tmp_path, monkeypatch):
    import lowrank_vit.pipeline

    def never(*args, **kwargs):
        raise AssertionError("compress ran before the class check")

    patch_everywhere(monkeypatch, lowrank_vit.pipeline, "compress", never)
    two = [a.replace('"num_classes": 10', '"num_classes": 2') for a in TINY_TIMM]
    code, _, err = cli(capsys, "run", "table2/deit_s/ours-50", "--scale", "smoke", "--output", str(tmp_path / "r"),
                       *QUICK_SETS, *two, "--quiet")
    line = one_line_error(err)
    assert code == 2 and "10 classes" in line and "predicts 2" in line


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
