"""Optimizer, per-step schedules and the BN momentum rule of the paper's recipes.

The schedules are pure functions of the step so they are testable by value and a resumed run
reproduces them exactly; thin wrappers attach them to torch's optimizer and scheduler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from finegrain.errors import FinegrainError


@dataclass
class ParamGroupSpec:
    """Parameters that need their own lr multiplier or weight decay (a loss's class weights,
    GeM's learnable p, ...). Parameters named here leave the model's default groups."""

    params: list[nn.Parameter]
    name: str
    lr_mult: float = 1.0
    weight_decay: float | None = None  # None: the optimizer's weight decay
    extra: dict = field(default_factory=dict)


def is_no_decay(module: nn.Module, param_name: str) -> bool:
    """BN gamma/beta are not decayed (the release); every other weight, biases included, is."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and param_name in {"weight", "bias"}


def param_groups(model: nn.Module, weight_decay: float,
                 extra: Sequence[ParamGroupSpec] = ()) -> list[dict]:
    """SGD param groups: "decay", "no_decay" (BN gamma/beta), then each extra spec.

    Every group carries `lr_mult`, which `WarmupCosine` multiplies into the scheduled lr.
    """
    claimed = {id(p) for spec in extra for p in spec.params}
    if len(claimed) != sum(len(spec.params) for spec in extra):
        raise FinegrainError("A parameter appears in two extra param groups. Give each parameter one group.")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in claimed or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_no_decay(module, name) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "name": "no_decay"},
    ]
    for spec in extra:
        groups.append({"params": list(spec.params), "lr_mult": spec.lr_mult, "name": spec.name,
                       "weight_decay": weight_decay if spec.weight_decay is None else spec.weight_decay,
                       **spec.extra})
    return [g for g in groups if g["params"]]


def build_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = False,
              extra: Sequence[ParamGroupSpec] = ()) -> torch.optim.SGD:
    """SGD with momentum over `param_groups`; each group's lr starts at lr * lr_mult."""
    groups = param_groups(model, weight_decay, extra)
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, final_factor: float = 0.0) -> float:
    """The lr at `step` (0-based) as a fraction of the peak lr.

    Linear warmup from 0 (step / warmup_steps, as in the TF release), then cosine from 1 down to
    `final_factor`, reached after the last step.
    """
    if step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Per-step warmup + cosine on every group (each group keeps its lr_mult via its base lr).

    A LambdaLR subclass so its state (`last_epoch`, `base_lrs`) saves and loads like any
    scheduler; the lambda is rebuilt from the constructor arguments, never pickled.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 final_factor: float = 0.0) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.final_factor = final_factor
        super().__init__(optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, final_factor))

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs),
                "_last_lr": list(self.get_last_lr()), "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        if (state_dict["total_steps"], state_dict["warmup_steps"]) != (self.total_steps, self.warmup_steps):
            raise FinegrainError(
                f"The resume state was written for {state_dict['total_steps']} steps "
                f"({state_dict['warmup_steps']} warmup), this run has {self.total_steps} "
                f"({self.warmup_steps}). Resume with the same recipe and data, or start a new run.")
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = list(state_dict["base_lrs"])
        self._last_lr = list(state_dict["_last_lr"])


def torch_bn_momentum(tf_momentum: float) -> float:
    """PyTorch's BN momentum for a TF one: TF keeps `tf_momentum` of the old running average,
    PyTorch mixes in `momentum` of the new batch (the release's 0.997 is PyTorch's 0.003)."""
    if not 0.0 <= tf_momentum < 1.0:
        raise FinegrainError(f"A TF BN momentum must be in [0, 1), got {tf_momentum}; the release uses 0.997.")
    return 1.0 - tf_momentum


def bn_momentum_rule(steps_per_epoch: int) -> float:
    """PyTorch BN momentum for the paper's TF momentum max(1 - 10/s, 0.9), i.e. min(10/s, 0.1):
    a small data set (few steps per epoch) re-estimates its statistics quickly, a large one
    averages over more batches."""
    if steps_per_epoch < 1:
        raise FinegrainError("Steps per epoch must be at least 1. Use a batch size no larger than the data set.")
    return torch_bn_momentum(max(1.0 - 10.0 / steps_per_epoch, 0.9))


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set every BatchNorm's (PyTorch) momentum; returns how many layers changed."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.momentum = momentum
    return len(layers)


def linear_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """`start` at step 0, `end` at the last step (total_steps - 1), linear between: DropBlock's
    keep_prob decays this way over all training steps."""
    if total_steps <= 1:
        return end
    return start + (end - start) * min(step, total_steps - 1) / (total_steps - 1)

