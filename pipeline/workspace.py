"""Where the user's repository is: the working directory, also inside a DVC experiment's temporary copy.

`dvc exp run --queue` and `--temp` run the stages in a temporary copy of the repository
(<repo>/.dvc/tmp/exps/...) that DVC deletes afterwards, and that holds only what git and DVC track. The MLflow
store and the raw data a user downloaded or placed belong to the repository that started the experiment.
"""

from __future__ import annotations

from pathlib import Path


def repo_root(cwd: Path | None = None) -> Path:
    """The repository whose store and raw data a stage uses: the working directory, or, inside the temporary
    workspace of a queued or --temp DVC experiment, the repository that started it."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def resolve(path: str | Path) -> Path:
    """A params path (`data/raw`) as an absolute path under the repository root; absolute paths stay as they are.

    Absolute, so that a subprocess with another working directory (npm) does not resolve it a second time."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path
