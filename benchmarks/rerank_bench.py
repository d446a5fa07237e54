"""Re-ranking: Recall@K and MAP@R with and without aqe / dba / kreciprocal, and what each costs.

Two sets:
  --demo CKPT       a demo retrieval checkpoint's embeddings of the demo's unseen test classes
                    (recipe demo, folder_zeroshot split), embedded once;
  --synthetic N D   N x D clustered unit embeddings with SOP's class sizes (SOP: 60,502 images
                    of 11,316 products; here 2-9 images a class), noisy enough that plain search errs.
Each method runs in its own process (`--only METHOD`), so its peak resident memory is its own;
"RSS growth" is how far the peak rose during the evaluation, over the loaded embeddings and libraries.

    OMP_NUM_THREADS=1 python benchmarks/rerank_bench.py --synthetic 60502 512
    OMP_NUM_THREADS=1 python benchmarks/rerank_bench.py --demo runs/demo/best.safetensors
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("none", "aqe", "dba", "kreciprocal")


def synthetic(count: int, dim: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SOP-like sizes: 2-9 images per class (mean 5.5), each class a noisy stretch around a centre."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 10, count)
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), count) + 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)[:count]
    centres = rng.standard_normal((len(sizes), dim)).astype(np.float32)
    directions = rng.standard_normal((len(sizes), dim)).astype(np.float32)
    steps = rng.uniform(-1.0, 1.0, (count, 1)).astype(np.float32)
    points = centres[labels] + steps * directions[labels]
    points += noise * rng.standard_normal((count, dim)).astype(np.float32)
    return points, labels


def demo_embeddings(weights: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from finegrain.data import ImageDataset
    from finegrain.data.loaders import eval_loader
    from finegrain.eval.embed import image_transform
    from finegrain.eval.retrieval_eval import embed_loader
    from finegrain.models import load_model
    from finegrain.recipes import RetrievalRecipe, load_recipe
    from finegrain.train.retrieval import load_zero_shot_splits

    recipe = load_recipe("demo", [], group="retrieval", schema=RetrievalRecipe)
    test = load_zero_shot_splits(recipe)["test"]
    model = load_model(weights)
    loader = eval_loader(ImageDataset(test.samples, image_transform(model, model.preprocessing)), 32, 0, False)
    embeddings, labels = embed_loader(model, loader, torch.device("cpu"))
    return embeddings.numpy(), labels.numpy()


def run_one(method: str, data: Path) -> dict:
    from finegrain.eval.rerank import Rerank
    from finegrain.eval.retrieval import retrieval_metrics

    arrays = np.load(data, allow_pickle=False)
    embeddings, labels = arrays["embeddings"], arrays["labels"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = retrieval_metrics(embeddings, labels, (1, 2, 4, 8), device="cpu",
                               rerank=None if method == "none" else Rerank(method))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, **report.to_metrics(), "queries": report.n_queries, "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak / 1024), "rss_growth_mb": round((peak - before) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", help="demo retrieval checkpoint")
    parser.add_argument("--synthetic", nargs=2, type=int, metavar=("N", "D"))
    parser.add_argument("--noise", type=float, default=2.2, help="synthetic: noise per coordinate (centres: 1)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--work", default="/tmp/rerank-bench.npz", help="where the embeddings are kept between runs")
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.only:
        print(json.dumps(run_one(args.only, work)))
        return
    embeddings, labels = demo_embeddings(args.demo) if args.demo else synthetic(*args.synthetic, args.noise)
    np.savez(work, embeddings=embeddings.astype(np.float32), labels=labels)
    print(f"{len(embeddings)} x {embeddings.shape[1]} embeddings, {len(np.unique(labels))} classes; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    print("| re-ranking | Recall@1 | Recall@2 | Recall@4 | Recall@8 | MAP@R | seconds | peak RSS (MB) | RSS growth (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        output = subprocess.run([sys.executable, __file__, "--only", method, "--work", str(work)], check=True,
                                capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(f"| {method} | " + " | ".join(f"{100 * row[key]:.2f}" for key in
                                          ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"))
              + f" | {row['seconds']:.1f} | {row['peak_rss_mb']} | {row['rss_growth_mb']} |", flush=True)


if __name__ == "__main__":
    main()
