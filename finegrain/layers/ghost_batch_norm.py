"""Ghost batch norm (Hoffer et al. 2017): training-mode BN over fixed-size "virtual" batches.

Plain BN normalises over whatever batch a process's forward receives, so the statistics change
with the number of processes and with gradient accumulation. Ghost BN cuts each batch into
consecutive groups of `virtual_size` samples and normalises each group on its own, exactly as a
BN layer that saw only that group would: a run on 1 GPU with batch 256 and virtual size 64
normalises like the release's 4 GPUs with 64 images each.

The running averages move once per forward toward the mean over groups of each group's
statistics (what averaging the per-group layers' running averages gives), and, under
torch.distributed, over the groups of every process, so every rank holds the statistics one
process would. At evaluation, or on a batch smaller than one group, it is plain BN.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from finegrain.errors import FinegrainError


def ghost_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                     bias: Tensor | None, virtual_size: int, momentum: float, eps: float) -> Tensor:
    """Training-mode BN of x [N, C, *] over consecutive groups of `virtual_size` samples.

    The groups become channels of one fused batch_norm call ([V, G*C, *]), so every group gets
    torch's own kernel (biased variance to normalise, unbiased for the running average). The
    running buffers are updated in place with the mean of the G groups' updates.
    """
    count, channels, rest = x.shape[0], x.shape[1], x.shape[2:]
    if count % virtual_size:
        raise FinegrainError(f"A batch of {count} does not split into virtual BN batches of {virtual_size}. "
                             "Pick train.bn_virtual_size dividing each process's micro-batch "
                             "(train.batch_size / (processes x train.accumulate_steps)).")
    groups = count // virtual_size
    grouped = x.reshape(groups, virtual_size, channels, *rest).transpose(0, 1)
    grouped = grouped.reshape(virtual_size, groups * channels, *rest)
    tracked = running_mean is not None and running_var is not None
    group_mean = running_mean.repeat(groups) if tracked else None
    group_var = running_var.repeat(groups) if tracked else None
    out = F.batch_norm(grouped, group_mean, group_var, None if weight is None else weight.repeat(groups),
                       None if bias is None else bias.repeat(groups), True, momentum, eps)
    if tracked:
        with torch.no_grad():
            update = torch.stack([group_mean.view(groups, channels).mean(0), group_var.view(groups, channels).mean(0)])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(update)
                update /= dist.get_world_size()
            running_mean.copy_(update[0])
            running_var.copy_(update[1])
    out = out.reshape(virtual_size, groups, channels, *rest).transpose(0, 1).reshape(x.shape)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):  # keep the trainer's layout
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class GhostBatchNormMixin:
    """The forward shared by the 1-d and 2-d layers; everything else is torch's BatchNorm."""

    virtual_size: int

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.track_running_stats or x.shape[0] < self.virtual_size:
            return super().forward(x)  # type: ignore[misc]
        self.num_batches_tracked.add_(1)
        # momentum None: a cumulative average, as torch's BatchNorm keeps it
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return ghost_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.virtual_size, momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_size={self.virtual_size}"  # type: ignore[misc]


class GhostBatchNorm1d(GhostBatchNormMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d with virtual batches: same parameters, buffers and state-dict keys."""


class GhostBatchNorm2d(GhostBatchNormMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d with virtual batches: same parameters, buffers and state-dict keys."""


def convert_to_ghost_batch_norm(module: nn.Module, virtual_size: int) -> int:
    """Replace every BatchNorm1d / BatchNorm2d below `module` in place by its ghost version,
    keeping the same parameter and buffer tensors; returns how many were replaced."""
    if virtual_size < 2:
        raise FinegrainError(f"A virtual BN batch needs at least 2 images, got {virtual_size}. "
                             "Set train.bn_virtual_size to 2 or more (the release's per-GPU 64, say).")
    replaced = 0
    for name, child in module.named_children():
        ghost_type = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}.get(type(child))
        if ghost_type is None:
            replaced += convert_to_ghost_batch_norm(child, virtual_size)
            continue
        ghost = ghost_type.__new__(ghost_type)
        ghost.__dict__.update(child.__dict__)  # the same Parameters and buffers, hooks and mode
        ghost.virtual_size = virtual_size
        setattr(module, name, ghost)
        replaced += 1
    return replaced
