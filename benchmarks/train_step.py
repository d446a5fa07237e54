"""Training throughput: one full SGD step of assemble_resnet50 vs timm's resnet50d, and the data
pipeline's images/s per DataLoader worker against what the step consumes.

Both networks run in the same loop and process, their steps interleaved (A, B, A, B, ...) so that
load from other processes hits both alike; the median step time is reported. The data pipeline
is the FGVC training preset (random-resized crop to 224, flip, AutoAugment CIFAR-10 policy,
normalise) on JPEG decoding, measured in one process = one worker; workers scale with cores.

Usage: python benchmarks/train_step.py [--batch-size 16] [--steps 6] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import finegrain
from finegrain.data import DEMO_ROOT, ImageDataset, load_splits
from finegrain.data.transforms import train_transform
from finegrain.preprocessing import RELEASE_BL
from finegrain.runtime import autocast
from finegrain.train.optim import build_sgd


def step_function(model: nn.Module, batch_size: int, size: int, device: torch.device, channels_last: bool,
                  dtype: torch.dtype | None) -> Callable[[], None]:
    """One training step (forward, label-smoothed CE, backward, SGD with momentum) on fixed data."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format).train()
    optimizer = build_sgd(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with autocast(device, dtype):
            loss = F.cross_entropy(model(images).float(), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def interleaved_images_per_s(steps: dict[str, Callable[[], None]], batch_size: int, rounds: int,
                             warmup: int = 2) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: batch_size / statistics.median(values) for name, values in times.items()}


def jpeg_copies(samples: list, side: int, folder: Path) -> list:
    """The demo photos upscaled to side x side*3/4 JPEGs (quality 90): Food-101-sized files."""
    from finegrain.data import Sample

    copies = []
    for i, sample in enumerate(samples):
        path = folder / f"{i}.jpg"
        Image.open(sample.path).convert("RGB").resize((side, side * 3 // 4), Image.BICUBIC).save(path, quality=90)
        copies.append(Sample(str(path), sample.label))
    return copies


def pipeline_images_per_s(samples: list, count: int, autoaugment: str | None = "cifar10") -> float:
    """Decode + FGVC train transform, one process (what one DataLoader worker delivers)."""
    dataset = ImageDataset(samples, train_transform(RELEASE_BL, autoaugment))
    for index in range(5):
        dataset[index]
    start = time.perf_counter()
    for index in range(count):
        dataset[index % len(dataset)]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per network and layout")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default=str(finegrain.runtime.default_device()))
    parser.add_argument("--amp", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--images", type=int, default=200, help="images timed per pipeline measurement")
    parser.add_argument("--gpu-rate", type=float, default=2500.0, help="img/s of the GPU to feed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    models = {"assemble_resnet50": finegrain.create_model("assemble_resnet50", num_classes=1000),
              "timm resnet50d": timm.create_model("resnet50d", pretrained=False, num_classes=1000)}
    print(f"device {device}, {args.threads} threads, batch {args.batch_size}, {args.size}px, {args.amp}, "
          f"median of {args.steps} interleaved steps")
    print("\n| network | layout | train images/s |\n|---|---|---|")
    rates = {}
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "contiguous"
        steps = {name: step_function(model, args.batch_size, args.size, device, channels_last, dtype)
                 for name, model in models.items()}
        for name, rate in interleaved_images_per_s(steps, args.batch_size, args.steps).items():
            rates[(name, layout)] = rate
            print(f"| {name} | {layout} | {rate:.2f} |")

    train = load_splits("folder", DEMO_ROOT)["train"].samples
    with tempfile.TemporaryDirectory() as folder:
        large = jpeg_copies(train[:50], 512, Path(folder))
        per_worker = {"demo photos (100x100 JPEG)": pipeline_images_per_s(train, args.images),
                      "512x384 JPEG (Food-101 size)": pipeline_images_per_s(large, args.images),
                      "512x384 JPEG, no AutoAugment": pipeline_images_per_s(large, args.images, None)}
    consumed = max(rates.values())
    print("\n| images | pipeline images/s per worker | workers for this step "
          f"({consumed:.1f} img/s) | workers for a {args.gpu_rate:.0f} img/s GPU |\n|---|---|---|---|")
    for name, rate in per_worker.items():
        print(f"| {name} | {rate:.1f} | {math.ceil(consumed / rate)} | {math.ceil(args.gpu_rate / rate)} |")


if __name__ == "__main__":
    main()
