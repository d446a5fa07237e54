"""`finegrain export`: a checkpoint -> ONNX (FP32 or INT8) or TorchScript; `--inspect FILE` prints
what an exported file says about itself."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from finegrain.errors import FinegrainError

console = Console()


def export(
    weights: Optional[Path] = typer.Option(None, "--weights", help="A finegrain checkpoint "
                                           "(e.g. RUN/best.safetensors)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The file to write (.onnx or .pt)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    task: Optional[str] = typer.Option(None, "--task", help="classify (logits) or embed (L2-normalised "
                                       "embeddings); default: embed for a retrieval network, else classify."),
    batch: str = typer.Option("dynamic", "--batch", help="dynamic, or a fixed batch size N."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=1, help="Square input side (default: the "
                                             "checkpoint's eval crop)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    preprocess_in_graph: bool = typer.Option(False, "--preprocess-in-graph", help="Take uint8 [B, H, W, 3] RGB "
                                             "pixels of the eval crop and normalise inside the graph."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: onnxruntime static quantization (QDQ, "
                                           "per-channel weights); needs --calibrate."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="Folder of images to calibrate INT8 on."),
    inspect: Optional[Path] = typer.Option(None, "--inspect", help="Print the metadata of an exported file "
                                           "instead of exporting."),
    as_json: bool = typer.Option(False, "--json", help="With --inspect: print JSON."),
) -> None:
    """Export a checkpoint's model (BN folded, eval mode) with its preprocessing and class names as metadata."""
    if inspect is not None:
        from finegrain.export.metadata import describe

        facts = describe(inspect)
        if as_json:
            typer.echo(json.dumps(facts, indent=2))
            return
        for key, value in facts.items():
            if key == "classes" and value is not None and len(value) > 10:
                value = f"{len(value)} classes: {', '.join(value[:10])}, ..."
            console.print(f"{key:>14}: {value}", highlight=False, markup=False)
        return
    if weights is None or out is None:
        raise FinegrainError("Pass --weights CKPT and --out FILE to export, or --inspect FILE to read an export.")
    from finegrain.export.api import export_checkpoint

    report = export_checkpoint(weights, out, fmt, task=task, batch=batch, resolution=resolution, opset=opset,
                               preprocess_in_graph=preprocess_in_graph, quantize=quantize, calibrate=calibrate)
    check = "INT8: accuracy measured with `finegrain eval`" if report.max_relative_difference is None else \
        f"outputs equal PyTorch's within {report.max_relative_difference:.1e} (relative)"
    console.print(f"[green]wrote[/green] {report.path}: {report.format}, {report.task} at {report.resolution}px, "
                  f"{report.bytes / 2**20:.1f} MiB; {check}", highlight=False)
