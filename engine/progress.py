"""Progress bars for long-running commands (model load, trace replays, benchmarks).

A bar is drawn on stderr only when stderr is a terminal and the caller shows progress (a
`--json` run does not): logs, pipes and test captures stay free of carriage-return noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)` on stderr, drawn only when `show` and stderr is a terminal."""
    return tqdm(iterable, disable=None if show else True, **kwargs)  # tqdm: disable=None means "not a TTY"
