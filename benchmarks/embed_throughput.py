"""Embedding extraction throughput of the retrieval embedder through the one predictor
(finegrain.eval.inference.Predictor.embed): the eager model against the fast path (BN folded,
channels_last), FP32 and bf16, measured side by side in one process.

The configurations are timed round-robin, so drift in machine load hits each alike; images/s is
the median over rounds. Agreement with eager FP32 is measured on the shipped demo photos with BN
statistics estimated on them (random weights give activations, not meaning): mean cosine of the
embeddings, and Recall@1 of the demo's test classes with each path's embeddings.

    python benchmarks/embed_throughput.py [--arch r50d_sk] [--size 256] [--batch 32] [--rounds 3]
        [--device cpu|cuda] [--results benchmarks/RESULTS_retrieval.md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import finegrain
from finegrain.data import ImageDataset, demo_root, load_splits
from finegrain.data.transforms import retrieval_eval_transform
from finegrain.eval.throughput import time_once
from finegrain.eval.inference import InferenceOptions, Predictor, native_bf16
from finegrain.eval.retrieval import retrieval_metrics
from finegrain.fileio import atomic_path

Embed = Callable[[torch.Tensor], torch.Tensor]


def demo_test_images(size: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's zero-shot test classes, squashed to size x size as retrieval evaluates them."""
    test = load_splits("folder_zeroshot", demo_root())["test"]
    dataset = ImageDataset(test.samples, retrieval_eval_transform(model.preprocessing, size))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, torch.tensor(test.labels)


def calibrate(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """BN running statistics estimated on real photos (cumulative average), then eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for chunk in images.split(64):
            model.forward_embedding(chunk)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r50d_sk")
    parser.add_argument("--embedding-size", type=int, default=1536)
    parser.add_argument("--size", type=int, default=256, help="input size (Appendix C evaluates at 256x256)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path, default=None, help="append the figures to this Markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = finegrain.create_embedder(args.arch, args.embedding_size)
    images, labels = demo_test_images(args.size, model)
    model = calibrate(model, images).to(device)
    runs = {"eager forward_embedding FP32": InferenceOptions(),
            "eager forward_embedding bf16 autocast": InferenceOptions(dtype=torch.bfloat16),
            "fast path FP32 (BN folded, channels_last)": InferenceOptions(channels_last=True, fold_bn=True),
            "fast path bf16 (BN folded, channels_last)": InferenceOptions(dtype=torch.bfloat16, channels_last=True,
                                                                          fold_bn=True)}
    configs: dict[str, Embed] = {name: Predictor(model, device, options).embed for name, options in runs.items()
                                 if options.dtype is None or native_bf16(device)}

    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    for embed in configs.values():  # warm-up: oneDNN / cuDNN primitive creation, allocator
        time_once(embed, x, device)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, embed in configs.items():
            times[name].append(time_once(embed, x, device))
    rate = {name: args.batch / statistics.median(values) for name, values in times.items()}

    reference = torch.cat([configs["eager forward_embedding FP32"](chunk) for chunk in images.split(64)]).cpu()
    rows = []
    base = rate["eager forward_embedding FP32"]
    for name, embed in configs.items():
        embeddings = torch.cat([embed(chunk) for chunk in images.split(64)]).cpu()
        cosine = float(F.cosine_similarity(embeddings, reference).mean())
        recall = retrieval_metrics(embeddings, labels, (1,), device="cpu").recall[1]
        rows.append(f"| {name} | {rate[name]:.1f} | {rate[name] / base:.2f} | {cosine:.5f} | {100 * recall:.2f} |")

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/embed_throughput.py", *sys.argv[1:]])
    report = "\n".join([
        f"## Embedding extraction throughput, {args.arch} {args.embedding_size}-d @{args.size} "
        f"({datetime.date.today().isoformat()})",
        "",
        f"`{command}` on {where}, torch {torch.__version__}, batch {args.batch}, median of {args.rounds} "
        "interleaved rounds. Agreement on the demo's 272 zero-shot test images (BN calibrated on them).",
        "",
        "| path | images/s | x eager FP32 | mean cosine vs eager FP32 | demo Recall@1 (%) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    print(report)
    if args.results is not None:
        previous = args.results.read_text() if args.results.is_file() else "# Retrieval benchmark results\n\n"
        with atomic_path(args.results) as tmp:
            tmp.write_text(previous.rstrip("\n") + "\n\n" + report)


if __name__ == "__main__":
    main()
