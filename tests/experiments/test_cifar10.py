"""Tests of experiments/cifar10.py."""

from __future__ import annotations

import json
from pathlib import Path


def test_data_identity_follows_the_content_not_the_path(tmp_path: Path, monkeypatch):
    """The same parquet files under another path (or named relatively) are the same data, so a trained model is reused,
    never trained again over the committed one; other bytes are other data; a record written before the identity
    existed (fingerprint of the path as given) is still reused."""
    import experiments.cifar10 as cifar10

    first, second = tmp_path / "a" / "cifar", tmp_path / "b" / "elsewhere"
    for folder in (first, second):
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            (folder / f"{split}.parquet").write_bytes(f"{split} bytes".encode())
    identity = cifar10.data_identity(str(first))
    assert identity.startswith("sha256:") and identity == cifar10.data_identity(str(second))
    monkeypatch.chdir(tmp_path / "a")
    assert cifar10.data_identity("cifar") == identity
    assert cifar10.data_identity("uoft-cs/cifar10") == "uoft-cs/cifar10"  # a hub name is its own identity
    (second / "test.parquet").write_bytes(b"other bytes")
    assert cifar10.data_identity(str(second)) != identity

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr("lowrank_vit.repro.standins.train_classifier", no_training)
    recipe = cifar10.Recipe()
    for data, fingerprint in ((str(first), recipe.fingerprint(identity)), ("cifar", recipe.fingerprint("cifar"))):
        output = tmp_path / f"model_{fingerprint}"
        output.mkdir()
        (output / "model.safetensors").write_bytes(b"weights")
        (output / "model.json").write_text(json.dumps({"fingerprint": fingerprint, "top1": 50.0}))
        assert cifar10.train(data, output, recipe, progress=False)["top1"] == 50.0
        assert (output / "model.safetensors").read_bytes() == b"weights"
