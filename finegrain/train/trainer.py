"""The core trainer: one loop for FGVC fine-tuning, retrieval and backbone pretraining.

What differs between those lives in a `Task` (the loss on a batch, the evaluation metrics, the
metric that picks the best checkpoint, extra trainable modules such as a loss's class weights);
everything the paper's recipes share lives here: SGD + warmup/cosine per step, the BN momentum
rule, AMP, channels_last, Mixup type 1/2, the DropBlock keep_prob schedule, per-epoch
evaluation, atomic checkpoints, exact resume and Ctrl-C safety.

A run directory holds recipe.yaml, metrics.jsonl, curves.png, last.safetensors,
best.safetensors (chosen on the split recipe.eval.select_on names: finegrain.train.selection),
validation.json (the held-out part, with select_on val), ema.safetensors (with recipe.ema:
finegrain.train.ema) and resume_state.pt, written at step boundaries only (finegrain.train.resume
says why that makes resuming exact) and never with a non-finite weight.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from finegrain import distributed
from finegrain.data.loaders import epoch_loader, eval_loader
from finegrain.data.samplers import EpochBatches
from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path
from finegrain.models import save_model, set_drop_block_keep_prob
from finegrain.recipes import Recipe, recipe_to_yaml
from finegrain.runtime import autocast, default_device
from finegrain.train import report, selection
from finegrain.train.batch_norm import set_batch_norm_batch
from finegrain.train.ema import WeightEma
from finegrain.train.mixup import Mixup, TrainBatch
from finegrain.train.resume import (RESUME_FILE, StopRequest, capture_state, check_weights, diverged,
                                    load_resume_state, restore_state, save_resume_state, step_seed)
from finegrain.train.optim import (ParamGroupSpec, WarmupCosine, bn_momentum_rule, build_sgd, linear_schedule,
                                   set_bn_momentum, torch_bn_momentum)


def split_batch(batch: TrainBatch, chunks: int) -> list[TrainBatch]:
    """`chunks` equal micro-batches of a batch, for gradient accumulation (1: the batch itself)."""
    if chunks == 1:
        return [batch]
    if len(batch.labels) % chunks:
        raise FinegrainError(f"A batch of {len(batch.labels)} does not split into {chunks} accumulation steps. "
                             "Pick train.batch_size divisible by processes x train.accumulate_steps.")
    fields = {name: value for name, value in vars(batch).items() if value is not None}
    parts = {name: value.chunk(chunks) for name, value in fields.items()}
    return [TrainBatch(**{name: chunk[i] for name, chunk in parts.items()}) for i in range(chunks)]


class Task:
    """What a kind of training adds to the loop. Subclass and override `loss` and `evaluate`."""

    best_metric: str = "top1"  # higher is better; picks best.safetensors (metrics.jsonl: val_top1 / test_top1)
    evaluate_at_start: bool = False  # log an `epoch: 0` row before training (retrieval does)
    # Trainable modules beyond the model (e.g. a metric-learning loss with class weights):
    # moved to the device, trained, and saved in the resume state.
    trainable: nn.Module | None = None

    def loss(self, model: nn.Module, batch: TrainBatch) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device,
                 dtype: torch.dtype | None, channels_last: bool) -> dict[str, float]:
        raise NotImplementedError

    def training_module(self, model: nn.Module) -> nn.Module:
        """The module `loss` receives: its forward is what training calls (DDP wraps this one,
        and only its forward synchronises gradients)."""
        return model

    def param_groups(self, model: nn.Module) -> list[ParamGroupSpec]:
        """Parameters with their own lr multiplier / weight decay (default: none)."""
        return []

    def checkpoint_metadata(self) -> dict[str, str]:
        """Extra safetensors metadata written with every checkpoint (e.g. class names)."""
        return {}


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed) for a recipe's `train.amp`."""
    if mode == "fp32":
        return None, False
    if device.type == "cuda":
        if mode == "auto":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return (torch.bfloat16, False) if mode == "bf16" else (torch.float16, True)
    if mode == "fp16":
        raise FinegrainError("train.amp=fp16 needs a CUDA GPU. Use --set train.amp=bf16 or fp32 on CPU.")
    return (torch.bfloat16, False) if mode == "bf16" else (None, False)  # auto on CPU: fp32


class Trainer:
    """Train `model` on `train_set` with `task`, evaluating on `eval_set` every epoch."""

    save_interval_s: float = 600.0  # a mid-epoch resume state at least this often (a kill loses less)

    def __init__(self, recipe: Recipe, model: nn.Module, task: Task, train_set: Dataset, eval_set: Dataset,
                 run_dir: str | Path, device: torch.device | None = None, progress: bool = True,
                 echo: Callable[[str], None] | None = None, batches: Any = None,
                 test_set: Dataset | None = None) -> None:
        """`eval_set`: the split recipe.eval.select_on names (the validation part, or the test
        split); `test_set`: the test split, evaluated once at the end when selecting on val.
        `batches`: another batch sampler with EpochBatches' interface (finegrain.data.samplers),
        e.g. m-per-class batches; the schedule is sized from its steps per epoch."""
        self.recipe, self.model, self.task = recipe, model, task
        self.select_on = recipe.eval.select_on
        if self.select_on == "val" and test_set is None:
            raise FinegrainError("eval.select_on=val chooses best.safetensors on a validation part and evaluates "
                                 "the test split once at the end: pass the test split as test_set, or set "
                                 "eval.select_on=test.")
        self.train_set, self.eval_set, self.test_set = train_set, eval_set, test_set
        self.run_dir = Path(run_dir)
        self.dist = distributed.init_distributed()  # one process unless started by torchrun
        self.device = distributed.device_for(self.dist) if self.dist.enabled else (device or default_device())
        self.progress = progress and self.dist.is_main
        echo = echo or (lambda message: tqdm.write(message, file=sys.stderr))
        self.echo = echo if self.dist.is_main else (lambda message: None)
        train = recipe.train
        self.amp_dtype, use_scaler = resolve_amp(train.amp, self.device)
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        mix = recipe.regularization.mixup
        self.mixup = Mixup(mix.type, mix.alpha, train.seed, self.dist.rank)
        self.batches = batches or EpochBatches(len(train_set), train.batch_size, train.seed, paired=self.mixup.paired)
        if self.mixup.paired and not self.batches.paired:
            raise FinegrainError("Mixup type 1 needs paired batches (two independently loaded halves); this batch "
                                 "sampler gives single ones. Use regularization.mixup.type=2 or null.")
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = train.epochs * self.steps_per_epoch
        self.model.to(self.device, memory_format=self.memory_format)
        if task.trainable is not None:
            task.trainable.to(self.device)
        if train.bn_momentum_rule:
            set_bn_momentum(self.model, bn_momentum_rule(self.steps_per_epoch))
        elif train.bn_momentum is not None:
            set_bn_momentum(self.model, torch_bn_momentum(train.bn_momentum))
        self.model = set_batch_norm_batch(self.model, train, self.dist.world_size, self.device)
        self.train_model = self._data_parallel(task.training_module(self.model))
        self.trained = nn.ModuleList([self.model] + ([task.trainable] if task.trainable is not None else []))
        self.ema = WeightEma(self.model, recipe.ema.decay, recipe.ema.warmup) if recipe.ema.enabled else None
        self.optimizer = build_sgd(self.trained, recipe.effective_lr(), recipe.optim.momentum,
                                   recipe.optim.weight_decay, recipe.optim.nesterov, task.param_groups(self.model))
        warmup_steps = round(recipe.schedule.warmup_epochs * self.steps_per_epoch)
        self.scheduler = WarmupCosine(self.optimizer, self.total_steps, min(warmup_steps, self.total_steps),
                                      recipe.schedule.final_lr / recipe.effective_lr())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.global_step = 0
        self.position: tuple[int, int, float] = (0, 0, 0.0)  # (epochs done, steps done in the next, loss sum)
        self._saved_at: tuple[int, int] | None = None  # (epoch, global step) of the newest resume state
        self._last_save = time.monotonic()
        self._in_step = False  # between a step's first change to the model and its last
        self._stop = StopRequest()
        self.best: dict[str, Any] = {"metric": selection.metric_key(self.select_on, task.best_metric),
                                     "value": -math.inf, "epoch": 0}
        self.rows: list[dict[str, Any]] = []
        dropblock = recipe.regularization.dropblock
        if (dropblock.start, dropblock.end) != (1.0, 1.0) and set_drop_block_keep_prob(model, dropblock.start) == 0:
            self.echo(f"warning: the recipe sets DropBlock keep_prob {dropblock.start} -> {dropblock.end}, but "
                      f"{getattr(model, 'arch', type(model).__name__)} has no DropBlock layers; it is ignored.")

    def _data_parallel(self, model: nn.Module) -> nn.Module:
        """The module the loss calls: DDP (gradients averaged across ranks) under torchrun."""
        if not self.dist.enabled:
            return model
        train = self.recipe.train
        if train.batch_size % (self.dist.world_size * train.accumulate_steps):
            raise FinegrainError(f"train.batch_size {train.batch_size} (the global batch) must divide by "
                                 f"{self.dist.world_size} processes x {train.accumulate_steps} accumulation steps.")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def _sync_task_gradients(self) -> None:
        """Average the gradients of a task's own parameters (e.g. ArcFace class weights) across ranks."""
        if self.dist.enabled and self.task.trainable is not None:
            for parameter in self.task.trainable.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad /= self.dist.world_size

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag raised on any process (all stop, or diverge, at the same step under torchrun)."""
        if not self.dist.enabled:
            return list(flags)
        votes = torch.tensor([float(flag) for flag in flags], device=self.device)
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        return [bool(vote) for vote in votes.tolist()]

    # ----------------------------------------------------------------------------- state
    @property
    def resume_path(self) -> Path:
        return self.run_dir / RESUME_FILE

    def _save_resume_state(self) -> None:
        """The state at the current step boundary, unless it is the one already on disk."""
        here = (self.position[0], self.global_step)
        if here == self._saved_at:
            return
        check_weights(self)
        if self.dist.is_main:
            save_resume_state(self.resume_path, capture_state(self))
        self._saved_at, self._last_save = here, time.monotonic()

    def _save_model(self, name: str, epoch: int, metrics: dict[str, Any], model: nn.Module | None = None) -> None:
        if not self.dist.is_main:
            return
        save_model(model or self.model, self.run_dir / name, extra_metadata=self.task.checkpoint_metadata(),
                   epoch=epoch, recipe=self.recipe.name,
                   metrics={k: v for k, v in metrics.items() if isinstance(v, float)})

    # ------------------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the recipe's last epoch; returns {"best": {...}, "last": last metrics row}.

        Ctrl-C stops at the next step boundary, saves the resume state there and raises
        KeyboardInterrupt; `fit(resume=True)` in a new Trainer then continues bit-exactly.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and self.recipe.train.threads is not None:
            torch.set_num_threads(self.recipe.train.threads)
        try:
            with StopRequest(announce=self.dist.is_main) as self._stop:
                return self._fit(resume)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, resume: bool) -> dict[str, Any]:
        if resume:
            self.position = restore_state(self, load_resume_state(self.resume_path))
            self._saved_at = (self.position[0], self.global_step)
            self.echo(f"resuming {self.run_dir} after epoch {self.position[0]}, step {self.position[1]}")
        else:
            self.position = (0, 0, 0.0)
            if self.dist.is_main:
                with atomic_path(self.run_dir / "recipe.yaml") as tmp:
                    tmp.write_text(recipe_to_yaml(self.recipe))
            if self.task.evaluate_at_start:  # where the run starts from, on every split
                start = selection.evaluate_epoch(self, every_split=True)
                self._log_row({"epoch": 0, "loss": None, "lr": None, **start})
            self._save_resume_state()  # a run killed in its first epoch resumes too
        try:
            while self.position[0] < self.recipe.train.epochs:
                self._stop_if_asked()
                start = time.perf_counter()
                train_row = self._train_epoch()
                check_weights(self)
                metrics = selection.evaluate_epoch(self)
                throughput = train_row.pop("images_per_s")
                self._finish_epoch({**train_row, **metrics, "time": round(time.perf_counter() - start, 3),
                                    "images_per_s": throughput})
            test = selection.evaluate_test_once(self) if self.select_on == "val" else None
        except KeyboardInterrupt:
            if not self._in_step:  # a Ctrl-C raised outside our handler, between steps: still a boundary
                self._save_resume_state()
            self.echo(f"interrupted: the resume state in {self.resume_path} is at epoch {self._saved_at[0]}, "
                      f"global step {self._saved_at[1]}; continue with --resume")
            raise
        return {"best": dict(self.best), "last": self.rows[-1] if self.rows else {}, "test": test}

    def _stop_if_asked(self) -> None:
        """At a step boundary: on Ctrl-C (on any process), save the resume state and stop."""
        if self._agree(self._stop.requested)[0]:
            self._save_resume_state()
            raise KeyboardInterrupt
        if time.monotonic() - self._last_save >= self.save_interval_s:
            self._save_resume_state()

    def _train_epoch(self) -> dict[str, Any]:
        epoch, skip, loss_sum = self.position
        self.model.train()
        if self.recipe.train.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if self.task.trainable is not None:
            self.task.trainable.train()
        self.batches.set_epoch(epoch, skip)
        loader = epoch_loader(self.train_set, self.batches, self.recipe.train.workers, self.device.type == "cuda",
                              self.dist)
        bar = tqdm(loader, total=self.steps_per_epoch, initial=skip, leave=False, file=sys.stderr,
                   desc=f"epoch {epoch + 1}/{self.recipe.train.epochs}", disable=not self.progress)
        images_seen, start = 0, time.perf_counter()
        for step, items in enumerate(bar, start=skip):
            lr = self._lr(self.global_step)
            loss = self._step(items)
            loss_sum += loss
            self.position = (epoch, step + 1, loss_sum)
            images_seen += len(items[1]) // (2 if self.batches.paired else 1)
            bar.set_postfix(loss=f"{loss_sum / (step + 1):.4f}", lr=f"{lr:.3g}",
                            img_s=f"{images_seen / (time.perf_counter() - start):.1f}")
            if step + 1 < self.steps_per_epoch:  # the epoch's end is a boundary of its own, after evaluation
                self._stop_if_asked()
        bar.close()  # the row's lr is its last step's, even when a resumed epoch had none left to run
        return {"epoch": epoch + 1, "loss": loss_sum / self.steps_per_epoch, "lr": self._lr(self.global_step - 1),
                "images_per_s": round(images_seen / max(time.perf_counter() - start, 1e-9), 2)}

    def _lr(self, step: int) -> float:
        """The scheduled lr of global step `step` (of the default group, what metrics report)."""
        return (self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](step)
                / self.optimizer.param_groups[0]["lr_mult"])

    def _step(self, items: list[Tensor]) -> float:
        """One optimisation step, with torch's RNG (DropBlock masks, ...) seeded by its place in the run."""
        dropblock = self.recipe.regularization.dropblock
        set_drop_block_keep_prob(self.model, linear_schedule(self.global_step, self.total_steps,
                                                             dropblock.start, dropblock.end))
        batch = self.mixup(items[0].to(self.device, non_blocking=True), items[1].to(self.device).long(),
                           items[2].to(self.device).long(), self.global_step)
        batch.images = batch.images.contiguous(memory_format=self.memory_format)
        chunks = self.recipe.train.accumulate_steps
        self.optimizer.zero_grad(set_to_none=True)
        value = 0.0
        self._in_step = True
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(step_seed(self.recipe.train.seed, self.global_step, self.dist.rank))
            for index, micro in enumerate(split_batch(batch, chunks)):
                last = index == chunks - 1
                sync = contextlib.nullcontext() if last or not self.dist.enabled else self.train_model.no_sync()
                with sync:
                    with autocast(self.device, self.amp_dtype):
                        loss = self.task.loss(self.train_model, micro) / chunks
                    self.scaler.scale(loss).backward()
                value += float(loss.detach())
        self._sync_task_gradients()
        grads = [p.grad for p in self.trained.parameters() if p.grad is not None]
        # With a grad scaler (fp16) an overflow is expected now and then: the scaler skips that step.
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads and not self.scaler.is_enabled() else 0.0
        if self._agree(not math.isfinite(value) or not math.isfinite(norm))[0]:
            self._in_step = False  # nothing was updated: the weights are still those of the boundary
            raise diverged(self, self.global_step + 1, f"the loss is {value:g}, the gradient norm {norm:g}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.global_step)
        self._in_step = False
        return value

    def evaluate_on(self, dataset: Dataset, model: nn.Module | None = None) -> dict[str, float]:
        """The task's metrics of `model` (default: the trained weights) on `dataset`."""
        train = self.recipe.train
        shard = dataset
        if self.dist.enabled:  # contiguous shards, no padding; predict_logits gathers them in order
            shard = Subset(dataset, distributed.shard_range(len(dataset), self.dist.rank, self.dist.world_size))
        loader = eval_loader(shard, train.eval_batch_size or train.batch_size, train.workers,
                             self.device.type == "cuda")
        models = [self.model] + ([self.task.trainable] if self.task.trainable is not None else [])
        modes = [m.training for m in models]
        try:
            return self.task.evaluate(model or self.model, loader, self.device, self.amp_dtype, train.channels_last)
        finally:
            for module, mode in zip(models, modes):
                module.train(mode)

    def _finish_epoch(self, row: dict[str, Any]) -> None:
        epoch, metric = row["epoch"], self.best["metric"]
        value = row.get(metric)
        if not isinstance(value, float):
            raise FinegrainError(f"The task's evaluation gave no '{metric}' (got {sorted(row)}). "
                                 "Fix the task's best_metric.")
        self._save_model("last.safetensors", epoch, row)
        if self.ema is not None:
            self._save_model("ema.safetensors", epoch, selection.ema_checkpoint_metrics(row), self.ema.module)
        if value >= self.best["value"]:  # a tie goes to the later epoch: trained longer, at a lower lr
            self.best = {"metric": metric, "value": value, "epoch": epoch}
            if self.dist.is_main:
                with atomic_path(self.run_dir / "best.safetensors") as tmp:
                    shutil.copyfile(self.run_dir / "last.safetensors", tmp)
        self._log_row(row)
        self.position = (epoch, 0, 0.0)
        self._save_resume_state()
        distributed.barrier()

    def _log_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write_rows()
        if not self.dist.is_main:
            return
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in row.items() if v is not None)
        self.echo(shown)

    def write_rows(self) -> None:
        """metrics.jsonl and curves.png (the selected epoch marked) as the rows stand."""
        if self.dist.is_main:
            report.write_metrics(self.run_dir, self.rows)
            report.plot_curves(self.rows, self.run_dir / report.CURVES_FILE, title=self.recipe.name,
                               selected=self.best if self.best["epoch"] else None)
