"""Progress bars that can be switched off (tests, non-interactive logs) without changing the calling code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
