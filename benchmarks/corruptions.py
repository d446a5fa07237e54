"""How fast we make ImageNet-C corruptions and ImageNet-P sequences, and what a full mCE / mFR
run costs on this machine.

One process (= one core) corrupts the demo test images, resized to 256 and centre-cropped to 224
as for an ImageNet model, with each of the 15 corruptions at every severity, and generates the 10
perturbation sequences. The estimate for N images multiplies out 15 x 5 corrupted images and
10 x frames perturbation frames per image, divides by the per-core rate times the cores, and adds
the model's forward passes at its measured batch-64 FP32 throughput here (on a machine with
k cores the two compete, so the sum is the honest figure).

    .venv/bin/python benchmarks/corruptions.py                 # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/corruptions.py --images 8 --model resnet50 --write
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core per generator
    os.environ.setdefault(_var, "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finegrain.data import DEMO_ROOT, load_splits  # noqa: E402
from finegrain.eval.corruptions import (  # noqa: E402
    CORRUPTIONS, SEVERITIES, corrupt_image, load_eval_crop, load_eval_resized,
)
from finegrain.eval.perturbations import PERTURBATIONS, perturbation_sequence  # noqa: E402
from finegrain.eval.throughput import measure_throughput  # noqa: E402
from finegrain.preprocessing import IMAGENET  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS_robustness.md")


def corruption_rates(crops: list[np.ndarray]) -> dict[str, float]:
    """Corrupted images per second on one core, per corruption (all severities)."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    corrupt_image(crops[0], "glass_blur", 1, seed=0)  # numba compiles glass_blur once per process
    rates = {}
    for name in CORRUPTIONS:
        start = time.perf_counter()
        for k, crop in enumerate(crops):
            for severity in SEVERITIES:
                corrupt_image(crop, name, severity, seed=k)
        rates[name] = len(crops) * len(SEVERITIES) / (time.perf_counter() - start)
    return rates


def perturbation_rates(resized: list[np.ndarray], frames: int, crop: int) -> dict[str, float]:
    """Perturbation frames per second on one core, per perturbation."""
    rates = {}
    for name in PERTURBATIONS:
        start = time.perf_counter()
        for k, image in enumerate(resized):
            perturbation_sequence(image, name, frames, crop, seed=k)
        rates[name] = len(resized) * frames / (time.perf_counter() - start)
    return rates


def overall(rates: dict[str, float]) -> float:
    """Images per second over an equal mix (the harmonic mean: time adds up, not rate)."""
    return len(rates) / sum(1 / r for r in rates.values())


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="demo test images to time on")
    parser.add_argument("--frames", type=int, default=10, help="frames per perturbation sequence")
    parser.add_argument("--model", default="resnet50", help="model whose batch-64 FP32 throughput is measured")
    parser.add_argument("--write", action="store_true", help=f"append the figures to {RESULTS.name}")
    args = parser.parse_args()

    samples = load_splits("folder", DEMO_ROOT)["test"].samples[:: max(1, 160 // args.images)][: args.images]
    crops = [load_eval_crop(s.path, IMAGENET) for s in samples]
    resized = [load_eval_resized(s.path, IMAGENET) for s in samples]
    c_rates = corruption_rates(crops)
    p_rates = perturbation_rates(resized, args.frames, IMAGENET.crop)
    torch.set_num_threads(os.cpu_count() or 1)
    from finegrain.models import create_model

    model = create_model(args.model).eval()
    model_rate = measure_throughput(model, IMAGENET.crop, 64, torch.device("cpu"), iterations=2)

    cores = os.cpu_count() or 1
    lines = [
        f"## Corruption and perturbation generation ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/corruptions.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (other jobs share these cores).  ",
        f"Images: {len(crops)} demo test images resized to {IMAGENET.resize}, centre crop {IMAGENET.crop}.",
        "",
        "| corruption | images/s per core | | perturbation | frames/s per core |",
        "|---|---:|---|---|---:|",
    ]
    c_items, p_items = list(c_rates.items()), list(p_rates.items())
    for k in range(max(len(c_items), len(p_items))):
        c = f"| {c_items[k][0]} | {c_items[k][1]:.1f} |" if k < len(c_items) else "| | |"
        p = f" | {p_items[k][0]} | {p_items[k][1]:.1f} |" if k < len(p_items) else " | | |"
        lines.append(c + p)
    c_all, p_all = overall(c_rates), overall(p_rates)
    lines += [f"| **all 15 x 5** | **{c_all:.1f}** | | **all 10 x {args.frames}** | **{p_all:.1f}** |", ""]
    lines.append(f"{args.model} inference (batch 64, FP32, 224, CPU, all cores): {model_rate:.1f} images/s.")
    lines += ["", f"| images | corrupt 75/image on {cores} cores | {args.model} on them | "
              f"perturb {10 * args.frames}/image | {args.model} on them | total |", "|---:|---:|---:|---:|---:|---:|"]
    for n in (5_000, 50_000):
        gen_c = n * 75 / (c_all * cores)
        inf_c = n * 76 / model_rate  # 75 corrupted + the clean image
        gen_p = n * 10 * args.frames / (p_all * cores)
        inf_p = n * 10 * args.frames / model_rate
        lines.append(f"| {n:,} | {hours(gen_c)} | {hours(inf_c)} | {hours(gen_p)} | {hours(inf_p)} | "
                     f"{hours(gen_c + inf_c + gen_p + inf_p)} |")
    paper_rate = 536.0  # ResNet-50 on one Nvidia P40, batch 64 FP32 (the paper's Table 1)
    lines += ["", f"With a GPU at the paper's ResNet-50 throughput ({paper_rate:.0f} images/s on a P40, Table 1) "
              "the inference columns become: " + ", ".join(
                  f"{n:,} images: {hours(n * 76 / paper_rate)} (mCE) + {hours(n * 10 * args.frames / paper_rate)} "
                  "(mFR)" for n in (5_000, 50_000)) + "; corruption generation on this CPU is then the bottleneck.",
              "With the corruption cache warm (a second model), the corruption column drops to PNG decoding.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with RESULTS.open("a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
