"""What batch BN normalises over while training (recipe `train.bn_batch`), set up once per run.

- `per_process`: each process's micro-batch, batch_size / (processes x accumulate_steps): it
  changes with the hardware (the release had 64 per GPU for FGVC, 128 for ImageNet).
- `sync`: SyncBatchNorm over the micro-batches of all processes, batch_size / accumulate_steps
  (GPUs; one process is already that).
- `virtual`: ghost BN over groups of `train.bn_virtual_size` images (finegrain.layers.
  ghost_batch_norm), the same groups on any number of processes, with or without accumulation,
  as long as the size divides each process's micro-batch.

With accumulation BN runs `accumulate_steps` forwards per optimizer step, so each forward's
momentum is set to keep the running averages' decay per optimizer step what the recipe says.
"""
from __future__ import annotations

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.layers.ghost_batch_norm import convert_to_ghost_batch_norm
from finegrain.recipes.schema import TrainConfig


def per_forward_momentum(momentum: float, forwards_per_step: int) -> float:
    """The PyTorch momentum whose `forwards_per_step` updates decay the old average as one
    update with `momentum` does: (1 - m') ** k = 1 - m."""
    return 1.0 - (1.0 - momentum) ** (1.0 / forwards_per_step)


def set_batch_norm_batch(model: nn.Module, train: TrainConfig, world_size: int, device: torch.device) -> nn.Module:
    """Make `model`'s BN layers normalise over the batch `train.bn_batch` names; call before
    wrapping the model in DDP and before building the optimizer. Returns the model (SyncBatchNorm
    conversion replaces a BN at the root)."""
    micro_batch = train.batch_size // (world_size * train.accumulate_steps)
    if train.bn_batch == "virtual":
        size = train.bn_virtual_size
        if size is None or micro_batch % size:
            raise FinegrainError(
                f"train.bn_virtual_size {size} must divide each process's micro-batch of {micro_batch} images "
                f"(train.batch_size {train.batch_size} / ({world_size} processes x {train.accumulate_steps} "
                "accumulation steps)). Pick a divisor, or change the batch size or accumulation.")
        convert_to_ghost_batch_norm(model, size)
    elif train.bn_batch == "sync" and world_size > 1:
        if device.type != "cuda":
            raise FinegrainError("train.bn_batch=sync needs GPUs (NCCL). On CPU use --set train.bn_batch=virtual "
                                 "with train.bn_virtual_size, or per_process.")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if train.accumulate_steps > 1:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
                module.momentum = per_forward_momentum(module.momentum, train.accumulate_steps)
    return model
