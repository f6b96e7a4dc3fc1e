"""Network access that never hangs: this project must work, and fail clearly, on machines without internet."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

TIMEOUT_S = 15


@contextlib.contextmanager
def network_timeout(seconds: float = TIMEOUT_S) -> Iterator[None]:
    """Every socket opened inside (torchvision's downloads) gives up after `seconds` instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
