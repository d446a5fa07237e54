"""Inference throughput as the paper measures it: images/s at batch 64, FP32 unless asked."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn


def time_once(run: Callable[[torch.Tensor], object], x: torch.Tensor, device: torch.device) -> float:
    """Seconds of one call of `run(x)`, waiting for the GPU's queued work on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_throughput(
    model: nn.Module,
    resolution: int,
    batch_size: int = 64,
    device: torch.device | None = None,
    channels_last: bool = False,
    warmup: int = 1,
    iterations: int = 3,
) -> float:
    """Images per second of `model(x)` on random input [batch, 3, res, res] (median of runs).

    `model` may be a plain module (run under inference_mode) or a Predictor (eval/inference.py)
    with `device` given.
    """
    device = device or next(model.parameters()).device
    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(warmup):
            time_once(model, x, device)
        timings = sorted(time_once(model, x, device) for _ in range(iterations))
    return batch_size / timings[len(timings) // 2]


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-accumulates of one image (torch's FLOP counter / 2: convs and dense layers).

    Runs on whatever device the model is on; a model built on the meta device counts in
    milliseconds without computing anything.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, resolution, resolution, device=device))
    return counter.get_total_flops() // 2


def model_rows(num_classes: int = 1000) -> list[dict]:
    """Parameters and MACs of every registered variant at its paper resolution, counted on the
    meta device (nothing is allocated or computed)."""
    from finegrain.models import VARIANTS, create_model

    rows = []
    for name, spec in VARIANTS.items():
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes)
        rows.append({
            "name": name,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "macs": count_macs(model, spec.resolution),
            "resolution": spec.resolution,
            "description": spec.description,
        })
    return rows
