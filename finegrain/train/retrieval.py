"""Image-retrieval fine-tuning (paper Section 4.4, Appendix C): a recipe plus data and backbone
weights in, a run out.

The embedder (stride-free Stage 4, GeM, 1536-d embedding + BN, L2-normalised) is trained with a
pytorch-metric-learning loss on the training classes and evaluated zero-shot by Recall@K and
MAP@R on the unseen test classes. Evaluation also runs before the first step, so metrics.jsonl's
`epoch: 0` row holds the un-fine-tuned backbone's figures and every run shows what it gained.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from finegrain.data.base import Split
from finegrain.errors import FinegrainError
from finegrain.eval.retrieval_eval import embed_loader
from finegrain.models import CheckpointInfo, DataRecord, create_embedder
from finegrain.models.metadata import to_metadata
from finegrain.preprocessing import Preprocessing
from finegrain.recipes import Recipe, RetrievalRecipe
from finegrain.data import resolve_data_root
from finegrain.train.fgvc import recipe_data_record
from finegrain.train.metric_losses import create_metric_loss
from finegrain.train.optim import ParamGroupSpec
from finegrain.train.selection import keep_record, metric_key, validation_split
from finegrain.train.trainer import Task, TrainBatch, Trainer
from finegrain.train.warm_start import warm_start


# ------------------------------------------------------------------------------------- batches
class MPerClassBatches(Sampler[list[int]]):
    """The trainer's EpochBatches interface (steps_per_epoch, set_epoch(epoch, skip), state_dict)
    over finegrain.data's MPerClassBatchSampler, whose batches depend only on (seed, epoch)."""

    paired = False

    def __init__(self, split: Split, m: int, batch_size: int, seed: int) -> None:
        from finegrain.data.samplers import MPerClassBatchSampler

        self.sampler = MPerClassBatchSampler(split, m, batch_size, seed)
        self.seed, self.m, self.epoch, self.skip = seed, m, 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "m": self.m, "epoch": self.epoch, "skip": self.skip}


# ---------------------------------------------------------------------------------------- task
class _Embeddings(nn.Module):
    """`model.forward_embedding` as a module's forward: what the trainer runs and the loss sees."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_embedding(images)


class RetrievalTask(Task):
    """A pml loss on the embeddings; zero-shot Recall@K / MAP@R on the test classes."""

    best_metric = "recall@1"
    evaluate_at_start = True

    def __init__(self, recipe: RetrievalRecipe, num_classes: int, data: DataRecord | None = None) -> None:
        section = recipe.retrieval
        self.criterion = create_metric_loss(section.loss.name, num_classes, section.embedding_size,
                                            section.loss.args, recipe.regularization.label_smoothing)
        self.trainable = self.criterion
        self.loss_lr_mult, self.gem_lr_mult = section.loss.lr_mult, section.gem_lr_mult
        self.recall_ks = tuple(section.recall_ks)
        self.data = data  # recorded in the checkpoints: `--eval-only` and `robustness` find the data again

    def training_module(self, model: nn.Module) -> nn.Module:
        return _Embeddings(model)

    def loss(self, model: nn.Module, batch: TrainBatch) -> Tensor:
        return self.criterion(model(batch.images), batch.labels)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device,
                 dtype: torch.dtype | None, channels_last: bool) -> dict[str, float]:
        from finegrain.eval.retrieval import retrieval_metrics

        embeddings, labels = embed_loader(model, loader, device, dtype, channels_last)
        return retrieval_metrics(embeddings, labels, self.recall_ks, device=device).to_metrics()

    def param_groups(self, model: nn.Module) -> list[ParamGroupSpec]:
        """The loss's weights (recipe weight decay, their lr multiplier); a learnable GeM p without
        weight decay (as in cirtorch: decay would drag p towards 0, a geometric mean, whatever the data)."""
        groups = []
        loss_params = [p for p in self.criterion.parameters() if p.requires_grad]
        if loss_params:
            groups.append(ParamGroupSpec(loss_params, "loss", lr_mult=self.loss_lr_mult))
        p = getattr(getattr(model, "global_pool", None), "p", None)
        if isinstance(p, nn.Parameter) and p.requires_grad:
            groups.append(ParamGroupSpec([p], "gem_p", lr_mult=self.gem_lr_mult, weight_decay=0.0))
        return groups

    def checkpoint_metadata(self) -> dict[str, str]:
        return to_metadata(CheckpointInfo(task="retrieval", recall_ks=self.recall_ks, data=self.data))


# ---------------------------------------------------------------------------------- model, data
def retrieval_preprocessing(recipe: Recipe, base: Preprocessing) -> Preprocessing:
    """The backbone's normalisation, the recipe's train size, and eval at eval_resize squared
    (resize = crop, so tools that centre-crop see the whole image)."""
    eval_size = recipe.data.eval_resize or base.crop
    return dataclasses.replace(base, train_size=recipe.data.train_size or base.train_size,
                               resize=eval_size, crop=eval_size)


def build_embedder(recipe: RetrievalRecipe, echo: Callable[[str], None], resuming: bool = False) -> nn.Module:
    """The recipe's embedder, everything but the embedding warm-started from model.weights."""
    section = recipe.retrieval
    model = warm_start(lambda name, overrides: create_embedder(name, section.embedding_size, gem_p=section.gem_p,
                                                               learnable_p=section.gem_learnable, **overrides),
                       recipe, echo, resuming, "Retrieval fine-tuning needs a pretrained backbone (--weights FILE) "
                       "to reach the paper's recall.")
    model.preprocessing = retrieval_preprocessing(recipe, model.preprocessing)
    return model


def retrieval_transforms(pre: Preprocessing, autoaugment: str | None) -> tuple[Callable, Callable]:
    """Appendix C: train = squash to train_size or enlarge + random crop, flip (+ AutoAugment for
    CARS196, Table 18); eval = squash to the eval size, no crop."""
    from finegrain.data.transforms import retrieval_eval_transform, retrieval_train_transform

    return retrieval_train_transform(pre, pre.train_size, autoaugment), retrieval_eval_transform(pre, size=pre.crop)


def load_zero_shot_splits(recipe: Recipe) -> dict[str, Split]:
    from finegrain.data import load_splits

    splits = load_splits(recipe.data.kind, resolve_data_root(recipe.data.root), **recipe.data.options)
    if set(splits["train"].classes) & set(splits["test"].classes):
        raise FinegrainError(f"The {recipe.data.kind} splits share classes; retrieval is evaluated on unseen classes. "
                             "Use a zero-shot kind (sop, cub200, cars196_retrieval, folder_zeroshot).")
    return splits


# ------------------------------------------------------------------------------------------ runs
def run_retrieval(recipe: RetrievalRecipe, run_dir: str | Path, resume: bool = False,
                  device: torch.device | None = None, progress: bool = True,
                  echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune per `recipe` into `run_dir`; returns the trainer's summary plus "start", the
    epoch-0 row (the un-fine-tuned embeddings)."""
    from finegrain.data import ImageDataset

    echo = echo or (lambda message: print(message, file=sys.stderr))
    splits = load_zero_shot_splits(recipe)
    test = splits["test"]  # validation, like test, is on classes training never sees
    train, val, record = validation_split(recipe, resolve_data_root(recipe.data.root), splits["train"],
                                          by_class=True)
    torch.manual_seed(recipe.train.seed)  # the embedding head and the loss's class weights start random
    model = build_embedder(recipe, echo, resuming=resume)
    task = RetrievalTask(recipe, len(train.classes), recipe_data_record(recipe))
    pre = model.preprocessing
    train_transform, eval_transform = retrieval_transforms(pre, recipe.regularization.autoaugment)
    train_set, test_set = ImageDataset(train.samples, train_transform), ImageDataset(test.samples, eval_transform)
    val_set = ImageDataset(val.samples, eval_transform) if val is not None else None
    held_out = f"{len(val)} validation images of {len(val.classes)} other classes, " if val is not None else ""
    echo(f"{recipe.name}: {len(train)} train images of {len(train.classes)} classes, {held_out}{len(test)} test "
         f"images of {len(test.classes)} unseen classes; {recipe.model.name} -> {recipe.retrieval.embedding_size}-d, "
         f"loss {recipe.retrieval.loss.name}, train {pre.train_size} / eval {pre.crop} px, run dir {run_dir}")
    batches = (MPerClassBatches(train, recipe.retrieval.m_per_class, recipe.train.batch_size, recipe.train.seed)
               if recipe.retrieval.m_per_class else None)
    trainer = Trainer(recipe, model, task, train_set, val_set or test_set, run_dir, device=device, progress=progress,
                      echo=echo, batches=batches, test_set=test_set if val_set is not None else None)
    keep_record(run_dir, record, resume)  # once every input has been checked
    summary = trainer.fit(resume=resume)
    start = next((row for row in trainer.rows if row["epoch"] == 0), {})
    summary["start"] = start
    best = next((row for row in trainer.rows if row["epoch"] == summary["best"]["epoch"]), {})
    recall, map_r = metric_key("test", "recall@1"), metric_key("test", "map@r")
    if recall in start and recall in best:
        echo(f"test Recall@1 before fine-tuning (epoch 0): {100 * start[recall]:.2f}%, after: "
             f"{100 * best[recall]:.2f}% (best, epoch {best['epoch']}, selected on {trainer.select_on}); "
             f"MAP@R {100 * start[map_r]:.2f}% -> {100 * summary['last'].get(map_r, float('nan')):.2f}% (last)")
    return summary



def evaluate_saved_embedder(weights: Path, recipe_name: str | None, data: Path | None,
                            overrides: list[str], rerank: Any = None,
                            singletons: str = "exclude") -> tuple[RetrievalRecipe, Any]:
    """Recall@K / MAP@R of a saved embedder on its recipe's unseen test classes.

    The recipe is the one given, else the run directory's resolved recipe.yaml beside the
    weights, else the one the checkpoint records; the data folder likewise defaults to the one
    the checkpoint was trained on. `rerank`: an eval.rerank.Rerank; `singletons`: "exclude" or "miss"
    (eval.query_gallery). Returns (recipe, RetrievalReport,
    or a QueryGalleryReport where the data set has a separate query set and gallery).
    """
    from finegrain.eval.retrieval_eval import evaluate_retrieval
    from finegrain.models import read_info
    from finegrain.recipes import load_recipe

    info = read_info(weights)
    beside = weights.parent / "recipe.yaml"
    recipe_name = recipe_name or (str(beside) if beside.is_file() else info.recipe)
    if recipe_name is None:
        raise FinegrainError(f"{weights} does not record its recipe. Pass --recipe NAME (its data and Recall@K).")
    if data is None and info.data is not None:
        data = Path(info.data.root)
    data_override = [f"data.root={json.dumps(str(data))}"] if data else []
    recipe = load_recipe(recipe_name, overrides + data_override, group="retrieval", schema=RetrievalRecipe)
    splits = load_zero_shot_splits(recipe)
    report = evaluate_retrieval(weights, splits.get("query", splits["test"]), recipe.retrieval.recall_ks,
                                recipe.train.eval_batch_size or recipe.train.batch_size, recipe.train.workers,
                                gallery=splits.get("gallery"), rerank=rerank, singletons=singletons)
    return recipe, report
