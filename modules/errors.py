"""User-facing errors: one paragraph, no traceback, non-zero exit."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (file, column, key, flag) that the user can fix."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI `main` so that a `UserError` prints one paragraph to stderr and exits with 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            code = main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return int(code or 0)

    return wrapped
