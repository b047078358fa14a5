"""Hub load and save, offline: ``load_compressed("hf-hub:...")`` from a Hugging Face cache the test fills, and
``save_compressed(..., push_to_hub=...)`` against a recording stand-in of ``HfApi`` (never the network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lowrank_vit import compress, load_compressed, save_compressed
from lowrank_vit.io.hub import MODEL_FILES, parse_reference

from conftest import make_images, make_tiny_vit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fill_cache(cache: Path, repo_id: str, source: Path) -> None:
    """The layout huggingface_hub itself writes: refs/main names a snapshot folder holding the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, repo / "snapshots" / COMMIT)


@pytest.fixture
def saved(tmp_path) -> tuple[torch.nn.Module, Path]:
    model = make_tiny_vit()
    compress(model, [make_images(16)], reduction=0.4, calib_samples=16, progress=False)
    return model, save_compressed(model, tmp_path / "local")


def test_load_from_the_hub_cache_offline(saved, tmp_path):
    model, directory = saved
    _fill_cache(tmp_path / "cache", "someone/tiny-vit-40", directory)
    loaded = load_compressed("hf-hub:someone/tiny-vit-40", cache_dir=tmp_path / "cache")
    x = make_images(3, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_model_neither_cached_nor_reachable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="someone/absent"):
        load_compressed("hf-hub:someone/absent", cache_dir=tmp_path / "empty-cache")


def test_push_to_hub_uploads_the_model_files(saved, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class RecordingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, folder_path, repo_id, allow_patterns, commit_message):
            calls["upload"] = (Path(folder_path), repo_id, allow_patterns)
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return "https://huggingface.co/someone/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    model, _ = saved
    out = save_compressed(model, tmp_path / "pushed", push_to_hub="someone/tiny", token="t0ken")
    assert calls["create"] == ("someone/tiny", False, True)
    assert calls["upload"] == (out, "someone/tiny", list(MODEL_FILES))
    assert {"model.safetensors", "lowrank_vit.json"} <= set(calls["files"])
    assert calls["token"] == "t0ken"


@pytest.mark.parametrize("bad", ["hf-hub:", "hf-hub:noslash", "hf-hub:a/b/c", "hf-hub:/b"])
def test_malformed_references(bad):
    with pytest.raises(ValueError, match="not a hub reference"):
        parse_reference(bad)
    assert parse_reference("hf-hub:a/b@v1") == ("a/b", "v1")


def test_the_cli_says_why_an_unreachable_hub_model_could_not_be_loaded(tmp_path, monkeypatch, capsys):
    """Offline, an hf-hub: name is neither a cached model directory nor a timm model: the hub's reason (offline, go
    online or set HF_TOKEN) is what the user reads, not only timm's "no model"."""
    from lowrank_vit.cli import main as cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = cli.main(["evaluate", "hf-hub:someone/absent", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot get hf-hub:someone/absent from the Hugging Face hub" in err and "HF_HUB_OFFLINE" in err
