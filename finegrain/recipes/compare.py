"""Comparing recipes: whether a resumed run keeps the recipe it started with, and what two
recipes differ in (`finegrain recipes diff`)."""
from __future__ import annotations

from typing import Any

from finegrain.errors import FinegrainError
from finegrain.recipes.loading import recipe_to_dict
from finegrain.recipes.schema import Recipe

# Keys that describe a recipe without changing what it trains: a resumed run may see them change
# (a shipped recipe's comment or paper row edited since), and a diff of two rows leaves them out.
DOCUMENTATION = ("name", "description", "paper_rows")


def same_recipe_or_error(saved: Recipe, given: Recipe, free: tuple[str, ...] = ("train.workers",)) -> None:
    """A resumed run must use the recipe it started with (only `free` and documentation keys may change)."""
    flat_saved, flat_given = flatten(recipe_to_dict(saved)), flatten(recipe_to_dict(given))
    for key in flat_saved:
        if key not in free and key not in DOCUMENTATION and flat_saved[key] != flat_given.get(key):
            raise FinegrainError(f"The run was started with {key}={flat_saved[key]!r}, now {flat_given.get(key)!r}. "
                                 "Resume with the same recipe and settings, or start a new run with another --out.")


def recipe_differences(first: Recipe, second: Recipe) -> list[tuple[str, Any, Any]]:
    """(dotted key, first value, second value) for every training key that differs, in the
    schema's order; a key only one recipe's schema has shows None on the other side."""
    flat_first, flat_second = flatten(recipe_to_dict(first)), flatten(recipe_to_dict(second))
    keys = [*flat_first, *(key for key in flat_second if key not in flat_first)]
    return [(key, flat_first.get(key), flat_second.get(key)) for key in keys
            if key not in DOCUMENTATION and flat_first.get(key) != flat_second.get(key)]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys down to the values; free-form mappings (overrides, options) stay whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "overrides" and key != "options":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
