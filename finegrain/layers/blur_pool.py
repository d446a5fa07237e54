"""Anti-aliased downsampling (Zhang 2019, "Making convolutional networks shift-invariant again").

A fixed binomial low-pass filter applied depthwise before subsampling. The release pads with
REFLECT, not zeros; the filter is a constant (it is not in any checkpoint).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def binomial_filter(size: int) -> torch.Tensor:
    """The normalised 2-D binomial filter of side `size`: size 3 is [1,2,1]x[1,2,1]/16."""
    if not 1 <= size <= 7:
        raise ValueError(f"blur filter size must be 1..7, got {size}")
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float64)
    grid = torch.outer(row, row)
    return (grid / grid.sum()).float()


def blur_downsample(x: torch.Tensor, filt: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Reflect-pad, blur each channel with `filt` [k, k], subsample by `stride`."""
    k = filt.shape[-1]
    before = (k - 1) // 2
    after = k - 1 - before
    if before or after:
        x = F.pad(x, (before, after, before, after), mode="reflect")
    channels = x.shape[1]
    weight = filt.to(dtype=x.dtype, device=x.device).expand(channels, 1, k, k)
    return F.conv2d(x, weight, stride=stride, groups=channels)


class BlurPool2d(nn.Module):
    """Depthwise binomial blur + stride: the anti-aliased replacement of a strided layer."""

    def __init__(self, filter_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.register_buffer("filt", binomial_filter(filter_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blur_downsample(x, self.filt, self.stride)

    def extra_repr(self) -> str:
        return f"filter_size={self.filt.shape[-1]}, stride={self.stride}"
