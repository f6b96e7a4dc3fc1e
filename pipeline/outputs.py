"""The outputs dvc.yaml declares for a stage, and the check that the stage can write them before any work."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from pipeline.errors import PipelineError


def declared(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """The outs and metrics dvc.yaml declares for `stage` (none when there is no dvc.yaml here)."""
    if not dvc_yaml.exists():
        return []
    found = yaml.safe_load(dvc_yaml.read_text())["stages"].get(stage, {})
    items = [*found.get("outs", []), *found.get("metrics", [])]
    return [Path(item if isinstance(item, str) else next(iter(item))) for item in items]


def check_writable(stage: str) -> None:
    """Every folder the stage writes to takes a file, checked before any work (one line when it does not)."""
    for out in declared(stage):
        folder = out.parent if out.suffix else out
        created = next((p for p in [*reversed(folder.parents), folder] if not p.exists()), None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".writable-", dir=folder)
            os.close(fd)
            os.unlink(probe)
            if created is not None:  # leave no empty folders behind: the stage makes its own
                shutil.rmtree(created)
        except OSError as exc:
            raise PipelineError(f"{stage}: cannot write its output {out} ({type(exc).__name__}: "
                                f"{exc.strerror or exc}); make {folder}/ writable") from None
