"""Atomic writes: a killed stage never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from other users
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` as a whole when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        with publishing():
            # A folder cannot replace a full one in one rename: the old one moves aside first, under a name of
            # its own (two publishers at once must not share one).
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_held = 0  # publishing() is re-entrant within a process (flock is per open file, not per process)


@contextlib.contextmanager
def publishing(lock: str | Path = ".cache/publish.lock") -> Iterator[None]:
    """One lock (a file under .cache/ of the working directory, the repository for a stage) around the renames
    that publish outputs: two stages publishing the same outputs at once (two `python -m pipeline.stages.X`, two
    DVC queue workers) publish one after the other, each set whole; the last one's stays."""
    global _held
    if _held:
        yield
        return
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _held += 1
        try:
            yield
        finally:
            _held -= 1
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_set() -> Iterator[Any]:
    """Stage several outputs, `stage(path)` for a file or `stage(path, folder=True)`, each a temporary path to
    write to: they all replace their targets when the block succeeds (one burst of renames), none when it fails,
    so a stage publishes its outputs as a set."""
    with contextlib.ExitStack() as stack:
        def stage(path: str | Path, folder: bool = False) -> Path:
            return stack.enter_context(atomic_dir(path) if folder else atomic_path(path))

        stack.enter_context(publishing())  # entered first, left last: held while the set's renames run
        yield stage


def _finite(value: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers (and DVC cannot read a bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], fieldnames: Sequence[str] | None = None) -> None:
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)
