"""Progress bars that can be switched off (tests, non-interactive logs) without changing the calling code.

Every bar goes to stderr: stdout carries what users pipe (tables, JSON). Lightning's own bar writes to stdout, so the
trainers get :func:`lightning_progress_callbacks` instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

from tqdm.auto import tqdm


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def lightning_progress_callbacks(enabled: bool) -> list[Any]:
    """``[bar]``: Lightning's tqdm bar drawn on stderr (empty when disabled; pass ``enable_progress_bar=enabled``)."""
    if not enabled:
        return []
    from lightning.pytorch.callbacks import TQDMProgressBar

    # Lightning builds each bar with file=sys.stdout, read when the bar is made: point it at stderr then.
    def on_stderr(name: str) -> Any:
        def init_tqdm(self: TQDMProgressBar) -> Any:
            with redirect_stdout(sys.stderr):
                return getattr(TQDMProgressBar, name)(self)

        return init_tqdm

    names = ("init_sanity_tqdm", "init_train_tqdm", "init_validation_tqdm", "init_test_tqdm", "init_predict_tqdm")
    StderrProgressBar = type("StderrProgressBar", (TQDMProgressBar,), {name: on_stderr(name) for name in names})
    return [StderrProgressBar()]
