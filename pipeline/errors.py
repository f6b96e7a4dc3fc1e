"""One exception type for user errors, and the stage entry point that prints it as one line."""

from __future__ import annotations

import functools
import signal
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

# Library deprecation chatter that users cannot act on.
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# A resumable training's checkpoint folder holds its MLflow run id besides the checkpoints: expected, not odd.
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., object])


class PipelineError(Exception):
    """A problem the user can fix (bad params, bad data, missing weights). Printed as one line, exit 2."""


class Interrupted(KeyboardInterrupt):
    """The stage was stopped by a signal (Ctrl-C or SIGTERM); exit code 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def _on_signal(signum: int, _frame) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def interrupted() -> Interrupted | None:
    """The signal that stopped this process, if one did (Lightning turns it into SystemExit on the way)."""
    return Interrupted(_received[-1]) if _received else None


def stage_main(func: F) -> F:
    """Run a stage's main(): user errors become one line on stderr and exit code 2, never a traceback;
    SIGINT and SIGTERM unwind cleanly (MLflow runs end, atomic writes roll back) and exit 130 / 143."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _on_signal)
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as exc:
            stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            print(f"interrupted by {signal.Signals(stopped.signum).name}; previous outputs are kept",
                  file=sys.stderr)
            sys.exit(128 + stopped.signum)

    return wrapper  # type: ignore[return-value]
