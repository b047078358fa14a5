"""Reading a user's weights from the files people have (safetensors, torch.save state dicts), never unpickling
anything but tensors: each fixture is written the way a training script writes it, and the truth is the model's own
state dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lowrank_vit.io.checkpoints import CheckpointError, checkpoint_format, read_state_dict
from lowrank_vit.repro.models import SetupError, load_checkpoint_

KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 5}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wrap, notes", [
    (lambda sd: sd, []),
    (lambda sd: {"model": sd, "optimizer": {"lr": 0.1}, "epoch": 3}, ["the weights under 'model'"]),
    (lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, ["the weights under 'state_dict'",
                                                                           "the 'module.' prefix removed"]),
    (lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, ["the '_orig_mod.' prefix removed"]),
])
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_a_torch_save_state_dict_is_read_unwrapped_whatever_its_name(tmp_path, wrap, notes, suffix):
    source = _model(1).state_dict()
    path = tmp_path / f"weights{suffix}"
    torch.save(wrap(source), path)
    assert checkpoint_format(path) == "torch"
    tensors, said = read_state_dict(path)
    assert _same(tensors, source) and said == notes
    model = load_checkpoint_(_model(2), path)  # another initialization, then the file's weights
    assert _same(model.state_dict(), source)


def test_the_legacy_torch_format_and_safetensors_read_the_same(tmp_path):
    source = _model(3).state_dict()
    torch.save(source, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "w.safetensors"))
    assert checkpoint_format(tmp_path / "old.pt") == "torch"
    assert checkpoint_format(tmp_path / "w.safetensors") == "safetensors"
    assert _same(read_state_dict(tmp_path / "old.pt")[0], source)
    assert _same(read_state_dict(tmp_path / "w.safetensors")[0], source)


class _Payload:
    """What a malicious or merely careless checkpoint holds: unpickling it would run code."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "ran"
    torch.save({"model": _model(1).state_dict(), "hook": payload}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors"):
        read_state_dict(tmp_path / "evil.pth")
    assert not payload.marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"plain text, not weights" * 8, "neither a safetensors file nor a PyTorch file"),
    ("list", "holds a list, not a state dict"),
    ("mixed", "entries epoch are not tensors"),
])
def test_what_is_not_a_state_dict_is_named(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "mixed":
        torch.save({"w": torch.zeros(2), "epoch": 3}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_a_mismatch_after_unwrapping_says_what_was_unwrapped(tmp_path):
    torch.save({"model": _model(1).state_dict()}, tmp_path / "w.pth")
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**KWARGS, "depth": 3})
    with pytest.raises(SetupError, match=r"missing blocks\.2\..*read with the weights under 'model'"):
        load_checkpoint_(other, tmp_path / "w.pth")


def test_the_cli_evaluates_a_pth_exactly_as_the_same_weights_in_safetensors(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from conftest import cli

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
