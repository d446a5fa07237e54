"""What the training commands (fgvc, retrieval, backbone train) share: picking the recipe of a new
or resumed run, its run directory, and the two consoles (logs on stderr, figures on stdout)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

from rich.console import Console

from finegrain.errors import FinegrainError
from finegrain.recipes import same_recipe_or_error

console = Console(stderr=True)  # progress and log lines
results = Console()  # the figures, on stdout
R = TypeVar("R")


def quoted(value: Path | str) -> str:
    """A --set value that YAML reads back as this exact string (paths with ':' or spaces)."""
    return json.dumps(str(value))


def echo(message: str) -> None:
    console.print(message, highlight=False, markup=False)


def choose_recipe(recipe: str | None, out: Path | None, resume: bool, overrides: list[str],
                  load: Callable[[str, list[str]], R]) -> tuple[R, Path]:
    """(recipe, run directory) of a new run, or of a resumed one, which must keep its own recipe.

    `load(name_or_path, overrides)` reads a recipe of the command's group and schema.
    """
    saved = out / "recipe.yaml" if resume and out is not None else None
    if resume and saved is None:
        raise FinegrainError("--resume needs --out pointing at the run directory. Pass --out RUN.")
    if saved is not None and not saved.is_file():
        raise FinegrainError(f"{out} holds no recipe.yaml, so it is not a run directory. Pass the --out of the "
                             "run to continue.")
    if recipe is None and saved is None:
        raise FinegrainError("No recipe given. Pass --recipe NAME (e.g. demo; list them with `finegrain recipes`), "
                             "or --resume --out RUN to continue a run.")
    chosen = load(str(saved) if recipe is None else recipe, overrides)
    if saved is not None:
        same_recipe_or_error(load(str(saved), []), chosen)
    return chosen, out or Path(chosen.output.dir or Path("runs") / chosen.name)
