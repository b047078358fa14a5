"""What every user command shares: the one-line error (:class:`UserError`), ``--quiet``, the notes on stderr
and the device."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import torch


class UserError(ValueError):
    """Bad input to one of these commands: the CLI prints it on one line and exits with status 2."""


def last_line(err: BaseException) -> str:
    """The message of an error re-raised from a DataLoader worker is the worker's whole traceback: its last line is
    the error itself."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


_QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "datasets")


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """``--quiet``: nothing but the results. Warnings, Lightning's notices and the datasets library's messages and
    progress bars are silenced for the command, and restored after it."""
    if not enabled:
        yield
        return

    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    bars = os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS")
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # for worker processes started during the command
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()  # the variable alone is read when datasets is imported, which may have happened already
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if not bars_were_off:
            enable_progress_bars()
        if bars is None:
            os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = bars


def user_command(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """What every command here shares: ``--quiet`` (:func:`_quiet`), and a file in ``--data`` that is not an image,
    or a folder no dataset builder reads, reported as the user's data at fault, on one line naming it, instead of a
    traceback from a loader worker."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from PIL import UnidentifiedImageError

        try:
            with _quiet(getattr(args, "quiet", False)):
                return command(args)
        except UnidentifiedImageError as err:
            raise UserError(f"--data {getattr(args, 'data', None)!r}: {last_line(err)}") from None
        except Exception as err:
            if type(err).__name__ != "DatasetGenerationError":  # datasets' own, raised while building the dataset
                raise
            cause = err.__cause__ or err.__context__
            raise UserError(f"--data {getattr(args, 'data', None)!r} could not be read as a dataset"
                            + (f": {last_line(cause)}" if cause is not None else "")) from None
    return run


def say_to_user(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto``: the first GPU if torch sees one, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", 0)
