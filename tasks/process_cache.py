"""The caches a process keeps between stages, in one place.

Each is made where it is used, with a comment saying what it holds and why; every one is dropped by `drop_all()`,
which the pipeline calls when a run (single or grid) ends: the one reset point, so a long-lived process (`watch`,
a test session, a notebook) never carries a cached answer from one run into the next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_CLEARS: list[Callable[[], Any]] = []


class ProcessCache(dict[K, V]):
    """A dict that `drop_all()` empties."""

    def __init__(self) -> None:
        super().__init__()
        _CLEARS.append(self.clear)


def on_drop(clear: Callable[[], Any]) -> None:
    """Have `drop_all()` also call `clear` (for a cache that is not a dict, such as the live model)."""
    _CLEARS.append(clear)


def drop_all() -> None:
    for clear in _CLEARS:
        clear()
