"""`finegrain embed`: embeddings of a folder of images as .npy shards plus a CSV of paths and labels."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from finegrain.cli.index import print_collection_notes

console = Console()


def embed(
    weights: Path = typer.Option(..., help="Model weights saved by finegrain (safetensors)."),
    images: Path = typer.Option(..., help="Folder of images; sub-folder names become labels."),
    out: Path = typer.Option(..., help="Folder to write (atomically): embeddings-*.npy, items.csv, embeddings.json."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(0, help="DataLoader worker processes for decoding."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ...; default: a GPU when present."),
    shard_size: Optional[int] = typer.Option(None, min=1, help="Images per resumable shard and per .npy file "
                                             "(default: 4096)."),
) -> None:
    """Embed every image (resumable, torchrun-aware); `finegrain index build --embeddings OUT` indexes the result."""
    from finegrain.eval.embed import DEFAULT_SHARD_SIZE
    from finegrain.index.embeddings import embed_images

    report = embed_images(images, out, weights=weights, batch_size=batch_size, device=device, workers=workers,
                          shard_size=shard_size or DEFAULT_SHARD_SIZE)
    if not report.manifest:  # under torchrun, only rank 0 writes and reports
        return
    manifest = report.manifest
    console.print(f"embedded {manifest['count']} images into {len(manifest['shards'])} .npy shard(s) of dimension "
                  f"{manifest['dim']}; wrote {out}", highlight=False)
    print_collection_notes(report, "was seen already", "are not embedded", "embeddings.json")
