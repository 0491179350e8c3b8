"""Errors a user can fix, and the one rule every command follows for them: one line, exit code 2, no traceback."""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(Exception):
    """Input that cannot be used (a setting, a file, a folder); the message names it and says what is allowed."""


def is_first_process() -> bool:
    """Rank 0 under torchrun (read from RANK, so also before a process group exists), or a lone process: the one
    that says a line every rank meets."""
    return os.environ.get("RANK", "0") == "0"


def report_usage_errors(main: F) -> F:
    """Wrap a command's `main`: a UsageError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            if is_first_process():
                print(f"error: {error}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None

    return wrapped  # type: ignore[return-value]
