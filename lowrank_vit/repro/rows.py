"""What a registry row produces and reads, around the compression the runner (:mod:`lowrank_vit.repro.runner`) does:

- its wandb run (one per row, all stages): the modes ``--wandb`` takes, the project (``WANDB_PROJECT`` or
  "lowrank_vit") and the logger, grouped by table and scale and tagged with the method, architecture, scale and
  ratio, which are also top-level config keys;
- its evaluations: top-1 and top-5 accuracy (:func:`evaluate`), and the starting model's accuracy evaluated once per
  output directory and reused by every row that starts from the same weights on the same data
  (:func:`row_dense_accuracy`, ``OUTPUT/.dense/KEY.json``), keyed on what names the weights for good
  (:func:`weights_identity`: a checkpoint's digest, the stand-in's fingerprint, the timm name) and the versions of
  torch and timm (:func:`installed_version`);
- its finished result, ``OUTPUT/NAME/result.json``: reading it (:func:`read_result`), telling whether it was
  computed with the very config about to run (:func:`finished`: a stale one is run again, one of another config is
  never overwritten silently), comparing configs without what does not change the result (:func:`comparable`);
- the baseline guard: a full-scale row whose dense model scores far from the paper's baseline is stopped before it
  spends GPU hours compressing the wrong weights or data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_vit.config import resolve_gram_precision
from lowrank_vit.core.files import write_json
from lowrank_vit.core.progress import progress_bar
from lowrank_vit.repro.models import SetupError, checkpoint_digest
from lowrank_vit.repro.registry import (
    Experiment,
    ModelConfig,
    RunConfig,
    list_experiments,
)
from lowrank_vit.repro.standins import STANDINS
from lowrank_vit.stages.logging_utils import make_logger

WANDB_MODES = ("online", "offline", "disabled")


def make_row_logger(exp: Experiment, cfg: RunConfig, wandb: str, out_dir: Path, group: str | None = None) -> Any:
    ratio = round(100 * exp.reduction) if exp.reduction else None
    tags = [exp.method, exp.arch, cfg.scale] + ([f"-{ratio}%"] if ratio else [])
    # method, arch and ratio also as top-level config keys: a dashboard groups and filters runs by config keys
    keys = {"experiment": exp.name, "table": exp.table, "method": exp.method, "arch": exp.arch,
            "model_name": cfg.model.name, "ratio": ratio, "reduction": exp.reduction}
    return make_logger(wandb, project=wandb_project(), group=group or f"{exp.table}-{cfg.scale}", tags=tags,
                       config={**keys, **cfg.to_dict(), "paper": exp.to_dict()["paper"]},
                       save_dir=out_dir, name=exp.name, job_type="run")


def wandb_project() -> str:
    """The wandb project of every run: ``WANDB_PROJECT`` when set, else "lowrank_vit"."""
    return os.environ.get("WANDB_PROJECT") or "lowrank_vit"


DENSE_DIR = ".dense"
"""Under the output directory: the starting models' accuracies, shared by the rows (see ``row_dense_accuracy``)."""


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, progress: bool = True,
             desc: str = "evaluate") -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-k capped at the number of classes), the image count and the number
    of classes (with 5 or fewer, every image is in the top 5: printers leave that figure out)."""
    from lowrank_vit.stages.finetune import split_batch

    model.eval().to(device)
    correct1 = correct5 = total = classes = 0
    with progress_bar(len(loader) if hasattr(loader, "__len__") else 0, desc, "batch", progress) as bar:
        for batch in loader:
            images, labels = split_batch(batch)
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            logits = (logits[0] + logits[1]) / 2 if isinstance(logits, tuple) else logits
            if not torch.isfinite(logits).all():
                raise FloatingPointError("the model produced NaN or inf logits")
            classes = logits.shape[1]
            top = logits.topk(min(5, classes), dim=1).indices
            hits = top == labels[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            total += labels.numel()
            bar.update(1)
    if total == 0:
        raise ValueError("the evaluation split is empty")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "images": total, "classes": classes}


def standin_weights_fingerprint(arch: str) -> str | None:
    spec = STANDINS.get(arch)
    return None if spec is None else spec.fingerprint()


def weights_identity(cfg: ModelConfig, digest: str | None) -> str | None:
    """What names the starting weights for good, or None when nothing does (a random initialization)."""
    if cfg.checkpoint is not None:
        return f"sha256:{digest}"
    if not cfg.pretrained:
        return None
    return f"standin:{standin_weights_fingerprint(cfg.name)}" if cfg.source == "standin" else f"timm:{cfg.name}"


def row_dense_accuracy(cfg: RunConfig, digest: str | None, output: Path,
                       evaluate_dense: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The starting model's accuracy, evaluated once per output directory: every row of a table that starts from
    the same weights and evaluates on the same data reuses it (``OUTPUT/.dense/KEY.json``), which saves one full
    pass over the validation set per row. Random initializations are never reused."""
    weights = weights_identity(cfg.model, digest)
    if weights is None:
        return evaluate_dense()
    config = cfg.to_dict()
    data = {k: v for k, v in config["data"].items() if k not in ("calib_samples", "augment", "num_workers")}
    payload = {"model": config["model"], "weights": weights, "data": data, "versions": [
        torch.__version__, installed_version("timm")]}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = output / DENSE_DIR / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and isinstance(cached.get("top1"), (int, float)):
            return cached
    except (OSError, ValueError):
        pass  # not there yet, or damaged: evaluate again
    value = evaluate_dense()
    write_json(path, value)
    return value


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


RESULT_FILE = "result.json"


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without what does not change its result (hardware, run switches), with the fields a newer
    version added filled in with their defaults (so that a new option does not orphan every finished result)."""
    try:
        run = RunConfig.from_dict(config)
        config = run.to_dict()
        if run.compression is not None:  # "auto" (None) and the value earlier versions resolved it to compare equal
            config["compression"]["gram_precision"] = resolve_gram_precision(run.compression, "cpu",
                                                                             float32_exact=True)
    except (TypeError, ValueError, KeyError, AttributeError):
        pass  # unreadable: compared as it is (and found different)
    return {k: v for k, v in config.items() if k not in ("hardware", "run")}


def read_result(out_dir: Path) -> dict[str, Any] | None:
    """A finished row's result, or None when there is none (or it is unreadable)."""
    path = out_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(exp: Experiment, cfg: RunConfig, output: Path) -> dict[str, Any] | None:
    """The result of ``exp`` in ``output`` if it finished with this very config.

    Raises:
        SetupError: a result is there but from another config (it is never overwritten silently).
    """
    result = read_result(output / exp.name)
    if result is None:
        return None
    if cfg.model.source == "standin" and cfg.model.pretrained and \
            result.get("standin_fingerprint") != standin_weights_fingerprint(cfg.model.name):
        return None  # computed from an older stand-in recipe: stale, run again
    if cfg.model.checkpoint is not None and Path(cfg.model.checkpoint).expanduser().is_file() and \
            result.get("checkpoint_sha256") != checkpoint_digest(cfg.model.checkpoint):
        return None  # computed from other weights under the same path: stale, run again
    if comparable(result.get("config", {})) != comparable(cfg.to_dict()):
        raise SetupError(f"{output / exp.name / RESULT_FILE} holds a run of {exp.name} with another config; "
                         f"pass --force to replace it or choose another --output")
    return result


BASELINE_GUARD_FRACTION = 0.5
"""A full-scale row stops before compressing when its dense top-1 is under this fraction of the paper's baseline."""


class BaselineGuardError(SetupError):
    """The dense model scores far below the paper's baseline: the data or the weights are not what the row needs."""



def paper_baseline(cfg: RunConfig, table: str | None = None) -> tuple[str, float] | None:
    """The paper's dense top-1 for ``cfg``'s starting weights: the registry's baseline row (unquantized, no
    compression) whose full-scale model is the same timm model, preferring ``table``'s own. Returns the row's name
    and its top-1, or None when the paper reports no baseline for that model (ViT-L) or the weights are random. A
    ``model.checkpoint`` of that model is held to the same baseline: the guard is there to catch wrong weights."""
    if cfg.model.source != "timm" or (cfg.model.checkpoint is None and not cfg.model.pretrained):
        return None
    candidates = [e for e in list_experiments() if e.method == "baseline" and e.paper.top1 is not None
                  and e.full.quantization is None and e.full.model.name == cfg.model.name]
    candidates.sort(key=lambda e: e.table != table)  # stable: the row's own table first, then registration order
    return (candidates[0].name, float(candidates[0].paper.top1)) if candidates else None



def check_dense_baseline(exp: Experiment, cfg: RunConfig, dense_top1: float) -> str | None:
    """Stop a full-scale row whose dense model scores under half the paper's baseline, before hours of calibration
    and fine-tuning: a wrong class order, preprocessing or weights gives a near-zero top-1 without any error. Returns
    a note for the user where the guard cannot apply (the paper gives no baseline for the model), else None.

    Raises:
        BaselineGuardError: names the likely causes and the override (``--set run.skip_baseline_guard=true``).
    """
    reference = paper_baseline(cfg, exp.table)
    if reference is None:
        return f"{exp.name}: the paper reports no dense top-1 for {cfg.model.name}; the baseline guard is off"
    row, top1 = reference
    if dense_top1 >= BASELINE_GUARD_FRACTION * top1:
        return None
    data = cfg.data.path or cfg.data.name
    raise BaselineGuardError(
        f"{exp.name}: the dense {cfg.model.name} scores {dense_top1:.2f}% top-1 on {data!r}, under half the paper's "
        f"{top1:.2f}% ({row}); likely causes: the data's class order differs from the pretrained head's (ImageNet's "
        f"synset order n01440764...n15075141, labels 0..999), wrong preprocessing (mean/std, crop_pct, "
        f"interpolation, input size), or wrong weights (model.checkpoint, model.name); stopped before compressing. "
        f"If this is intended, pass --set run.skip_baseline_guard=true")
