"""Compressed model directories on the Hugging Face hub: ``load_compressed("hf-hub:owner/name")`` and
``save_compressed(model, DIR, push_to_hub="owner/name")``.

A hub repository holds exactly what a local directory holds (``model.safetensors``, ``lowrank_vit.json`` and, from
``lowrank-vit compress``, the report, figure and model card), so loading is a ``snapshot_download`` into the
Hugging Face cache followed by the local loader: nothing is unpickled, and with ``HF_HUB_OFFLINE=1`` a model already
in the cache loads without the network.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

HUB_PREFIX = "hf-hub:"
"""Prefix of a hub reference, as in timm: ``hf-hub:owner/name`` (``@revision`` optional)."""
MODEL_FILES = ("lowrank_vit.json", "model.safetensors", "README.md", "report.json", "ranks.png")
"""What is downloaded: the model and the files that describe it, never anything else the repository holds."""


def is_hub_reference(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a hub repository (``hf-hub:owner/name``) rather than a local directory."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_reference(reference: str) -> tuple[str, str | None]:
    """``hf-hub:owner/name@revision`` -> (``owner/name``, ``revision`` or None)."""
    body = reference[len(HUB_PREFIX):]
    repo_id, _, revision = body.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{reference!r} is not a hub reference: expected {HUB_PREFIX}owner/name[@revision]")
    return repo_id, revision or None


def download(reference: str, cache_dir: str | os.PathLike | None = None, token: str | None = None) -> Path:
    """The local snapshot of a hub model (downloaded into the Hugging Face cache unless it is there already).

    Raises:
        FileNotFoundError: the repository or revision is not reachable (offline and not cached, unknown, private
            without a token); the message is one line.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, revision = parse_reference(reference)
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                   allow_patterns=list(MODEL_FILES))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as err:
        first = textwrap.shorten(str(err), 200, placeholder="...")  # one line, cut at a word
        raise FileNotFoundError(f"cannot get {reference} from the Hugging Face hub ({type(err).__name__}: {first}): "
                                f"check the name, go online (HF_HUB_OFFLINE unset) or set HF_TOKEN for a private "
                                f"repository") from None
    return Path(folder)


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``, as huggingface_hub reads it) is set to a true value,
    read now: huggingface_hub reads it once, at import, and would miss it set later in the process (a notebook, a
    test); its own true spellings (1, ON, YES, TRUE, any case) are the ones accepted."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ENV_VARS_TRUE_VALUES


def cached_file(repo_id: str, filenames: tuple[str, ...] | list[str], revision: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The first of ``filenames`` of the hub repository ``repo_id`` that the local Hugging Face cache holds (the
    default cache unless ``cache_dir``), found without the network; None if none is cached."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):  # not None, nor the marker of a file the hub said does not exist
            return Path(found)
    return None


def push(directory: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
         commit_message: str = "Upload compressed model (lowrank_vit)") -> str:
    """Upload a saved model directory to the hub repository ``repo_id`` (created if needed); returns the commit
    URL. Only :data:`MODEL_FILES` are uploaded."""
    from huggingface_hub import HfApi

    if repo_id.startswith(HUB_PREFIX):
        repo_id, _ = parse_reference(repo_id)
    elif repo_id.count("/") != 1:
        raise ValueError(f"push_to_hub needs a repository id owner/name, got {repo_id!r}")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, allow_patterns=list(MODEL_FILES),
                             commit_message=commit_message)
    return str(info)  # huggingface_hub's CommitInfo is a str whose value is the commit URL (older versions: the URL)


__all__ = ["HUB_PREFIX", "MODEL_FILES", "cached_file", "download", "is_hub_reference", "offline", "parse_reference",
           "push"]
