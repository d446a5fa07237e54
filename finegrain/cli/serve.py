"""`finegrain serve`: put a search index behind an HTTP API and a web page (finegrain.serve)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def serve(
    index: Path = typer.Option(..., help="Index folder made by `finegrain index build`."),
    classifier: Optional[Path] = typer.Option(None, help="A classifier checkpoint: also answer /v1/classify."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. Anything but loopback needs --token."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port, printed at start)."),
    max_batch: int = typer.Option(32, help="Queries embedded in one forward pass at most (1: batching off)."),
    max_wait_ms: float = typer.Option(5.0, help="How long the first query of a batch waits for others (ms)."),
    token: Optional[str] = typer.Option(None, envvar="FINEGRAIN_SERVE_TOKEN", show_envvar=True,
                                        help="Bearer token every /v1/ route requires (16+ characters)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest image upload, in MiB (larger: 413)."),
    max_pixels: int = typer.Option(50_000_000, help="Largest image, width x height from its header (larger: 413)."),
    reload_interval: float = typer.Option(1.0, help="Seconds between checks for a new index version (0: never)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ...; default: a GPU when present."),
    threads: Optional[int] = typer.Option(None, help="CPU threads of one forward pass (default: one per core; "
                                          "1 on a machine shared with other work)."),
) -> None:
    """Serve the index: search by image, classify, thumbnails; follows `finegrain index add` live."""
    from finegrain.serve import serve as run
    from finegrain.serve.config import ServeConfig, UploadLimits

    limits = UploadLimits(max_bytes=int(max_upload_mb * (1 << 20)), max_pixels=max_pixels)
    config = ServeConfig(index=index, classifier=classifier, max_batch=max_batch, max_wait_ms=max_wait_ms, token=token,
                         limits=limits, reload_interval=reload_interval, device=device, threads=threads)
    run(config, host=host, port=port)
