"""Inference throughput, ours vs torchvision's ResNet-50, measured side by side in one process.

Prints images/s at batch 64 (the paper's protocol) for each configuration, interleaving the
timed runs (round-robin) so drift in machine load hits every configuration alike, and the
ratios the backbone issue asks for. bf16 agreement is measured on the shipped demo photos
with BN statistics calibrated on them (random weights give O(1) activations but no meaning),
and on the real ImageNet-pretrained EfficientNet-Lite0 when its package is installed.

    python benchmarks/throughput.py [--batch 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import torchvision

import finegrain
from finegrain.data import ImageDataset, demo_root, load_splits
from finegrain.data.transforms import eval_transform
from finegrain.eval.inference import InferenceOptions, Predictor
from finegrain.eval.throughput import time_once
from finegrain.preprocessing import IMAGENET


def demo_batch(size: int, count: int = 64) -> torch.Tensor:
    pre = IMAGENET.with_eval_size(size)
    dataset = ImageDataset(load_splits("folder", demo_root())["test"].samples[:count], eval_transform(pre))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def calibrate(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Random BN gammas, then running statistics estimated on real photos (cumulative average)."""
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5, generator=gen)
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


FAST_FP32 = InferenceOptions(channels_last=True, fold_bn=True)
FAST_BF16 = InferenceOptions(dtype=torch.bfloat16, channels_last=True, fold_bn=True)


def agreement(model: torch.nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean cosine of the embeddings) between the FP32 and bf16 fast paths."""
    cpu = torch.device("cpu")
    fp32, bf16 = Predictor(model, cpu, FAST_FP32), Predictor(model, cpu, FAST_BF16)
    top1 = float((fp32(images).argmax(1) == bf16(images).argmax(1)).float().mean())
    cosine = float(F.cosine_similarity(fp32.embed(images), bf16.embed(images)).mean())
    return top1, cosine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    tv = torchvision.models.resnet50(weights=None).eval()
    ours = finegrain.create_model("resnet50").eval()
    ours.load_state_dict(tv.state_dict())
    assemble = finegrain.create_model("assemble_resnet50").eval()
    x224 = torch.randn(args.batch, 3, 224, 224)
    x256 = torch.randn(args.batch, 3, 256, 256)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    tv_cl = torchvision.models.resnet50(weights=None).eval().to(memory_format=torch.channels_last)
    configs = {
        "torchvision resnet50 @224": (tv, x224),
        "finegrain resnet50 @224": (ours, x224),
        "torchvision resnet50 @224 channels_last": (tv_cl, cl(x224)),
        "finegrain resnet50 @224 fast FP32": (Predictor(ours, cpu, FAST_FP32), x224),
        "finegrain resnet50 @224 fast bf16": (Predictor(ours, cpu, FAST_BF16), x224),
        "assemble_resnet50 @256": (assemble, x256),
        "assemble_resnet50 @256 fast FP32": (Predictor(assemble, cpu, FAST_FP32), x256),
        "assemble_resnet50 @256 fast bf16": (Predictor(assemble, cpu, FAST_BF16), x256),
    }
    cpu_time = lambda model, x: time_once(torch.inference_mode()(model), x, cpu)  # noqa: E731
    for model, x in configs.values():  # warm-up: oneDNN primitive creation, allocator
        cpu_time(model, x)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (model, x) in configs.items():
            times[name].append(cpu_time(model, x))
    rate = {name: args.batch / statistics.median(values) for name, values in times.items()}
    base = rate["torchvision resnet50 @224"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, median of {args.rounds}")
    for name, value in rate.items():
        print(f"{name:45s} {value:8.1f} img/s  x{value / base:.2f} vs torchvision eager")
    print(f"finegrain resnet50 / torchvision resnet50 (eager):         {rate['finegrain resnet50 @224'] / base:.2f}")
    print(f"fast FP32 / torchvision channels_last:                     "
          f"{rate['finegrain resnet50 @224 fast FP32'] / rate['torchvision resnet50 @224 channels_last']:.2f}")
    print(f"fast bf16 / fast FP32 (resnet50):                          "
          f"{rate['finegrain resnet50 @224 fast bf16'] / rate['finegrain resnet50 @224 fast FP32']:.2f}")
    print(f"fast FP32 / eager (assemble_resnet50):                     "
          f"{rate['assemble_resnet50 @256 fast FP32'] / rate['assemble_resnet50 @256']:.2f}")
    print(f"fast bf16 / fast FP32 (assemble_resnet50):                 "
          f"{rate['assemble_resnet50 @256 fast bf16'] / rate['assemble_resnet50 @256 fast FP32']:.2f}")
    print(f"Assemble-R50@256 / torchvision R50@224 (paper GPU: 0.58):  {rate['assemble_resnet50 @256'] / base:.2f}")
    images = demo_batch(256)
    for name in ("resnet50", "assemble_resnet50"):
        torch.manual_seed(0)  # the same random network on every run
        top1, cosine = agreement(calibrate(finegrain.create_model(name), images), images)
        print(f"bf16 vs FP32 on demo photos, {name} (calibrated BN): top-1 agreement {top1:.3f}, feature cosine {cosine:.5f}")


if __name__ == "__main__":
    main()
