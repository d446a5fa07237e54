"""onnxruntime (CPU EP, FP32 and INT8) vs finegrain's PyTorch fast path, side by side in one process.

For each model: a checkpoint with random weights (speed does not depend on them) is exported to
ONNX FP32, INT8 (calibrated on the demo's training photos) and TorchScript; images/s at batch 1
and 32 are the median of timed runs after a warm-up, with the same number of threads everywhere.
With --demo CKPT (a `finegrain fgvc --recipe demo` checkpoint) it also measures what INT8 costs
in demo top-1. Prints a markdown table for benchmarks/RESULTS.md.

    python benchmarks/export_speed.py --threads 1 --runs 3 --demo RUN/best.safetensors
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import finegrain
from finegrain.data import ImageDataset, demo_root, load_splits
from finegrain.data.loaders import eval_loader
from finegrain.eval.classification import predict_logits, topk_accuracy
from finegrain.data.transforms import eval_transform
from finegrain.export.api import export_checkpoint
from finegrain.export.graph import fast_path
from finegrain.models.onnx_model import load_onnx_model
from finegrain.export.quantize import cpu_has_vnni
from finegrain.models import load_model, save_model

MODELS = (("assemble_resnet50", 256), ("resnet50", 224))


def images_per_second(run: Callable[[], object], batch: int, runs: int) -> float:
    run()  # warm-up: allocations, onnxruntime's first-run graph work
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def onnx_runner(path: Path, threads: int, images: torch.Tensor) -> Callable[[], object]:
    """The bare onnxruntime session (no finegrain wrapper), as a deployment would call it."""
    session = load_onnx_model(path, threads=threads).session
    feed = {"images": images.numpy()}
    return lambda: session.run(None, feed)


def speed(arch: str, resolution: int, folder: Path, threads: int, runs: int, batches: tuple[int, ...]) -> list[str]:
    torch.manual_seed(0)
    weights = save_model(finegrain.create_model(arch, num_classes=1000).eval(), folder / f"{arch}.safetensors")
    files = {"fp32": export_checkpoint(weights, folder / f"{arch}.onnx", resolution=resolution).path,
             "int8": export_checkpoint(weights, folder / f"{arch}.int8.onnx", resolution=resolution, quantize="int8",
                                       calibrate=demo_root() / "train").path,
             "torchscript": export_checkpoint(weights, folder / f"{arch}.pt", "torchscript",
                                              resolution=resolution).path}
    predictor = fast_path(load_model(weights))
    rows = []
    for batch in batches:
        images = torch.randn(batch, 3, resolution, resolution)
        fast = images_per_second(lambda: predictor(images), batch, runs)
        fp32 = images_per_second(onnx_runner(files["fp32"], threads, images), batch, runs)
        int8 = images_per_second(onnx_runner(files["int8"], threads, images), batch, runs)
        rows.append(f"| {arch}@{resolution} | {batch} | {fast:.2f} | {fp32:.2f} | {fp32 / fast:.2f}x | {int8:.2f} | "
                    f"{int8 / fp32:.2f}x |")
        print(rows[-1], flush=True)
    sizes = ", ".join(f"{kind} {path.stat().st_size / 2**20:.1f} MiB" for kind, path in files.items())
    rows.append(f"| {arch}@{resolution} files | | {sizes} | | | | |")
    print(rows[-1], flush=True)
    return rows


def demo_top1(checkpoint: Path, folder: Path) -> str:
    """FP32 (PyTorch and onnxruntime) and INT8 top-1 on the 160 demo test photos."""
    model = load_model(checkpoint)
    samples = load_splits("folder", demo_root())["test"].samples
    loader = eval_loader(ImageDataset(samples, eval_transform(model.preprocessing)), 32, 0, False)
    cpu = torch.device("cpu")
    logits, labels = predict_logits(model, loader, cpu)
    results = {"pytorch": logits}
    for kind, extra in (("onnx fp32", {}), ("onnx int8", {"quantize": "int8", "calibrate": demo_root() / "train"})):
        path = export_checkpoint(checkpoint, folder / f"demo.{kind.split()[1]}.onnx", **extra).path
        results[kind] = predict_logits(load_onnx_model(path), loader, cpu)[0]
    counts = {kind: round(topk_accuracy(out, labels)["top1"] * len(labels)) for kind, out in results.items()}
    changed = int((results["onnx int8"].argmax(1) != logits.argmax(1)).sum())
    line = (f"demo top-1 ({len(labels)} photos): " + ", ".join(f"{k} {v}/{len(labels)}" for k, v in counts.items())
            + f"; INT8 changes {changed} predictions")
    print(line, flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--models", nargs="*", default=[f"{a}@{r}" for a, r in MODELS])
    parser.add_argument("--demo", type=Path, help="a demo checkpoint: also measure INT8's top-1 cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {args.threads} thread(s), VNNI: {cpu_has_vnni()}, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}, numpy {np.__version__}")
    print("| model | batch | fast path img/s | onnxruntime FP32 img/s | ORT / fast | ORT INT8 img/s | INT8 / FP32 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            arch, resolution = spec.split("@")
            speed(arch, int(resolution), Path(tmp), args.threads, args.runs, tuple(args.batches))
        if args.demo:
            demo_top1(args.demo, Path(tmp))


if __name__ == "__main__":
    main()
