"""The code each DVC stage runs, derived from its imports, so that dvc.yaml's deps stay true.

`python -m pipeline.deps check` lists, per stage, the files of `pipeline/` that the stage's module imports
(directly or through other pipeline modules) but that its `deps` in dvc.yaml do not cover; exit 1 if any.
`python -m pipeline.deps write` rewrites those code deps in dvc.yaml (data deps are kept as they are).
Imports inside functions count too: a stage runs them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a `pipeline.*` module (a package's __init__.py), or None outside the package."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    path = root / Path(*module.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    return None


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """The pipeline modules one file imports (`from pipeline.x import y` may name a module y too)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if module_file(m, root) is not None}


def closure(module: str, root: Path = ROOT) -> set[Path]:
    """Every pipeline file a module runs: itself, what it imports, and each package __init__ on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:i]), root)
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imports_of(path, root))
    return {p.relative_to(root) for p in seen}


def stage_module(cmd: str) -> str | None:
    words = cmd.split()
    return words[words.index("-m") + 1] if "-m" in words else None


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def missing(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> dict[str, list[str]]:
    """Per stage, the files its module runs that its deps do not cover."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        module = stage_module(stage["cmd"])
        if module is None:
            continue
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        lacking = sorted(str(p) for p in closure(module, root) if not covered(p, deps))
        if lacking:
            out[name] = lacking
    return out


def write(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> None:
    """Rewrite each stage's code deps (pipeline/...) from its import closure, keeping the other deps."""
    from ruamel.yaml import YAML

    from pipeline.atomic import atomic_path

    ryaml = YAML()
    ryaml.preserve_quotes = True
    ryaml.width = 120
    ryaml.indent(mapping=2, sequence=4, offset=2)
    doc = ryaml.load(dvc_yaml.read_text())
    for stage in doc["stages"].values():
        module = stage_module(stage["cmd"])
        if module is None:
            continue
        code = sorted(str(p) for p in closure(module, root))
        others = [d for d in stage.get("deps", []) if not str(d).startswith(PACKAGE + "/")]
        stage["deps"] = code + others
    with atomic_path(dvc_yaml) as tmp, open(tmp, "w") as fh:
        ryaml.dump(doc, fh)


def main(argv: list[str] | None = None) -> int:
    command = (argv if argv is not None else sys.argv[1:] or ["check"])[0]
    if command == "write":
        write()
        print("dvc.yaml: code deps rewritten from the stages' imports")
        return 0
    lacking = missing()
    for stage, files in lacking.items():
        print(f"dvc.yaml: stage {stage} runs {', '.join(files)} but does not list it in deps")
    if not lacking:
        print("dvc.yaml: every stage lists the code it runs")
    return 1 if lacking else 0


if __name__ == "__main__":
    sys.exit(main())
