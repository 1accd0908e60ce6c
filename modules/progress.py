"""Progress bars for the long phases of an evaluation (the k samples, the forest, the adherence CNN, denoising).

The loops call `bar(...)` with the phase's name; a bar is drawn only while an evaluation runs with bars on
(`progress_bars`, set by `shows_progress` from the evaluation's `quiet` flag) and stderr is a terminal, so
library calls, logs, pipes and tests stay free of them. The one-line-per-stage prints stay as they are.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from contextvars import ContextVar
from typing import Iterable, Iterator, Optional

from tqdm import tqdm

_SHOWN: ContextVar[bool] = ContextVar("evaluation_progress_bars", default=False)


@contextlib.contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Within the block, `bar` draws its bars (when stderr is a terminal) or, with `shown=False`, never does."""
    token = _SHOWN.set(bool(shown))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def bars_shown() -> bool:
    """Whether the code running now is inside `progress_bars(True)`."""
    return _SHOWN.get()


def bar(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, unit: str = "it",
        shown: Optional[bool] = None) -> tqdm:
    """A tqdm bar on stderr named `desc` that disappears when done. `shown=None` follows `progress_bars` (and
    then only on a terminal); True draws it wherever stderr goes; False never draws it."""
    if shown is None:
        disable = None if bars_shown() else True  # tqdm: None = off when stderr is not a terminal
    else:
        disable = not shown
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=disable)


def shows_progress(evaluate):
    """Decorate an evaluation entry point taking `quiet`: its phases draw bars unless `quiet`."""

    @functools.wraps(evaluate)
    def wrapped(*args, quiet: bool = False, **kwargs):
        with progress_bars(not quiet):
            return evaluate(*args, quiet=quiet, **kwargs)

    return wrapped
