"""`finegrain data info`: check a data set's layout (and optionally its images) before training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from finegrain.errors import FinegrainError

# The kinds finegrain.data registers, spelled out so that --help need not import the readers
# (tests/test_data_inputs.py keeps them in step with finegrain.data.kinds()); folder first, for one's own photos.
CLASSIFICATION_KINDS = ("folder", "food101", "cars196", "flowers102", "aircraft", "pets")
RETRIEVAL_KINDS = ("folder_zeroshot", "cub200", "cars196_retrieval", "sop", "inshop")
OWN_TABLE = "csv"  # ROOT/dataset.csv: path,label,split,is_query,is_gallery (finegrain.data.csv_layout)
OWN_FOLDERS = "your own class folders (ROOT/<class>/*.jpg, or ROOT/train/<class>/ and ROOT/test/<class>/)"

app = typer.Typer(help="Inspect data sets before training.", no_args_is_help=True)


@app.callback()  # keeps `info` a sub-command while it is the only one
def _group() -> None:
    """Inspect data sets before training."""


def data_info(kind: str, root: str | Path, check: bool = False, **opts: Any) -> dict[str, Any]:
    """Split sizes and class counts of a data set (keys train, test, classes, test_classes);
    with `check`, also the images that cannot be decoded (key bad_images)."""
    from finegrain.data import check_images, load_splits

    splits = load_splits(kind, root, **opts)
    train, test = splits["train"], splits["test"]
    info: dict[str, Any] = {
        "kind": kind, "root": str(Path(root).expanduser().resolve()),
        "train": len(train), "test": len(test), "classes": len(train.classes), "test_classes": len(test.classes),
    }
    if check:
        info["bad_images"] = check_images(train.samples + test.samples)
    return info


@app.command("info")
def info(
    kind: Optional[str] = typer.Option(None, "--kind", help=f"Data set kind: folder for {OWN_FOLDERS}; "
                                       f"folder_zeroshot for them split by class; {OWN_TABLE} for a ROOT/dataset.csv listing path, label, split, "
                                       f"is_query, is_gallery; or a public data set as "
                                       f"downloaded: {', '.join(CLASSIFICATION_KINDS[1:] + RETRIEVAL_KINDS[1:])}"),
    data: Path = typer.Option(..., "--data", help="The data set's folder, as downloaded (see datasets/README.md)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
    check: bool = typer.Option(False, "--check-images", help="Also decode every image and list the bad ones"),
) -> None:
    """Print the size of each split and the class count, or one clear error about the layout."""
    from finegrain.data import kinds

    if kind is None:
        raise FinegrainError(f"Say which data set this is. Pass --kind, one of: {', '.join(kinds())}.")
    result = data_info(kind, data, check=check)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{kind} at {result['root']}")
    typer.echo(f"  train: {result['train']:,} images, {result['classes']:,} classes")
    typer.echo(f"  test:  {result['test']:,} images, {result['test_classes']:,} classes")
    if check:
        bad = result["bad_images"]
        typer.echo(f"  undecodable images: {len(bad)}")
        for path in bad:
            typer.echo(f"    {path}")
