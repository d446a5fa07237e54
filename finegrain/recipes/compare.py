"""Whether a resumed run keeps the recipe it started with."""
from __future__ import annotations

from typing import Any

from finegrain.errors import FinegrainError
from finegrain.recipes.loading import recipe_to_dict
from finegrain.recipes.schema import Recipe


def same_recipe_or_error(saved: Recipe, given: Recipe, free: tuple[str, ...] = ("train.workers",)) -> None:
    """A resumed run must use the recipe it started with (only `free` keys may change)."""
    flat_saved, flat_given = _flatten(recipe_to_dict(saved)), _flatten(recipe_to_dict(given))
    for key in flat_saved:
        if key not in free and flat_saved[key] != flat_given.get(key):
            raise FinegrainError(f"The run was started with {key}={flat_saved[key]!r}, now {flat_given.get(key)!r}. "
                                 "Resume with the same recipe and settings, or start a new run with another --out.")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys down to the values; free-form mappings (overrides, options) stay whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "overrides" and key != "options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
