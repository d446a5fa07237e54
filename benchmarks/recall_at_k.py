"""Recall@K / MAP@R at Stanford Online Products scale: finegrain's faiss search vs pml's AccuracyCalculator.

Synthetic embeddings shaped like SOP's test set (60,502 x 1536, 11,316 classes of 2-12 items),
noisy enough that Recall@1 is well below 1. Each method runs in its own spawned process so
its peak memory beyond the embeddings is the growth of ru_maxrss (faiss allocates outside Python,
where tracemalloc cannot see), and time is the metric call alone.

    .venv/bin/python benchmarks/recall_at_k.py              # full SOP scale (minutes per method)
    .venv/bin/python benchmarks/recall_at_k.py --scale 0.05 # quick check
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

SOP_ITEMS, SOP_CLASSES, DIM = 60_502, 11_316, 1536
MIN_CLASS_SIZE, MAX_CLASS_SIZE = 2, 12
SOP_KS = (1, 10, 100, 1000)
METHODS = {
    "finegrain K=1,10,100,1000 + MAP@R": "ours_deep",
    "finegrain K=1 + MAP@R": "ours_shallow",
    'pml AccuracyCalculator(k="max_bin_count")': "pml",
}


def class_sizes(num_items: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """`num_classes` sizes in [2, 12] summing to `num_items`, spread at random like SOP's classes."""
    sizes = np.full(num_classes, MIN_CLASS_SIZE)
    while (missing := num_items - sizes.sum()) > 0:
        open_classes = np.flatnonzero(sizes < MAX_CLASS_SIZE)
        np.add.at(sizes, rng.choice(open_classes, size=min(missing, len(open_classes))), 1)
        sizes = np.minimum(sizes, MAX_CLASS_SIZE)
    return sizes


def synthetic_embeddings(num_items: int, num_classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised ``[N, 1536]`` float32 embeddings and ``[N]`` labels.

    Item = class centre (unit norm) + Gaussian noise whose scale varies per class (0.75-1.25 x
    `noise`), so classes range from easy to hopeless and Recall@K rises gradually with K.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), class_sizes(num_items, num_classes, rng)))
    centres = rng.standard_normal((num_classes, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    class_noise = (noise * rng.uniform(0.75, 1.25, num_classes)).astype(np.float32)
    embeddings = np.empty((num_items, DIM), dtype=np.float32)
    for start in range(0, num_items, 8192):
        block = centres[labels[start : start + 8192]]
        block += class_noise[labels[start : start + 8192], None] * rng.standard_normal(block.shape, dtype=np.float32)
        embeddings[start : start + 8192] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return embeddings, labels


def _run_method(method: str, data_dir: str, ks: tuple[int, ...], queue: multiprocessing.Queue) -> None:
    """Child process: load the data, then time one metric call and its ru_maxrss growth."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from finegrain.eval.retrieval import retrieval_metrics

    embeddings = np.load(Path(data_dir) / "embeddings.npy")
    labels = np.load(Path(data_dir) / "labels.npy")
    if method == "pml":
        embeddings, labels = torch.from_numpy(embeddings), torch.from_numpy(labels)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "pml":
        calculator = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count", device=torch.device("cpu")
        )
        result = calculator.get_accuracy(embeddings, labels, embeddings, labels, ref_includes_query=True)
        values = {"recall@1": result["precision_at_1"], "map@r": result["mean_average_precision_at_r"]}
    else:
        report = retrieval_metrics(embeddings, labels, ks if method == "ours_deep" else (1,), device="cpu")
        values = report.to_metrics()
    seconds = time.perf_counter() - start
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    queue.put({"seconds": seconds, "extra_mb": extra_mb, "values": values})


def measure(method: str, data_dir: str, ks: tuple[int, ...]) -> dict:
    """Run `method` in a fresh spawned process so memory peaks do not mix."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_method, args=(method, data_dir, ks, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        return {"failed": f"exit code {process.exitcode}"}
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of SOP's items and classes (1.0 = full)")
    parser.add_argument(
        "--noise", type=float, default=0.08, help="mean per-dimension noise around the unit-norm class centres"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS.values()), default=list(METHODS.values()))
    args = parser.parse_args()

    num_items, num_classes = round(SOP_ITEMS * args.scale), round(SOP_CLASSES * args.scale)
    ks = tuple(k for k in SOP_KS if k < num_items)
    embeddings, labels = synthetic_embeddings(num_items, num_classes, args.noise, args.seed)
    print(f"{num_items:,} x {DIM} embeddings, {num_classes:,} classes of {MIN_CLASS_SIZE}-{MAX_CLASS_SIZE}, "
          f"{embeddings.nbytes / 2**20:.0f} MB; noise {args.noise}; K = {ks}")
    with tempfile.TemporaryDirectory() as data_dir:
        np.save(Path(data_dir) / "embeddings.npy", embeddings)
        np.save(Path(data_dir) / "labels.npy", labels)
        del embeddings
        results = {}
        for name, method in METHODS.items():
            if method in args.methods:
                results[name] = measure(method, data_dir, ks)
                print(f"  {name}: {json.dumps(results[name])}", flush=True)

    columns = [f"recall@{k}" for k in ks] + ["map@r"]
    print("\n| method | time (s) | peak extra memory (MB) | " + " | ".join(columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for name, result in results.items():
        if "failed" in result:
            print(f"| {name} | failed: {result['failed']} |")
            continue
        values = " | ".join(f"{result['values'][c]:.6f}" if c in result["values"] else "-" for c in columns)
        print(f"| {name} | {result['seconds']:.1f} | {result['extra_mb']:.0f} | {values} |")
    pml = results.get(next(n for n, m in METHODS.items() if m == "pml"))
    if pml and "failed" not in pml:
        for name, result in results.items():
            if result is pml or "failed" in result:
                continue
            print(f"\n{name} / pml: time x{result['seconds'] / pml['seconds']:.2f}, "
                  f"memory x{result['extra_mb'] / max(pml['extra_mb'], 1):.2f}, "
                  f"|recall@1 - precision_at_1| = {abs(result['values']['recall@1'] - pml['values']['recall@1']):.2e}, "
                  f"|map@r - pml| = {abs(result['values']['map@r'] - pml['values']['map@r']):.2e}")


if __name__ == "__main__":
    main()
