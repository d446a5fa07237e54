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
