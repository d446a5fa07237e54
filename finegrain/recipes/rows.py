"""The paper's tables as recipes: every shipped recipe names the rows it trains (`paper_rows`,
"TABLE:ROW"), so `finegrain recipes --table 7` lists Table 7 in order and a row id ("E3") names
its recipe wherever a recipe name is asked for by `recipes diff`."""
from __future__ import annotations

import functools
import re

from finegrain.errors import FinegrainError
from finegrain.recipes.loading import RECIPES_DIR, find_recipe, list_recipes, read_recipe_yaml

TABLES = {
    2: "channel attention on ResNet-50 (piecewise lr decay in the paper)",
    3: "anti-aliased downsampling on ResNet-50 (piecewise lr decay in the paper)",
    4: "Mixup types on R50D (rows in the paper's order: 1 LS, 2 type 2, 3 type 1)",
    5: "KD temperature on R50D+SK (rows in the paper's order: 1 no KD, 2 T=2, 3 T=1.5, 4 T=1)",
    6: "stacking network tweaks on ResNet-50",
    7: "assembling tweaks and regularization on ResNet-50 (ImageNet)",
    9: "assembling tweaks and regularization on MobileNet-V1 (ImageNet)",
    10: "transfer to Food-101: backbone and fine-tuning regularization",
}


def _natural(row: str) -> tuple:
    """E2 before E10: letters compare as text, digits as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", row))


@functools.lru_cache(maxsize=1)
def paper_rows() -> dict[int, list[tuple[str, str, str]]]:
    """table -> [(row, recipe name, description)] in the paper's order, read once from the shipped
    YAML (package data, fixed while the process runs)."""
    tables: dict[int, list[tuple[str, str, str]]] = {}
    for name in list_recipes():
        raw = read_recipe_yaml(RECIPES_DIR / f"{name}.yaml")
        for entry in raw.get("paper_rows") or []:
            table, _, row = str(entry).partition(":")
            tables.setdefault(int(table), []).append((row, name, str(raw.get("description", ""))))
    return {table: sorted(rows, key=lambda r: _natural(r[0])) for table, rows in sorted(tables.items())}


def table_rows(table: int) -> list[tuple[str, str, str]]:
    """The rows of one table; a table without recipes is an error naming those that have some."""
    tables = paper_rows()
    if table not in tables:
        known = ", ".join(str(number) for number in tables)
        raise FinegrainError(f"No recipe trains a row of Table {table}. Tables with recipes: {known}.")
    return tables[table]


def resolve_recipe_or_row(name: str, group: str | None = None) -> str:
    """A recipe name or path as given (looked up in `group` first, as `find_recipe`), or the recipe
    of a paper row ("E3", "7:E3", "10:F13")."""
    try:
        find_recipe(name, group)
        return name
    except FinegrainError as not_a_recipe:
        table, _, row = name.rpartition(":")
        matches = {(number, entry[0], entry[1]) for number, rows in paper_rows().items() for entry in rows
                   if entry[0].lower() == row.lower() and (not table or str(number) == table)}
        if len({recipe for _, _, recipe in matches}) == 1:
            return next(iter(matches))[2]
        if matches:
            options = ", ".join(sorted(f"{number}:{r} ({recipe})" for number, r, recipe in matches))
            raise FinegrainError(f"Row '{name}' is in several tables: {options}. Write TABLE:ROW.") from None
        raise not_a_recipe from None
