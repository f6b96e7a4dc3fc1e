"""One exception type for user errors, and the stage entry point that prints it as one line."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

# Library deprecation chatter that users cannot act on.
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., object])


class PipelineError(Exception):
    """A problem the user can fix (bad params, bad data, missing weights). Printed as one line, exit 2."""


def stage_main(func: F) -> F:
    """Run a stage's main(): user errors become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
