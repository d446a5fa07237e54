"""`finegrain models` and `finegrain bench`: the zoo at a glance and its speed."""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from finegrain.cli.runs import echo

if TYPE_CHECKING:  # torch loads inside the commands, so that `--help` stays instant
    import torch

console = Console()


def models(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {name, params, macs, resolution}."),
    num_classes: int = typer.Option(1000, help="Classifier size used for the parameter count."),
) -> None:
    """List every registered variant with its parameters and MACs at its paper resolution."""
    from finegrain.eval.throughput import model_rows

    rows = model_rows(num_classes)
    if as_json:
        print(json.dumps([{k: row[k] for k in ("name", "params", "macs", "resolution")} for row in rows], indent=1))
        return
    table = Table(title=f"finegrain models ({num_classes} classes)")
    for column in ("name", "params", "MACs", "res", "what"):
        table.add_column(column, justify="right" if column in ("params", "MACs", "res") else "left")
    for row in rows:
        table.add_row(row["name"], f"{row['params'] / 1e6:.2f}M", f"{row['macs'] / 1e9:.2f}G",
                      str(row["resolution"]), row["description"])
    console.print(table)


def _timed(step: str, net: torch.nn.Module, resolution: int, batch: int, device: torch.device,
           channels_last: bool, iterations: int) -> float:
    """Images/s of `net`, saying on stderr what runs: one warm-up batch, then the timed loop.

    On a CPU one batch of 64 takes seconds to minutes; the warm-up's time announces the loop's.
    """
    from finegrain.eval.throughput import measure_throughput

    echo(f"{step}: warm-up, 1 batch of {batch} at {resolution}px ...")
    start = time.perf_counter()
    measure_throughput(net, resolution, batch, device, channels_last, warmup=0, iterations=1)
    seconds = time.perf_counter() - start
    batches = f"{iterations} batch" + ("es" if iterations > 1 else "")
    echo(f"{step}: warm-up took {seconds:.1f} s; timing {batches} (about {iterations * seconds:.0f} s) ...")
    rate = measure_throughput(net, resolution, batch, device, channels_last, warmup=0, iterations=iterations)
    echo(f"{step}: {rate:.1f} images/s")
    return rate


def bench(
    model: str = typer.Argument(..., help="A registered model name, or a weights file of ours."),
    batch: int = typer.Option(64, min=1, help="Batch size (the paper measures at 64)."),
    resolution: int = typer.Option(0, min=0, help="Input side; 0 = the model's paper resolution."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Run both models channels_last."),
    fast: bool = typer.Option(False, "--fast", help="Also time our inference fast path (BN folded, channels_last)."),
    bf16: bool = typer.Option(False, "--bf16", help="With --fast: bf16 autocast (CUDA, or a CPU with native bf16)."),
    iterations: int = typer.Option(3, min=1, help="Timed batches after one warm-up batch (median is reported)."),
    base_width: int = typer.Option(0, min=0, help="Override base_width (0 = the variant's own)."),
) -> None:
    """Inference images/s of MODEL next to torchvision's ResNet-50 at 224, measured in the same run.

    Progress goes to stderr. On a CPU, --batch 16 --iterations 1 bounds the run to a fraction
    of the paper's setting (batch 64); the ratios stay comparable within one run.
    """
    import torch
    import torchvision

    from finegrain.eval.inference import InferenceOptions, Predictor
    from finegrain.models import create_model, load_model, variant
    from finegrain.runtime import default_device

    device = default_device()
    overrides = {"base_width": base_width} if base_width else {}
    echo(f"bench: building {model} and torchvision's resnet50 on {device.type}")
    net = load_model(model) if model.endswith(".safetensors") else create_model(model, **overrides)
    res = resolution or (net.preprocessing.crop if model.endswith(".safetensors") else variant(model).resolution)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = net.eval().to(device, memory_format=layout)
    reference = torchvision.models.resnet50(weights=None).eval().to(device, memory_format=layout)
    steps = 3 if fast else 2
    ref = _timed(f"[1/{steps}] torchvision resnet50", reference, 224, batch, device, channels_last, iterations)
    ours = _timed(f"[2/{steps}] {model}", net, res, batch, device, channels_last, iterations)
    table = Table(title=f"inference throughput, batch {batch}, FP32, {device.type}")
    for column in ("model", "resolution", "images/s", "ratio"):
        table.add_column(column)
    table.add_row("torchvision resnet50", "224", f"{ref:.1f}", "1.00")
    table.add_row(model, str(res), f"{ours:.1f}", f"{ours / ref:.2f}")
    if fast:
        options = InferenceOptions.fast(device, bf16=bf16)
        label = f"{model} fast path" + (" bf16" if options.dtype is not None else " FP32")
        quick = _timed(f"[3/3] {label}", Predictor(net, device, options), res, batch, device, True, iterations)
        table.add_row(label, str(res), f"{quick:.1f}", f"{quick / ref:.2f}")
    console.print(table)
