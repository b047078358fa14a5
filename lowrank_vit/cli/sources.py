"""The model a user command starts from: a timm name (pretrained, random, or with ``--checkpoint`` weights from
safetensors, PyTorch, Hugging Face transformers or torchvision), a model directory written by ``compress``, or a hub
repository holding one; and the dense teacher ``finetune --distill`` rebuilds."""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from lowrank_vit.cli.base import UserError, last_line
from lowrank_vit.cli.preprocessing import PREPROCESSING_KEYS, USER_PREPROCESSING
from lowrank_vit.io.convert import ConversionError, checkpoint_kwargs
from lowrank_vit.io.hub import cached_file, download, is_hub_reference, offline
from lowrank_vit.io.surgery import PLAN_FILE, load_compressed, read_plan
from lowrank_vit.nn.adapters import timm_with_our_models
from lowrank_vit.repro.models import SetupError, build_model, checkpoint_digest
from lowrank_vit.repro.registry import ModelConfig


@dataclass
class Source:
    """A loaded model and what travels with it."""

    model: nn.Module
    architecture: str
    description: str
    """For people: ``timm deit_small_patch16_224 (pretrained)``, ``directory out/deit-50``..."""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """Preprocessing the weights carry (a directory's plan, a checkpoint's metadata); empty if none."""
    carried_from: str = ""
    """Where :attr:`preprocessing` came from."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """A model directory's plan metadata (empty for a timm name)."""
    record: dict[str, Any] = field(default_factory=dict)
    """JSON-safe identity of the source, stored in the report."""
    rebuild: tuple[str, dict[str, Any]] | None = None
    """The timm name and arguments that built the model (a timm name's, a directory's plan), for saving it with
    them: the adapter's reading of its modules cannot know every option (``compress`` checks that they rebuild it)."""


def _suggest(name: str) -> str:
    timm = timm_with_our_models()

    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"


def _checkpoint_preprocessing(path: Path) -> dict[str, Any]:
    """Preprocessing a checkpoint carries: its safetensors metadata (keys ``mean``, ``std``, ``crop_pct``,
    ``interpolation``, ``input_size``, JSON-encoded) and, beside it, a timm ``config.json`` (its ``pretrained_cfg``,
    the hub's layout). The metadata wins."""

    found: dict[str, Any] = {}
    config = path.parent / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        cfg = data.get("pretrained_cfg", data) if isinstance(data, dict) else {}
        found.update({k: cfg[k] for k in (*USER_PREPROCESSING, "input_size") if isinstance(cfg, dict) and k in cfg})
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return found  # load_checkpoint_ names the problem
    for key in (*USER_PREPROCESSING, "input_size"):
        if key in meta:
            try:
                found[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                found[key] = meta[key]  # a bare string such as bicubic
    return found


def timm_source(args: argparse.Namespace) -> Source:
    timm = timm_with_our_models()


    name = args.model
    if not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        if any(ch in name for ch in "/\\") or name.startswith((".", "~")):
            raise UserError(f"no model directory {name!r} (and it is not a timm model name)")
        raise UserError(f"timm has no model {name!r}{_suggest(name)}")
    kwargs = dict(args.model_kwargs)
    carried: dict[str, Any] = {}
    checkpoint = None
    if args.checkpoint:
        checkpoint = Path(args.checkpoint).expanduser()
        if not checkpoint.is_file():
            what = "is a directory" if checkpoint.is_dir() else "does not exist"
            raise UserError(f"checkpoint {str(checkpoint)!r} {what}: give --checkpoint a safetensors or PyTorch file")
        carried = _checkpoint_preprocessing(checkpoint)

        try:  # a torchvision or transformers ViT: the constructor arguments its shapes fix, under the user's
            kwargs = checkpoint_kwargs(checkpoint, kwargs)[0]
        except ConversionError as err:
            raise UserError(f"checkpoint {str(checkpoint)!r}: {err}") from None
    size = getattr(args, "input_size", None) or (_input_size_of(carried.get("input_size")))
    if size is not None:
        channels, height, width = size
        kwargs.setdefault("img_size", height if height == width else [height, width])
        if channels is not None:
            kwargs.setdefault("in_chans", channels)
    pretrained = not args.no_pretrained and checkpoint is None
    if pretrained:
        _check_offline_weights(name, kwargs)
    cfg = ModelConfig("timm", name, pretrained=pretrained, kwargs=kwargs,
                      checkpoint=None if checkpoint is None else str(checkpoint))
    try:
        model = build_model(cfg, progress=not args.quiet)
    except SetupError as err:  # the weights: not downloadable, or a checkpoint that does not fit
        message = str(err).replace("or use --scale smoke", "or give --no-pretrained or --checkpoint FILE")
        raise UserError(message.replace("model.checkpoint=", "--checkpoint").replace(
            "with these model.kwargs", "with these --model-kwargs")) from None
    except (TypeError, RuntimeError) as err:  # bad kwargs, a pretrained tag timm does not have
        raise UserError(f"cannot build timm model {name!r} with {kwargs}: {err}") from None
    weights = "your checkpoint" if checkpoint else ("pretrained" if pretrained else "random weights")
    record = {"timm_name": name, "model_kwargs": kwargs, "pretrained": pretrained,
              "checkpoint": None if checkpoint is None else str(checkpoint),
              "checkpoint_sha256": None if checkpoint is None else checkpoint_digest(checkpoint)}
    return Source(model, name.split(".")[0], f"timm {name}, {weights}",
                  preprocessing={k: carried[k] for k in USER_PREPROCESSING if k in carried},
                  carried_from=f"checkpoint {checkpoint}" if carried else "", record=record,
                  rebuild=None if name.startswith("hf-hub:") else (name.split(".")[0], kwargs))


def _hub_weights(name: str, kwargs: dict[str, Any]) -> tuple[str, tuple[str, ...], str | None] | None:
    """Where timm reads the pretrained weights of ``name`` (its tag, else the architecture's default one) from the
    Hugging Face hub: (repository, the files it tries in order, revision). None where they come from elsewhere (a URL,
    a file, a ``pretrained_cfg`` in --model-kwargs) or timm does not say. timm's own resolution is asked rather than
    copied, so that the answer is what create_model will do."""
    if any(key.startswith("pretrained_cfg") for key in kwargs):
        return None
    try:
        from timm.models import get_pretrained_cfg
        from timm.models._builder import _resolve_pretrained_source
        from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split
    except ImportError:  # another timm layout: no early check; create_model's own error still comes
        return None
    try:  # timm's private helpers: any change of theirs only skips this early check
        cfg = get_pretrained_cfg(name)
        source, location = _resolve_pretrained_source(cfg.to_dict()) if cfg is not None else (None, None)
    except Exception:  # a tag timm does not have (create_model names it), or another signature
        return None
    if source != "hf-hub":
        return None
    hub_id, filename = location if isinstance(location, (tuple, list)) else (location, HF_WEIGHTS_NAME)
    repo_id, revision = hf_split(hub_id)
    files = (filename,) if filename.endswith(".safetensors") else (*_get_safe_alternatives(filename), filename)
    return repo_id, tuple(files), revision


def _check_offline_weights(name: str, kwargs: dict[str, Any]) -> None:
    """With ``HF_HUB_OFFLINE`` set, pretrained weights that the local Hugging Face cache does not hold are refused at
    once, naming the model: timm would build the model first and then fail on huggingface_hub's long message."""

    if not offline():
        return
    where = _hub_weights(name, kwargs)
    if where is None:
        return
    repo_id, files, revision = where
    if cached_file(repo_id, files, revision, kwargs.get("cache_dir")) is None:
        raise UserError(f"{name}: HF_HUB_OFFLINE is set (offline) and timm's pretrained weights for it ({repo_id}) "
                        f"are not in the local Hugging Face cache: give your own weights with --checkpoint FILE (or "
                        f"--no-pretrained for random ones), or unset HF_HUB_OFFLINE to download them once")


def _input_size_of(value: Any) -> tuple[int | None, int, int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1]), int(value[2])
    return None


def directory_source(args: argparse.Namespace, directory: Path) -> Source:
    if getattr(args, "checkpoint", None):
        raise UserError("--checkpoint goes with a timm model name, not with a model directory")
    if getattr(args, "model_kwargs", None):
        raise UserError("--model-kwargs goes with a timm model name; a model directory knows its architecture")
    plan = read_plan(directory)
    model = load_compressed(directory)
    metadata = plan.get("metadata") or {}
    saved = metadata.get("preprocessing") or {}
    return Source(model, plan["architecture"], f"directory {directory}",
                  {k: saved[k] for k in PREPROCESSING_KEYS if k in saved}, f"directory {directory}", metadata,
                  {"directory": str(directory), "architecture": plan["architecture"],
                   "from": metadata.get("source")}, rebuild=(plan["architecture"], plan["model_kwargs"]))


def load_teacher(args: argparse.Namespace, source: Source, *, flag: str = "--distill",
                 otherwise: str = "fine-tune without --distill", override: str = "--teacher-checkpoint") -> nn.Module:
    """The model a model directory was compressed from, rebuilt from the source ``compress`` recorded in it (timm
    name, arguments, pretrained tag or checkpoint), for distillation (and ``evaluate``'s fidelity: ``flag``,
    ``otherwise`` and ``override`` word its refusals). A recorded checkpoint must still be the file that was
    compressed (same SHA-256) unless ``--teacher-checkpoint`` (``args.teacher_checkpoint``) names the file to use."""

    given = getattr(args, "teacher_checkpoint", None)
    record = source.metadata.get("source")
    if not isinstance(record, dict) or not record.get("timm_name"):
        raise UserError(f"{flag} needs the model before compression, and {source.description} does not record "
                        f"it (lowrank-vit compress records it); {otherwise}")
    checkpoint = given or record.get("checkpoint")
    if checkpoint is None and not record.get("pretrained"):
        raise UserError(f"{flag}: {source.description} was compressed from random weights, which cannot be "
                        f"rebuilt; {otherwise}")
    if checkpoint is not None and given is None:
        path = Path(checkpoint).expanduser()
        if not path.is_file() or checkpoint_digest(path) != record.get("checkpoint_sha256"):
            state = "changed" if path.is_file() else "is gone"
            raise UserError(f"{flag}: the dense weights compress read, {checkpoint!r}, {state} since; give "
                            f"{override} FILE")
    spec = argparse.Namespace(model=record["timm_name"], model_kwargs=dict(record.get("model_kwargs") or {}),
                              checkpoint=checkpoint, no_pretrained=checkpoint is None and not record["pretrained"],
                              quiet=args.quiet)
    teacher = timm_source(spec).model
    classes = getattr(source.model, "num_classes", None)
    if getattr(teacher, "num_classes", None) != classes:
        raise UserError(f"{flag}: the rebuilt dense model has {getattr(teacher, 'num_classes', None)} classes, "
                        f"the compressed one {classes}")
    return teacher.eval()


def load_source(args: argparse.Namespace) -> Source:
    """The model MODEL names: a directory written by ``save_compressed``/``compress`` (local, or a hub repository
    ``hf-hub:owner/name`` holding one), or a timm name (``hf-hub:`` names of timm's own repositories too)."""

    if is_hub_reference(args.model):
        unreachable = None
        try:
            snapshot = download(args.model)
        except FileNotFoundError as err:
            snapshot, unreachable = None, err  # not reachable as a model directory: timm may still know it
        if snapshot is not None and (snapshot / PLAN_FILE).is_file():
            return directory_source(args, snapshot)
        try:
            return timm_source(args)
        except Exception as err:  # timm could not build it either: the hub's reason is the one to read
            if unreachable is None or not isinstance(err, (ValueError, FileNotFoundError, RuntimeError)):
                raise
            raise UserError(f"{unreachable} (timm could not build it either: {last_line(err)})") from None
    path = Path(args.model).expanduser()
    if path.is_dir():
        return directory_source(args, path)
    if path.exists():
        raise UserError(f"{args.model!r} is a file: give a model directory, or a timm name with --checkpoint FILE")
    return timm_source(args)
