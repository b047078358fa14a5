"""A registry row's finished result, ``OUTPUT/NAME/result.json``: reading it (:func:`read_result`) and telling
whether it was computed with the very config about to run (:func:`finished`: a stale one is run again, one of
another config is never overwritten silently), comparing configs without what does not change the result
(:func:`comparable`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowrank_vit.config import resolve_gram_precision
from lowrank_vit.harness.models import SetupError, checkpoint_digest
from lowrank_vit.harness.registry import Experiment, RunConfig
from lowrank_vit.harness.rowevaluation import standin_weights_fingerprint

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
