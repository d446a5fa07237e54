"""DropBlock (Ghiasi et al. 2018) as in the release: drop contiguous block_size^2 squares.

keep_prob is not a constructor constant: the trainer decays it linearly over training
(1.0 -> 0.9 for backbones, 0.9 -> 0.7 for FGVC), calling `set_drop_block_keep_prob` each step.
The masks draw from torch's RNG, which the trainer seeds per step from the step's place in the
run, so a resumed run drops the same blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_block(
    x: torch.Tensor,
    keep_prob: float,
    block_size: int = 7,
    gamma_scale: float = 1.0,
    batch_shared: bool = True,
) -> torch.Tensor:
    """Zero random blocks of `x` [B, C, H, W] and rescale so the expected sum is unchanged.

    gamma = gamma_scale * (1 - keep_prob) * H*W / (bs^2 (H-bs+1)(W-bs+1)) is the seed rate that
    drops about gamma_scale * (1 - keep_prob) of the units. The release samples one seed mask
    per channel shared by the whole batch (`batch_shared=True`); timm samples per image.
    """
    if keep_prob >= 1.0:
        return x
    _, channels, height, width = x.shape
    bs = min(block_size, height, width)
    valid_h, valid_w = height - bs + 1, width - bs + 1
    gamma = gamma_scale * (1.0 - keep_prob) * height * width / (bs * bs * valid_h * valid_w)
    seed_shape = (1 if batch_shared else x.shape[0], channels, valid_h, valid_w)
    seeds = (torch.rand(seed_shape, device=x.device) < gamma).to(x.dtype)
    left = bs // 2
    seeds = F.pad(seeds, (left, bs - 1 - left, left, bs - 1 - left))
    block_mask = 1.0 - F.max_pool2d(seeds, bs, stride=1, padding=bs // 2)
    if block_mask.shape[-2:] != (height, width):  # even block sizes overhang by one
        block_mask = block_mask[..., :height, :width]
    scale = block_mask.numel() / block_mask.sum().clamp_min(1.0)
    return x * block_mask * scale


class DropBlock2d(nn.Module):
    """Identity at eval or when keep_prob is 1; `keep_prob` is set from outside each step."""

    def __init__(self, block_size: int = 7, gamma_scale: float = 1.0, batch_shared: bool = True) -> None:
        super().__init__()
        self.block_size = block_size
        self.gamma_scale = gamma_scale
        self.batch_shared = batch_shared
        self.keep_prob = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.keep_prob >= 1.0:
            return x
        return drop_block(x, self.keep_prob, self.block_size, self.gamma_scale, self.batch_shared)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, gamma_scale={self.gamma_scale}, keep_prob={self.keep_prob}"


def set_drop_block_keep_prob(model: nn.Module, keep_prob: float) -> int:
    """Set keep_prob on every DropBlock2d in `model`; returns how many were found."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
    found = 0
    for module in model.modules():
        if isinstance(module, DropBlock2d):
            module.keep_prob = keep_prob
            found += 1
    return found
