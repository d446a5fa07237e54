"""`finegrain index build | add | search | info`: parse, call finegrain.index, print.

Bad input raises FinegrainError, which `finegrain.cli.main` prints as one line (exit status 2).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(name="index", help="Build and query a faiss search index of an image collection.",
                  no_args_is_help=True, add_completion=False)
console = Console()


def print_collection_notes(report, seen: str, outcome: str, listing: str) -> None:
    """What an embedding pass over a collection skipped, could not read, or reused (index and embed)."""
    if report.duplicates:
        console.print(f"skipped {len(report.duplicates)} images whose content {seen} "
                      f"(e.g. {report.duplicates[0]}).", highlight=False)
    if report.failed:
        console.print(f"[yellow]{len(report.failed)} images could not be read and {outcome}[/yellow] "
                      f"(listed in {listing}), e.g. {report.failed[0][0]}: {report.failed[0][1]}", highlight=False)
    if report.shards_reused:
        console.print(f"reused {report.shards_reused} embedding shards of an interrupted run.")


def _summary(report, verb: str) -> None:
    index = report.manifest["index"]
    console.print(f"{verb} {report.added} images; the index holds {report.manifest['count']} vectors of dimension "
                  f"{report.manifest['dim']}.", highlight=False)
    print_collection_notes(report, "is already indexed", "are not indexed", "failed.json")
    console.print(f"index {_key(index['key'], index['parameters'])} ({index['reason']}): recall@{index['recall_k']} "
                  f"{index['recall']:.3f} vs exact, {index['latency_ms']:.3f} ms/query batched "
                  f"(exact {index['exact_latency_ms']:.3f}).", highlight=False)
    if index["fallback"]:
        console.print(f"[yellow]recall target not met by {index['requested_key']}:[/yellow] {index['fallback']}.",
                      highlight=False)


def _key(key: str, parameters: str) -> str:
    return f"{key} {parameters}".strip()


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@app.command()
def build(
    weights: Optional[Path] = typer.Option(None, help="Model weights saved by finegrain (safetensors)."),
    images: Optional[Path] = typer.Option(None, help="Folder of images; sub-folder names become labels."),
    out: Path = typer.Option(..., help="Index folder to create (written atomically)."),
    embeddings: Optional[Path] = typer.Option(None, help="Instead of --weights/--images: a `finegrain embed` folder, "
                                              "a .npy file or a folder of .npy files."),
    metadata: Optional[Path] = typer.Option(None, help="With a .npy --embeddings: CSV with column id (optional label, "
                                            "path), one row per embedding."),
    index_key: Optional[str] = typer.Option(None, help="faiss index_factory key; default: picked by size and memory."),
    max_memory: str = typer.Option("4G", help="Memory budget of the index, e.g. 512M, 4G."),
    recall_target: float = typer.Option(0.95, help="Recall@k against exact search that tuning must reach."),
    recall_k: int = typer.Option(10, help="k of the recall target."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(0, help="DataLoader worker processes for decoding."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ...; default: a GPU when present."),
    shard_size: Optional[int] = typer.Option(None, min=1, help="Images per resumable embedding shard "
                                             "(default: 4096, finegrain.eval.embed.DEFAULT_SHARD_SIZE)."),
) -> None:
    """Embed every image (or read --embeddings) and write a tuned faiss index with its metadata."""
    from finegrain.errors import FinegrainError
    from finegrain.eval.embed import DEFAULT_SHARD_SIZE
    from finegrain.index.build import build_index

    if embeddings is not None:
        if weights is not None or images is not None:
            raise FinegrainError("--embeddings replaces --weights and --images. Pass either --embeddings, or both "
                                 "--weights and --images.")
        from finegrain.index.embeddings import build_index_from_embeddings

        report = build_index_from_embeddings(embeddings, out, metadata=metadata, index_key=index_key,
                                             max_memory=max_memory, recall_target=recall_target, recall_k=recall_k)
        _summary(report, "indexed")
        console.print(f"wrote {out}")
        return
    if weights is None or images is None or metadata is not None:
        raise FinegrainError("Pass --weights and --images (or --embeddings DIR, with --metadata for a .npy).")
    report = build_index(images, out, weights=weights, index_key=index_key, max_memory=max_memory,
                         recall_target=recall_target, recall_k=recall_k, batch_size=batch_size, device=device,
                         workers=workers, shard_size=shard_size or DEFAULT_SHARD_SIZE)
    if report.manifest:  # under torchrun, only rank 0 writes the index and reports it
        _summary(report, "indexed")
        console.print(f"wrote {out}")


@app.command()
def add(
    index: Path = typer.Option(..., help="Index folder made by `finegrain index build`."),
    images: Path = typer.Option(..., help="Folder of images to add."),
    weights: Optional[Path] = typer.Option(None, help="The index's weights, if moved since the build."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(0, help="DataLoader worker processes for decoding."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ...; default: a GPU when present."),
) -> None:
    """Add images not indexed yet (by checksum), then rebuild and re-tune the index."""
    from finegrain.index.build import add_images

    report = add_images(index, images, weights=weights, batch_size=batch_size, workers=workers, device=device)
    _summary(report, "added")


@app.command()
def search(
    index: Path = typer.Option(..., help="Index folder."),
    queries: list[Path] = typer.Argument(..., help="Query image files or folders."),
    k: int = typer.Option(10, help="Neighbours per query."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    grid: Optional[Path] = typer.Option(None, help="Also draw queries and neighbours into this PNG."),
    weights: Optional[Path] = typer.Option(None, help="The index's weights, if moved since the build."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ...; default: a GPU when present."),
    label: Optional[str] = typer.Option(None, help="Class of the query images, to mark right and wrong neighbours "
                                                   "(default: known only for queries in a class folder of the index)."),
    rerank: Optional[str] = typer.Option(None, help="Re-rank the neighbours: aqe, dba or kreciprocal (exact search "
                                         "over the kept embeddings; dba and kreciprocal cost one search of the "
                                         "whole collection)."),
) -> None:
    """Print the k nearest indexed images of each query (path, label, cosine similarity).

    Exits with status 2 when no query image could be read.
    """
    from finegrain.eval.rerank import Rerank
    from finegrain.index.search import draw_grid, search_index

    report = search_index(index, queries, k=k, weights=weights, device=device, label=label,
                          rerank=Rerank(rerank) if rerank else None)
    if grid is not None:
        draw_grid(report, grid)
    if as_json:
        typer.echo(report.to_json())
        return
    for result in report.results:
        title = str(result.query) if result.label is None else f"{result.query} (class {result.label})"
        table = Table(title=title, title_justify="left")
        for column in ("rank", "similarity", "label", "path"):
            table.add_column(column)
        for n in result.neighbours:
            table.add_row(str(n.rank), f"{n.similarity:.4f}", str(n.label or ""), n.path)
        console.print(table)
    for path, reason in report.failed:
        console.print(f"[yellow]query {path} could not be read:[/yellow] {reason}", highlight=False)
    if grid is not None:
        console.print(f"wrote {grid}")


@app.command()
def info(
    index: Path = typer.Option(..., help="Index folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Size, index type, memory, model, build parameters and measured recall of an index."""
    from finegrain.index.build import describe

    facts = describe(index)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    table = Table(show_header=False, title=facts["path"], title_justify="left")
    rows = [("vectors", f"{facts['size']} x {facts['dim']}"),
            ("index", _key(facts["index_type"], facts["search_parameters"])),
            ("memory", f"{_size(facts['memory_bytes'])} index, "
                       f"{_size(facts['embeddings_bytes'])} embeddings (kept on disk)"),
            ("recall", f"{facts['recall']:.3f} @{facts['recall_k']} vs exact (target {facts['recall_target']})"),
            ("latency", f"{facts['latency_ms']:.3f} ms/query batched, exact {facts['exact_latency_ms']:.3f}"),
            ("model", f"{facts['model']['arch']} {facts['model']['weights']} "
                      f"sha256 {facts['model']['weights_sha256'][:16]}..." if facts["model"] else
                      "none: built from embeddings made elsewhere (search by vector)"),
            ("chosen", f"{facts['index']['chosen_by']}: {facts['index']['reason']}"),
            ("built", f"{facts['build']['created']} from {', '.join(facts['build']['sources'])}"),
            ("unreadable", str(facts["failed"]))]
    if facts["fallback"]:
        rows.append(("fallback", facts["fallback"]))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


if __name__ == "__main__":
    app()
