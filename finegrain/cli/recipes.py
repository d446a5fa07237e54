"""`finegrain recipes`: list the shipped recipes, or print one fully resolved."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from finegrain.errors import FinegrainError

results = Console()

app = typer.Typer(help="List the shipped recipes; `show NAME` prints one resolved.", invoke_without_command=True,
                  no_args_is_help=False)


@app.callback()
def list_recipes(ctx: typer.Context) -> None:
    """List every recipe with its description."""
    if ctx.invoked_subcommand is not None:
        return
    from finegrain.recipes import RECIPES_DIR, find_recipe, list_recipes, read_recipe_yaml

    table = Table(title=f"recipes in {RECIPES_DIR}")
    table.add_column("name")
    table.add_column("description")
    for name in list_recipes():
        table.add_row(name, str(read_recipe_yaml(find_recipe(name)).get("description", "")))
    results.print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Recipe name (fgvc/food101, food101, ...) or a .yaml path"),
    assignments: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key: --set optim.lr=0.02"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML"),
    group: Optional[str] = typer.Option(None, "--group", help="The command a recipe file outside the shipped ones "
                                        "is for: fgvc, retrieval or backbone (picks its schema)"),
) -> None:
    """Print one recipe with every default filled in and the overrides applied, validated as the
    training command would (it refuses exactly what `finegrain fgvc --recipe NAME` refuses)."""
    from finegrain.recipes import GROUP_SCHEMAS, load_recipe, recipe_to_dict, recipe_to_yaml

    groups = ["fgvc", *GROUP_SCHEMAS]
    if group is not None and group not in groups:
        raise FinegrainError(f"Unknown --group '{group}'. Use one of: {', '.join(groups)}.")
    recipe = load_recipe(name, list(assignments or []), group=group)
    if as_json:
        print(json.dumps(recipe_to_dict(recipe), indent=2))
    else:
        print(recipe_to_yaml(recipe), end="")
