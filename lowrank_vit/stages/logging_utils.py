"""Weights & Biases logging for every stage: one factory, never a crash for lack of network or credentials.

``make_logger("online" | "offline" | "disabled", ...)`` returns Lightning's ``WandbLogger`` (or None when disabled).
Runs carry the experiment as their wandb *group* and the method as *tags*, so a dashboard grouped by experiment
compares methods side by side; the full configuration is stored in the run's config (the runner adds method, arch
and ratio at its top level, which a dashboard can group by). "online" quietly becomes
"offline", with a warning, when there is no API key (``WANDB_API_KEY`` or a netrc entry for the wandb host) or the
wandb host cannot be reached; an offline run is a directory under ``save_dir/wandb`` that ``wandb sync`` uploads
later. ``WANDB_MODE=offline`` / ``disabled`` in the environment take precedence over the requested mode. Only rank
zero writes: Lightning's WandbLogger creates its run on global rank zero only, and the helpers here are rank-zero-only.
``wandb`` is imported only when a logger is actually made.
"""

from __future__ import annotations

import functools
import logging
import netrc
import os
import socket
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def _rank_zero_only(fn):
    """Lightning's ``rank_zero_only``, imported when the function is first called, so that importing this module
    (the CLI does, for every command) does not import Lightning."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lightning.pytorch.utilities import rank_zero_only

        return rank_zero_only(fn)(*args, **kwargs)

    return wrapper

MODES = ("online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"
RANK_COLUMNS = ["layer", "in_features", "out_features", "rank", "z_params", "dense_params", "factored_params",
                "energy_loss", "output_error_lowrank", "output_error"]


THIRD_PARTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
"""Loggers whose INFO lines (the accelerator banner, "💡 Tip" adverts, the model summary, "`Trainer.fit`
stopped") are set to WARNING: a row's own progress lines say what stage it is in."""
HARMLESS_WARNINGS = (
    # resuming an interrupted fine-tune: a fresh run has no "last" checkpoint yet, which is the normal case
    r'.*ckpt_path="last"\) is set, but there is no last checkpoint',
    # the small datasets here load in the main process on purpose (num_workers=0 is the default)
    r".*does not have many workers which may be a bottleneck",
    # a deprecation inside Lightning's own code, not ours
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
)
"""Messages of warnings known to be harmless here, silenced (regular expressions matched from the start)."""


def silence_third_party(lightning: bool = True) -> None:
    """No third-party banners, tips or known-harmless warnings on the terminal: Lightning's INFO chatter goes to
    WARNING, the warnings of :data:`HARMLESS_WARNINGS` are ignored and wandb runs silently (``WANDB_SILENT``,
    unless the environment sets it). Real warnings and errors still show. Idempotent; called by the CLI and by
    :func:`lowrank_vit.repro.runner.run_row`. ``lightning=False``: leave Lightning unimported (commands that never
    run it; whoever imports it later calls this again)."""
    if lightning:
        import lightning.pytorch  # noqa: F401  its import sets its logger to INFO: lower it afterwards

    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("WANDB_SILENT", "true")


def _wandb_host() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)


def has_wandb_api_key() -> bool:
    """Whether credentials for the wandb host are configured: ``WANDB_API_KEY`` or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(_wandb_host()).hostname or ""
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the wandb host opens within ``timeout`` seconds (name lookup included)."""
    url = urlparse(_wandb_host())
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname or "", port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup must not block the caller
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def resolve_mode(mode: str) -> str:
    """The mode a run will really use: the environment's ``WANDB_MODE`` first, then "online" only with credentials
    and a reachable host (otherwise "offline", with a warning)."""
    if mode not in MODES:
        raise ValueError(f"wandb mode must be one of {MODES}, got {mode!r}")
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    if mode == "disabled":
        return mode
    if env in ("offline", "dryrun"):
        return "offline"
    if mode == "online":
        if not has_wandb_api_key():
            warnings.warn("wandb: no API key (WANDB_API_KEY or netrc); logging offline instead. Upload later with "
                          "`wandb sync`.", RuntimeWarning, stacklevel=3)
            return "offline"
        if not wandb_reachable():
            warnings.warn(f"wandb: {_wandb_host()} is not reachable; logging offline instead. Upload later with "
                          "`wandb sync`.", RuntimeWarning, stacklevel=3)
            return "offline"
    return mode


def make_logger(mode: str = "offline", project: str = "lowrank_vit", group: str | None = None,
                tags: Sequence[str] = (), config: Mapping[str, Any] | None = None, save_dir: str | os.PathLike = ".",
                *, name: str | None = None, job_type: str | None = None, **kwargs: Any) -> Any:
    """A ``lightning.pytorch.loggers.WandbLogger`` for one run of one stage, or None when disabled.

    Args:
        mode: "online", "offline" or "disabled" (see :func:`resolve_mode`).
        project: wandb project.
        group: the experiment (runs of one experiment group together on the dashboard).
        tags: e.g. the method ("ours", "vanilla-svd"), model, reduction, so methods compare side by side.
        config: the full configuration of the run (nested dicts are fine), stored as the run's config.
        save_dir: where the wandb directory (offline runs included) is written; created if needed.
        name: run name.
        job_type: the stage ("compress", "compensate", "finetune", ...).
        kwargs: passed to ``WandbLogger`` / ``wandb.init``.
    """
    resolved = resolve_mode(mode)
    if resolved == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=project, group=group, tags=list(tags), name=name, job_type=job_type,
                         save_dir=str(save_dir), offline=resolved == "offline", config=dict(config or {}),
                         **kwargs)
    # Lightning always passes anonymous=None to wandb.init, which makes wandb warn that the setting "has no
    # effect" on every run (before WANDB_SILENT applies); the run is created lazily, so the key can still go
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger


def report_rows(report: Any) -> list[list[Any]]:
    """Per-layer rows (:data:`RANK_COLUMNS`) of a ``CompressionReport`` or its ``to_dict()``."""
    layers = report.get("layers", []) if isinstance(report, Mapping) else getattr(report, "layers", [])
    rows = []
    for layer in layers:
        get = layer.get if isinstance(layer, Mapping) else (lambda key, _layer=layer: getattr(_layer, key, None))
        rows.append([get("name") if column == "layer" else get(column) for column in RANK_COLUMNS])
    return rows


@_rank_zero_only
def log_ranks_table(logger: Any, report: Any, key: str = "compression/ranks") -> None:
    """Log the per-layer ranks (and parameters, energy loss, output errors) of a compression report as a wandb
    table, with the report's totals as summary metrics. Does nothing for ``logger=None`` or a non-wandb logger."""
    if logger is None or not hasattr(logger, "log_table"):
        return
    logger.log_table(key=key, columns=list(RANK_COLUMNS), data=report_rows(report))
    data = report if isinstance(report, Mapping) else report.to_dict() if hasattr(report, "to_dict") else {}
    totals = {f"compression/{k}": data[k] for k in ("params_before", "params_after", "target_params", "reduction")
              if isinstance(data.get(k), (int, float))}
    if totals:
        logger.log_metrics(totals)


@_rank_zero_only
def finish(logger: Any) -> None:
    """Close the logger's wandb run (flushes an offline run to disk); safe on None and on other loggers."""
    if logger is None:
        return
    experiment = getattr(logger, "_experiment", None)
    if experiment is not None and hasattr(experiment, "finish"):
        experiment.finish()
