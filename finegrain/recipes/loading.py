"""Finding, reading, overriding and writing recipes.

The YAML files ship inside this package (recipes/<group>/<name>.yaml), so a wheel installed
anywhere finds them. A recipe file is read bounded (size, UTF-8, a mapping at the top) with
one YAML loader that also serves `--set`, so `lr: 1e-4` in a file and `--set optim.lr=1e-4`
read alike.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml

from finegrain.errors import FinegrainError
from finegrain.recipes.backbone import BackboneRecipe
from finegrain.recipes.retrieval import RetrievalRecipe
from finegrain.recipes.schema import Recipe
from finegrain.recipes.validation import recipe_from_dict

R = TypeVar("R", bound=Recipe)
RECIPES_DIR = Path(__file__).resolve().parent  # the YAML files ship inside the package
# The schema of each recipe group (recipes/<group>/*.yaml); groups not listed use `Recipe`.
GROUP_SCHEMAS: dict[str, type[Recipe]] = {"retrieval": RetrievalRecipe, "backbone": BackboneRecipe}
MAX_RECIPE_BYTES = 1 << 20  # the largest shipped recipe is about 3 KB
_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 safe loading that also reads `1e-4` and `1.0e4` as numbers (YAML 1.1 wants a dot
    and a signed exponent, so without this `lr: 1e-4` is the string "1e-4"), and refuses a key
    given twice in one mapping (YAML keeps the last, silently: two `optim:` blocks lose one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key '{key_node.value}' appears twice",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str, what: str, fix: str = "Fix it.") -> Any:
    """`text` parsed with `RecipeLoader`; `what` names its source in the error ("Recipe X")."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        where = f" (line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1})" if exc.problem_mark else ""
        raise FinegrainError(f"{what} is not valid YAML: {exc.problem or exc.context}{where}. {fix}") from None
    except yaml.reader.ReaderError as exc:
        raise FinegrainError(f"{what} is not valid YAML: it holds the character U+{exc.character:04X} (position "
                             f"{exc.position}), which YAML does not allow. {fix}") from None
    except yaml.YAMLError as exc:
        raise FinegrainError(f"{what} is not valid YAML: {exc}. {fix}") from None
    except RecursionError:
        raise FinegrainError(f"{what} nests too deeply to be a recipe. {fix}") from None


# ----------------------------------------------------------------------------------- overrides
def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a raw recipe mapping (values parsed as YAML); returns a copy.

    Validation happens afterwards, so a wrong key or type is reported like one in the file.
    """
    result = copy.deepcopy(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise FinegrainError(f"Cannot parse --set '{assignment}'. Write it as KEY=VALUE with a "
                                 "dotted key, e.g. --set optim.lr=0.02.")
        value = parse_yaml(text, f"The value of --set '{assignment}'",
                           "Quote it, e.g. --set data.root='\"my dir\"'.") if text.strip() else None
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise FinegrainError(f"--set '{key}': '{'.'.join(parts[:depth + 1])}' holds a value, "
                                     "not a section. Set it directly.")
            node = child
        node[parts[-1]] = value
    return result


# ------------------------------------------------------------------------------------- finding
def list_recipes(root: Path = RECIPES_DIR) -> list[str]:
    """Every recipe as its short path name, e.g. "fgvc/food101" (files starting "_" excluded)."""
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not p.name.startswith("_"))


def find_recipe(name: str, group: str | None = None, root: Path = RECIPES_DIR) -> Path:
    """Resolve "food101", "fgvc/food101" or a path to a YAML file.

    A bare name is looked up in `group` first (the command's own group, so `cars196` means the
    FGVC recipe for `finegrain fgvc`), then anywhere; an ambiguous name lists the candidates.
    """
    as_path = Path(name)
    if as_path.suffix in {".yaml", ".yml"}:
        if not as_path.is_file():
            raise FinegrainError(f"Recipe file {as_path} does not exist. Check the path.")
        return as_path
    known = list_recipes(root)
    stem = name.removesuffix(".yaml")
    if stem in known:
        return root / f"{stem}.yaml"
    if group and f"{group}/{stem}" in known:
        return root / group / f"{stem}.yaml"
    matches = [k for k in known if k.rsplit("/", 1)[-1] == stem]
    if len(matches) == 1:
        return root / f"{matches[0]}.yaml"
    if matches:
        raise FinegrainError(f"Recipe name '{name}' is ambiguous: {', '.join(matches)}. Use the full name.")
    raise FinegrainError(f"No recipe named '{name}'. Available: {', '.join(known) or 'none'} "
                         "(or pass a path to a .yaml file).")


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping, read bounded; anything else is one FinegrainError."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise FinegrainError(f"Cannot read recipe {path}: {exc.strerror}. Check the path.") from exc
    if len(data) > MAX_RECIPE_BYTES:
        raise FinegrainError(f"Recipe {path} is larger than {MAX_RECIPE_BYTES // 1024} KB, so it is not a "
                             "recipe (they are a few KB of YAML). Check the path.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FinegrainError(f"Recipe {path} is not UTF-8 text (byte {exc.start} is not). Save it as UTF-8, "
                             "or check the path.") from None
    raw = parse_yaml(text, f"Recipe {path}")
    if raw is None:
        raise FinegrainError(f"Recipe {path} is empty. Write its keys (`finegrain recipes show demo` prints "
                             "a complete one), or `{}` for every default.")
    if not isinstance(raw, dict):
        raise FinegrainError(f"Recipe {path} must be a YAML mapping of sections (`optim:` then `  lr: 0.01` "
                             f"lines); its top level is {_KINDS.get(type(raw), 'something else')}. Fix the file.")
    return raw


def schema_for(group: str | None) -> type[Recipe]:
    """The recipe class that validates recipes of `group` (e.g. RetrievalRecipe for retrieval)."""
    return GROUP_SCHEMAS.get(group or "", Recipe)


def recipe_group(path: Path) -> str | None:
    """The group of a recipe file under recipes/ ("fgvc", ...), None for a file elsewhere."""
    resolved = path.resolve()
    return resolved.relative_to(RECIPES_DIR).parts[0] if resolved.is_relative_to(RECIPES_DIR) else None


def load_recipe(name: str, overrides: list[str] | None = None, group: str | None = None,
                schema: type[R] | None = None) -> R:
    """Find, read, override and validate a recipe. `name` is a short name or a YAML path; the
    schema defaults to the one of the recipe's group (or of `group` for a file elsewhere)."""
    path = find_recipe(name, group)
    schema = schema or schema_for(recipe_group(path) or group)  # type: ignore[assignment]
    raw = apply_overrides(read_recipe_yaml(path), overrides or [])
    resolved = path.resolve()
    shipped = str(resolved.relative_to(RECIPES_DIR).with_suffix("")) if resolved.is_relative_to(RECIPES_DIR) else None
    raw.setdefault("name", shipped or path.stem)
    source = f"recipe {shipped}" if shipped else str(path)
    return recipe_from_dict(raw, schema, source=source)  # type: ignore[arg-type]


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as YAML, loadable by `load_recipe`."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)
