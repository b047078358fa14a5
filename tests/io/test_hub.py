"""Tests of lowrank_vit/io/hub.py."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch

from lowrank_vit import compress, load_compressed, save_compressed
from lowrank_vit.io.hub import MODEL_FILES, parse_reference
from tests.helpers import (
    make_images,
    make_tiny_vit,
)


@pytest.mark.usefixtures("offline")
def test_an_unreachable_hub_model_quotes_its_cause_shortened_on_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from lowrank_vit.io.hub import download

    cause = "Cannot find the requested files in the disk cache\nand outgoing traffic has been disabled. " * 6

    def snapshot_download(*args, **kwargs):
        raise LocalEntryNotFoundError(cause)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FileNotFoundError) as info:
        download("hf-hub:someone/model")
    message = str(info.value)
    assert "\n" not in message
    match = re.fullmatch(r"cannot get hf-hub:someone/model from the Hugging Face hub \(LocalEntryNotFoundError: "
                         r"(.*)\): check the name, go online .*", message)
    assert match, message
    quoted = match.group(1)
    assert len(quoted) <= 200 and quoted.endswith("...")
    words = " ".join(cause.split())
    assert quoted.startswith("Cannot find the requested files in the disk cache and outgoing")
    assert words.startswith(quoted[:-3].rstrip() + " ")  # cut at a word


def _hub_cache(root: Path, repo: str, filename: str) -> Path:
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/<file>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    path = repo_dir / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    return path


@pytest.mark.usefixtures("offline")
def test_a_cached_file_is_found_in_the_cache_directory_asked_for(tmp_path, monkeypatch):
    """`cache_dir` (timm's `cache_dir` model argument) is where the lookup reads, not the default cache."""
    from lowrank_vit.io.hub import cached_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "default"))
    (tmp_path / "default").mkdir()
    path = _hub_cache(tmp_path / "mine", "someone/tiny-vit", "model.safetensors")
    assert cached_file("someone/tiny-vit", ["open_clip_model.safetensors", "model.safetensors"],
                       cache_dir=tmp_path / "mine") == path
    assert cached_file("someone/tiny-vit", ["model.safetensors"]) is None  # the default cache does not hold it


@pytest.mark.usefixtures("offline")
def test_a_cached_file_is_found_at_the_revision_asked_for(tmp_path):
    """`revision` (a pinned commit of a hub model) reads that snapshot, not the branch's newest."""
    from lowrank_vit.io.hub import cached_file

    newest = _hub_cache(tmp_path, "someone/tiny-vit", "model.safetensors")
    pinned = newest.parents[1] / ("f" * 40) / "model.safetensors"
    pinned.parent.mkdir()
    pinned.write_text("{}")
    assert cached_file("someone/tiny-vit", ["model.safetensors"], cache_dir=tmp_path) == newest
    assert cached_file("someone/tiny-vit", ["model.safetensors"], revision="f" * 40, cache_dir=tmp_path) == pinned


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


COMMITS = {"main": "1" * 40, "v2": "2" * 40}


def _two_revisions(compressed_by_40, tmp_path) -> tuple[Path, torch.nn.Module]:
    """A hub cache (the layout huggingface_hub writes) of someone/tiny whose ``main`` holds the compressed model and
    whose ``v2`` holds a copy with another head; returns the cache and the v2 model."""
    second = copy.deepcopy(compressed_by_40)
    with torch.no_grad():
        second.head.weight.add_(1.0)
    repo = tmp_path / "cache" / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    for ref, model in (("main", compressed_by_40), ("v2", second)):
        save_compressed(model, tmp_path / ref)
        (repo / "refs" / ref).write_text(COMMITS[ref])
        shutil.copytree(tmp_path / ref, repo / "snapshots" / COMMITS[ref])
    return tmp_path / "cache", second


def test_a_hub_reference_with_a_revision_loads_that_revision(compressed_by_40, tmp_path):
    """``hf-hub:owner/name@v2`` must give v2's weights, not the default branch's: a user pinning a revision for
    reproducibility would otherwise evaluate another model without any sign of it."""
    cache, second = _two_revisions(compressed_by_40, tmp_path)
    x = make_images(3, seed=7)
    with torch.no_grad():
        pinned = load_compressed("hf-hub:someone/tiny@v2", cache_dir=cache)(x)
        default = load_compressed("hf-hub:someone/tiny", cache_dir=cache)(x)
        assert torch.equal(pinned, second(x))
        assert torch.equal(default, compressed_by_40(x))
    assert not torch.equal(pinned, default)


def test_a_hub_download_fetches_only_the_model_files(compressed_by_40, tmp_path, monkeypatch):
    """A model repository may hold much more than the model (training checkpoints, pickles, data); loading fetches
    only the model's own files. The hub is a stand-in that serves a folder through huggingface_hub's own pattern
    filter, as ``snapshot_download`` does."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    remote = save_compressed(compressed_by_40, tmp_path / "remote")
    (remote / "optimizer.pt").write_bytes(b"\0" * 4096)  # what must not be downloaded
    (remote / "train.parquet").write_bytes(b"\0" * 4096)
    calls = []

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, token=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision))
        local = tmp_path / "downloaded"
        local.mkdir(exist_ok=True)
        for name in filter_repo_objects([p.name for p in remote.iterdir()], allow_patterns=allow_patterns):
            shutil.copy(remote / name, local / name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = load_compressed("hf-hub:someone/tiny@v3")
    assert calls == [("someone/tiny", "v3")]
    files = {p.name for p in (tmp_path / "downloaded").iterdir()}
    assert {"model.safetensors", "lowrank_vit.json"} <= files
    assert not files & {"optimizer.pt", "train.parquet"}
    x = make_images(2, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed_by_40(x))


def test_a_private_hub_model_loads_with_the_token_given(compressed_by_40, tmp_path, monkeypatch):
    """``load_compressed(..., token=...)`` reaches a private repository: the token goes to the hub with the request.
    The hub is a stand-in that serves the model only to a request carrying the repository's token, and refuses any
    other as the hub refuses an anonymous request for a private repository."""
    import huggingface_hub

    remote = save_compressed(compressed_by_40, tmp_path / "remote")

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, token=None, allow_patterns=None, **kwargs):
        if token != "t0ken":
            raise OSError(f"401 Client Error: Repository Not Found for url: https://huggingface.co/{repo_id}")
        return str(remote)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FileNotFoundError, match="someone/private"):
        load_compressed("hf-hub:someone/private")
    loaded = load_compressed("hf-hub:someone/private", token="t0ken")
    x = make_images(2, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed_by_40(x))
