"""A plain mapping (parsed YAML plus --set overrides) checked against a recipe dataclass.

Checked before any field is used: the size of the tree (YAML aliases can expand a small file
into millions of values), finiteness of every number (a NaN lr trains nothing and saves NaN
weights), the type of every key against its annotation, then the schema's value rules. Every
failure is one FinegrainError naming the key, what it must be and what it was.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from typing import Any, Literal, TypeVar

from finegrain.errors import FinegrainError
from finegrain.recipes.schema import Recipe

R = TypeVar("R", bound=Recipe)
PLAIN = (str, int, float, bool, type(None), list, dict)  # what YAML and JSON share
MAX_VALUES = 10_000  # a recipe holds about a hundred; aliases must not multiply that unseen


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null", Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def _fix(source: str) -> str:
    return f"Fix the value in {source} or in --set."


def _check_tree(raw: Any, source: str) -> None:
    """Bounded size, plain data and finite numbers everywhere, free-form mappings
    (model.overrides, data.options, loss args) included: their values go into JSON (checkpoint
    metadata, `recipes show --json`), which has no dates, sets or bytes. Walked without
    recursion, so any depth is safe."""
    stack: list[tuple[str, Any]] = [("", raw)]
    seen = 0
    while stack:
        key, value = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise FinegrainError(f"The recipe holds more than {MAX_VALUES} values (YAML anchors and aliases "
                                 f"count each time they are used). A recipe needs a few dozen; fix {source}.")
        if not isinstance(value, PLAIN):
            raise FinegrainError(f"Recipe key '{key}' must be plain data (text, a number, true/false, null, a list "
                                 f"or a mapping), got {type(value).__name__} {value!r}. Quote it. {_fix(source)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise FinegrainError(f"Recipe key '{key}' must be a finite number, got {value}. {_fix(source)}")
        if isinstance(value, dict):
            for name in value:
                if not isinstance(name, str):
                    holder = f"Recipe key '{key}'" if key else "The recipe"
                    raise FinegrainError(f"{holder} holds the key {name!r}, which is not text. Quote it. {_fix(source)}")
            stack.extend((f"{key}.{k}" if key else k, v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(value))


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, key, source)
            except FinegrainError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin is dict:
        if isinstance(value, dict):
            item_type = typing.get_args(tp)[1]  # keys: text, checked with the whole tree
            return {k: _convert(item_type, v, f"{key}.{k}", source) for k, v in value.items()}
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, source, key + ".")
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise FinegrainError(f"Recipe key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}. {_fix(source)}")


def _build(cls: type[R], raw: dict[str, Any], source: str, prefix: str = "") -> R:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise FinegrainError(f"Unknown recipe key '{prefix}{unknown[0]}'. Valid keys"
                             f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}.")
    values = {k: _convert(hints[k], v, prefix + k, source) for k, v in raw.items()}
    return cls(**values)


def _value_at(recipe: Recipe, key: str) -> Any:
    """The value a rule names ("model.overrides.base_width" reads into the mapping)."""
    head, _, last = key.rpartition(".")
    section = operator.attrgetter(head)(recipe) if head else recipe
    return section.get(last) if isinstance(section, dict) else getattr(section, last)


def recipe_from_dict(raw: dict[str, Any], schema: type[R] = Recipe,  # type: ignore[assignment]
                     source: str = "the recipe") -> R:
    """Validate a plain mapping into a recipe; missing keys take the schema's defaults. `source`
    (the file) is named in the messages."""
    if not isinstance(raw, dict):
        raise FinegrainError(f"A recipe must be a YAML mapping, got {type(raw).__name__}. "
                             "Write it as `key: value` lines.")
    _check_tree(raw, source)
    recipe = _build(schema, raw, source)
    for broken, key, wanted in recipe.rules():
        if broken:
            raise FinegrainError(f"Recipe key '{key}' must be {wanted}, got {_value_at(recipe, key)!r}. {_fix(source)}")
    return recipe
