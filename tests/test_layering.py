"""The one-way rule of docs/architecture.md: every import inside the package points down the layers.

cli -> train | index -> eval -> data, models, recipes, convert -> layers, with the small utility
modules (errors, fileio, runtime, preprocessing, distributed) importable from anywhere. Imports
inside functions count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import finegrain

PACKAGE = Path(finegrain.__file__).resolve().parent
UTILITIES = {"errors", "fileio", "runtime", "preprocessing", "distributed"}
# What each part may import besides itself and the utilities.
ALLOWED: dict[str, set[str]] = {
    "layers": set(),
    "models": {"layers"},
    "data": set(),
    "recipes": set(),
    "convert": {"models", "layers"},
    "eval": {"data", "models", "layers", "recipes"},
    "index": {"eval", "data", "models", "layers"},
    "train": {"eval", "data", "models", "layers", "recipes"},
    "export": {"eval", "data", "models", "layers"},
    "serve": {"index", "eval", "data", "models", "layers"},
    "cli": {"train", "index", "serve", "export", "eval", "data", "models", "layers", "recipes", "convert"},
    "__main__": {"cli"},
    "__init__": {"models"},
    **{name: set() for name in UTILITIES},
}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path) -> set[tuple[int, str]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "finegrain" and len(pieces) > 1:
                found.add((node.lineno, pieces[1]))
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        allowed = ALLOWED.get(part)
        assert allowed is not None, f"{path} belongs to no layer: add '{part}' to ALLOWED and docs/architecture.md"
        for line, target in sorted(_imported_parts(path)):
            if target != part and target not in allowed and target not in UTILITIES:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({part}) imports finegrain.{target}")
            if part in UTILITIES and target != part and target not in UTILITIES:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} (utility) imports finegrain.{target}")
    return problems


def test_every_import_points_down_the_layers() -> None:
    assert upward_imports() == []


def test_the_rule_sees_an_upward_import(tmp_path: Path) -> None:
    """The walker is not vacuous: a function-level import of train from eval is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from finegrain.train import trainer\n    import finegrain.cli\n")
    assert _imported_parts(sample) == {(2, "train"), (3, "cli")}
