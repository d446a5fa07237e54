"""`finegrain recipes`: list the shipped recipes (or one table's rows), print one resolved, or
say what differs between two."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from finegrain.errors import FinegrainError

results = Console()

app = typer.Typer(help="List the shipped recipes (--table N: one table of the paper); `show NAME` prints one "
                       "resolved; `diff A B` what differs.", invoke_without_command=True, no_args_is_help=False)


@app.callback()
def list_recipes(
    ctx: typer.Context,
    table: Optional[int] = typer.Option(None, "--table", help="List the rows of this table of the paper "
                                        "(2, 3, 4, 5, 6, 7, 9, 10) in order, with the recipe of each"),
) -> None:
    """List every recipe with its description, or one table's rows."""
    if ctx.invoked_subcommand is not None:
        return
    from finegrain.recipes import RECIPES_DIR, find_recipe, list_recipes, read_recipe_yaml
    from finegrain.recipes.rows import TABLES, table_rows

    if table is not None:
        rows = table_rows(table)
        listing = Table(title=f"Table {table}: {TABLES.get(table, '')}")
        for column in ("row", "recipe", "description"):
            listing.add_column(column)
        for row, name, description in rows:
            listing.add_row(row, name, description)
        results.print(listing)
        return
    listing = Table(title=f"recipes in {RECIPES_DIR}")
    listing.add_column("name")
    listing.add_column("description")
    for name in list_recipes():
        listing.add_row(name, str(read_recipe_yaml(find_recipe(name)).get("description", "")))
    results.print(listing)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Recipe name (fgvc/food101, food101, ...), a .yaml path or a paper row (E3)"),
    assignments: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key: --set optim.lr=0.02"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML"),
    group: Optional[str] = typer.Option(None, "--group", help="The command a recipe file outside the shipped ones "
                                        "is for: fgvc, retrieval or backbone (picks its schema)"),
) -> None:
    """Print one recipe with every default filled in and the overrides applied, validated as the
    training command would (it refuses exactly what `finegrain fgvc --recipe NAME` refuses)."""
    from finegrain.recipes import GROUP_SCHEMAS, load_recipe, recipe_to_dict, recipe_to_yaml
    from finegrain.recipes.rows import resolve_recipe_or_row

    groups = ["fgvc", *GROUP_SCHEMAS]
    if group is not None and group not in groups:
        raise FinegrainError(f"Unknown --group '{group}'. Use one of: {', '.join(groups)}.")
    recipe = load_recipe(resolve_recipe_or_row(name, group), list(assignments or []), group=group)
    if as_json:
        print(json.dumps(recipe_to_dict(recipe), indent=2))
    else:
        print(recipe_to_yaml(recipe), end="")


@app.command("diff")
def diff(
    first: str = typer.Argument(..., help="Recipe name, .yaml path or paper row (E2, 10:F5)"),
    second: str = typer.Argument(..., help="The recipe to compare it with"),
) -> None:
    """Print every training key whose resolved value differs (e.g. the step a table row adds)."""
    from finegrain.recipes import load_recipe
    from finegrain.recipes.compare import recipe_differences
    from finegrain.recipes.rows import resolve_recipe_or_row

    a, b = load_recipe(resolve_recipe_or_row(first)), load_recipe(resolve_recipe_or_row(second))
    differences = recipe_differences(a, b)
    if not differences:
        results.print(f"{a.name} and {b.name} train the same way (only names and descriptions differ).")
        return
    listing = Table(title=f"{a.name} -> {b.name}")
    for column in ("key", a.name, b.name):
        listing.add_column(column)
    for key, value_a, value_b in differences:
        listing.add_row(key, json.dumps(value_a), json.dumps(value_b))
    results.print(listing)
