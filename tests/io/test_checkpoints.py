"""Tests of lowrank_vit/io/checkpoints.py."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowrank_vit.io.checkpoints import CheckpointError, checkpoint_format, read_state_dict
from lowrank_vit.repro.models import load_checkpoint_
from tests.helpers import _model


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


@pytest.mark.usefixtures("offline")
def test_a_pickle_with_objects_is_refused_quoting_torchs_first_line(tmp_path):
    from lowrank_vit.io.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "trainer.pt"
    torch.save({"weight": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(pickle.UnpicklingError) as torch_error:
        torch.load(path, weights_only=True)
    first = str(torch_error.value).strip().splitlines()[0]
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert f"the code they name, and that is never done here ({first[:160]}): load it yourself" in str(info.value)


class _Ran:
    ran = False


def _mark_ran() -> str:
    _Ran.ran = True
    return "ran"


class _MarkingPayload:
    def __reduce__(self):
        return _mark_ran, ()


@pytest.mark.usefixtures("offline")
def test_a_torch_checkpoint_is_never_unpickled_even_where_the_environment_asks_torch_to(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch.load's default to full unpickling; the library asks for
    weights only explicitly, so a file naming code is still refused and the code never runs."""
    from lowrank_vit.io.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "w.pt"
    torch.save({"weight": torch.zeros(2), "extra": _MarkingPayload()}, str(path))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _Ran.ran = False
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors"):
        read_state_dict(path)
    assert _Ran.ran is False


@pytest.mark.usefixtures("offline")
def test_a_damaged_torch_file_says_what_torch_raised(tmp_path):
    import zipfile

    from lowrank_vit.io.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "w.pt"
    with zipfile.ZipFile(path, "w") as archive:  # a zip, as torch.save writes, without the records torch reads
        archive.writestr("w/version", "3\n")
    try:
        torch.load(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001  (the independent truth: what torch itself raises)
        raised = type(err).__name__
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert f"is a damaged PyTorch file ({raised}: " in str(info.value)


def test_a_safetensors_header_length_must_be_under_100_million_bytes(tmp_path):
    """8 little-endian bytes of header length, then the JSON header's "{": a length of 100,000,000 or more is no
    safetensors file's (and the file is neither a zip nor a pickle)."""
    below, at = tmp_path / "below", tmp_path / "at"
    below.write_bytes((99_999_999).to_bytes(8, "little") + b'{"a": 1}')
    at.write_bytes((100_000_000).to_bytes(8, "little") + b'{"a": 1}')
    assert checkpoint_format(below) == "safetensors"
    assert checkpoint_format(at) == "unknown"
