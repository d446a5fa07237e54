"""The `finegrain` command: one thin module per command group, registered here.

Start-up stays light: the command modules import torch, faiss, timm and the like inside their
commands, so `finegrain --help` (and a typo in an option) answers without loading them.
tests/test_cli_startup.py keeps it so.
"""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from finegrain.cli import backbone, convert, data, eval as evaluate, fgvc, index, models, recipes, retrieval, robustness
from finegrain.cli import serve
from finegrain.cli import embed
from finegrain.cli import export
from finegrain.errors import FinegrainError

app = typer.Typer(
    name="finegrain",
    help="Transfer learning for fine-grained classification and retrieval on the assembled CNN.",
    # Plain click help: typer 0.29's rich panels print "<bool>" after every switch (`--quiet <bool>`),
    # as if it took a value; the plain layout shows a switch as a switch.
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("models")(models.models)
app.command("bench")(models.bench)
app.command("convert")(convert.convert)
app.command("export")(export.export)
app.command("fgvc")(fgvc.fgvc)
app.command("eval")(evaluate.evaluate)
app.command("retrieval")(retrieval.retrieval)
app.command("embed")(embed.embed)
app.add_typer(index.app, name="index")
app.add_typer(backbone.app, name="backbone")
app.command("teacher-logits")(backbone.teacher_logits)
app.command("robustness")(robustness.robustness)
app.command("compare")(robustness.compare)
app.add_typer(recipes.app, name="recipes")
app.add_typer(data.app, name="data")
app.command("serve")(serve.serve)


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
