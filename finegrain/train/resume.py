"""The resume state of a run, and stopping a run where it can be resumed exactly.

Every random draw of training is a pure function of (seed, epoch, step, position): the batch
order (finegrain.data.samplers), each sample's augmentation (finegrain.data.loaders), Mixup's
partners and lambdas (finegrain.train.mixup) and the step's other draws, e.g. DropBlock's masks
(the trainer seeds torch's RNG per step). So the state at a step boundary is only the weights,
the optimizer, the schedule and the position: no RNG stream needs saving, and a run killed at
any point replays identically from its last saved state.

Saved with torch.save and read back with torch.load(weights_only=True), so it holds only
tensors, dicts, lists, numbers and strings.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path
from finegrain.recipes import recipe_to_yaml
from finegrain.train import report

if TYPE_CHECKING:
    from finegrain.train.trainer import Trainer

RESUME_FILE = "resume_state.pt"
RESUME_FORMAT = 3  # 2: no RNG streams (every draw is keyed by its place in the run); 3: the EMA, split names
_KEYS = ("epoch", "step_in_epoch", "global_step", "loss_sum", "model", "task", "optimizer", "scheduler", "scaler",
         "sampler", "best", "recipe", "ema")


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and Python: what a fresh run initialises at random (a new
    head, a model trained from scratch) is reproducible from its recipe."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's RNG during global step `step` on process `rank` (DropBlock masks and
    any other draw inside the forward and backward pass)."""
    return int(np.random.SeedSequence([seed, 0x53544550, step, rank]).generate_state(1, np.uint64)[0])


def capture_state(trainer: Trainer) -> dict[str, Any]:
    """The trainer's state at the current step boundary."""
    epoch, step_in_epoch, loss_sum = trainer.position
    task = trainer.task.trainable
    return {
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": trainer.global_step, "loss_sum": loss_sum,
        "model": trainer.model.state_dict(), "task": task.state_dict() if task is not None else {},
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(), "sampler": trainer.batches.state_dict(), "best": dict(trainer.best),
        "recipe": recipe_to_yaml(trainer.recipe), "ema": trainer.ema.state_dict() if trainer.ema is not None else {},
    }


def restore_state(trainer: Trainer, state: dict[str, Any]) -> tuple[int, int, float]:
    """Put a loaded state back into a trainer built from the run's recipe; returns the position
    (epochs done, steps done in the next, loss sum so far)."""
    unusable = f"The resume state {trainer.resume_path} does not fit this run"
    try:
        if state["sampler"]["seed"] != trainer.batches.seed:
            raise FinegrainError(f"The run was started with seed {state['sampler']['seed']}, this recipe has "
                                 f"{trainer.batches.seed}. Resume with the run's own recipe.yaml.")
        bad = first_non_finite(state["model"].items())
        if bad is not None:
            raise FinegrainError(f"{unusable}: its weights are not finite (first: {bad}). Start a new run with "
                                 "another --out.")
        trainer.model.load_state_dict(state["model"])
        if trainer.task.trainable is not None:
            trainer.task.trainable.load_state_dict(state["task"])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(state["ema"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        position = int(state["epoch"]), int(state["step_in_epoch"]), float(state["loss_sum"])
        trainer.global_step = int(state["global_step"])
        best = state["best"]
        trainer.best = {"metric": str(best["metric"]), "value": float(best["value"]), "epoch": int(best["epoch"])}
    except FinegrainError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise FinegrainError(f"{unusable} ({type(error).__name__}: {str(error)[:200]}). Start a new run with "
                             "another --out.") from None
    steps = trainer.steps_per_epoch
    if position[0] * steps + position[1] != trainer.global_step or not 0 <= position[1] <= steps:
        raise FinegrainError(f"{unusable}: epoch {position[0]}, step {position[1]} is not global step "
                             f"{trainer.global_step}. Start a new run with another --out.")
    trainer.rows = [row for row in report.read_metrics(trainer.run_dir) if row["epoch"] <= position[0]]
    return position


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write the resume state atomically: a kill mid-write leaves the previous one intact."""
    with atomic_path(path) as tmp:
        torch.save({"format": RESUME_FORMAT, **state}, tmp)


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """The resume state at `path`, or one FinegrainError that says how to go on without it."""
    path = Path(path)
    if not path.is_file():
        raise FinegrainError(f"No resume state at {path}. Run without --resume to start a new run, "
                             "or point --out at the run directory to continue.")
    unusable = (f"It cannot be continued: start a new run with another --out, or delete {path} to start "
                f"again in {path.parent}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or malicious: never retried unsafely
        raise FinegrainError(f"The resume state {path} is unreadable (truncated, or not written by finegrain: "
                             f"{type(exc).__name__}). {unusable}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise FinegrainError(f"{path} is not a finegrain resume state. {unusable}")
    if state["format"] != RESUME_FORMAT:
        raise FinegrainError(f"{path} was written by another finegrain version (resume format {state['format']!r}, "
                             f"this one reads {RESUME_FORMAT}). {unusable}")
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise FinegrainError(f"The resume state {path} lacks {', '.join(missing)}. {unusable}")
    return state


class StopRequest:
    """Ctrl-C (SIGINT) while training, as a request the trainer honours at the next step
    boundary, where the resume state is exact; a second Ctrl-C stops at once (the run then
    resumes from its last saved state). Installed only in the main thread, where signals land."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:  # os.write: a handler may run while Python's stderr object is mid-write
            os.write(2, b"\nstopping after this step to save the resume state (Ctrl-C again stops at once)\n")


def diverged(trainer: Trainer, step: int, what: str) -> FinegrainError:
    """The error for global step `step` (1-based) having made training non-finite."""
    lr, amp = trainer.recipe.optim.lr, " (or use train.amp=bf16 / fp32)" if trainer.scaler.is_enabled() else ""
    saved, steps = trainer._saved_at, trainer.steps_per_epoch
    kept = (f"{trainer.resume_path} is still the state at epoch {saved[0]}, global step {saved[1]}"
            if saved is not None else "Nothing was saved")
    return FinegrainError(f"Training diverged at step {step} (epoch {(step - 1) // steps + 1}, "
                          f"step {(step - 1) % steps + 1} of {steps}): {what}. "
                          f"Lower optim.lr (now {lr:g}; e.g. --set optim.lr={lr / 10:g}){amp} and start again "
                          f"with another --out. {kept}; nothing non-finite was written.")


def check_weights(trainer: Trainer) -> None:
    """Before every save: the weights, the EMA and the optimizer buffers the last update left must be finite."""
    buffers = [(f"optimizer state {key}.{name}", value)
               for key, values in trainer.optimizer.state_dict()["state"].items() for name, value in values.items()]
    ema = [(f"ema {key}", value) for key, value in trainer.ema.state_dict().items()] if trainer.ema is not None else []
    bad = first_non_finite(list(trainer.trained.state_dict().items()) + ema + buffers)
    if bad is not None and trainer.global_step == 0:
        raise FinegrainError(f"The starting weights are not finite (first: {bad}). Check model.weights.")
    if bad is not None:
        raise diverged(trainer, trainer.global_step, f"its update made {bad} non-finite")


def first_non_finite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None (one
    device sync for all of them when they are finite)."""
    tensors = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return None
    return next(name for name, t in tensors if not bool(torch.isfinite(t).all()))
