"""The `finegrain` command: one thin module per command group, registered here."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from finegrain.cli import convert, data, models, robustness
from finegrain.errors import FinegrainError

app = typer.Typer(
    name="finegrain",
    help="Transfer learning for fine-grained classification and retrieval on the assembled CNN.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("models")(models.models)
app.command("bench")(models.bench)
app.command("convert")(convert.convert)
app.add_typer(data.app, name="data")
app.command("robustness")(robustness.robustness)
app.command("compare")(robustness.compare)


def main() -> None:
    """Entry point: bad input ends with its one-line message and exit status 2, never a traceback."""
    try:
        app()
    except FinegrainError as error:
        # Raised in a DataLoader worker, the message carries the worker's traceback: keep our text.
        message = str(error).rsplit("FinegrainError: ", 1)[-1].strip()
        Console(stderr=True).print(f"[bold red]error:[/bold red] {message}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/yellow]")
        sys.exit(130)
