"""The environment is the one the figures were measured in: every installed package at constraints.txt's version.

A package that moves moves figures (opencv-python-headless 5.0 -> 5.1 changed the transfer sweeps' augmented
copies, and their ImageNet arms by up to 0.011), so an install that skipped the constraints fails here, by name.
"""

from __future__ import annotations

import re
import shlex
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = {"cnn-pipeline", "pip"}  # the project itself and the venv's own pip are not pinned


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[canonical(name)] = version
    return pins


def installed() -> dict[str, str]:
    """What pip installed into this environment: the distributions in its site-packages.

    Not everything importlib sees: setuptools (>= 71) appends its `_vendor` folder to sys.path when imported, and
    the copies vendored there (jaraco.*, tomli, ...) are setuptools' own, not the environment's.
    """
    site = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()
            if Path(d.locate_file("")).resolve() in site and canonical(d.metadata["Name"]) not in OWN}


def test_vendored_copies_are_not_counted_as_installed():
    """Importing setuptools puts its vendored packages on sys.path; they are not the environment's."""
    import setuptools  # noqa: F401  (the import is the point)

    vendored = Path(setuptools.__file__).parent / "_vendor"
    seen = [Path(d.locate_file("")).resolve() for d in metadata.distributions()]
    if vendored.is_dir() and str(vendored) in sys.path:
        assert vendored.resolve() in seen  # the case the filter is for really happens here
    assert "setuptools" in installed(), "setuptools itself is installed and pinned"
    assert not set(installed()) - set(pinned())


def test_every_installed_package_is_at_its_pinned_version():
    pins, have = pinned(), installed()
    unpinned = sorted(set(have) - set(pins))
    moved = sorted(f"{n} {have[n]} (pinned {pins[n]})" for n in have if n in pins and have[n] != pins[n])
    assert not unpinned, f"installed but not in constraints.txt: {', '.join(unpinned)}"
    assert not moved, f"installed at another version than constraints.txt: {', '.join(moved)}"


def test_the_pins_cover_what_pyproject_declares():
    """Every dependency pyproject.toml names (extras included) has a pin, at a version its specifier allows."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = pinned()
    for text in declared:
        req = Requirement(text)
        name = canonical(req.name)
        assert name in pins, f"pyproject.toml declares {text!r}; constraints.txt has no pin for it"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {text!r}"


def test_both_readme_commands_and_ci_install_with_the_constraints():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and len(ci) == 1, (commands, ci)
    for command in commands + ci:
        install = next(part for part in command.split("&&") if "pip install" in part)
        words = shlex.split(install)
        assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", command


def test_ci_fails_when_its_install_fails(tmp_path):
    """.ci/run's status is its command's: a failing install (here a broken pyproject.toml) is a failing CI, not
    a green one that ran no test (under `set -e` a failure inside an && list does not stop a script)."""
    import os
    import shutil
    import subprocess

    if not all(shutil.which(tool) for tool in ("chromium", "chromedriver", "npm")):
        import pytest

        pytest.skip("the system packages .ci/run would install first are missing here")
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci/run", tmp_path / ".ci/run")
    shutil.copy(ROOT / "constraints.txt", tmp_path / "constraints.txt")
    (tmp_path / "pyproject.toml").write_text("[project\nname = 'broken'\n")
    out = subprocess.run(["bash", str(tmp_path / ".ci/run")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")})
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "ci: done in" in out.stdout and "(status 0)" not in out.stdout
