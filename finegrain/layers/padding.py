"""TensorFlow 'SAME' pooling, which the release uses and PyTorch's symmetric padding is not.

At an even input size TF pads 0 before and 1 after, so windows sit one pixel later than
PyTorch's `padding=1`: every value differs. Padding never counts in a max or an average.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding TF 'SAME' uses along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def max_pool_same(x: torch.Tensor, kernel: int = 3, stride: int = 2) -> torch.Tensor:
    """Max-pool with TF 'SAME' padding (padded cells never win)."""
    top, bottom = same_pads(x.shape[-2], kernel, stride)
    left, right = same_pads(x.shape[-1], kernel, stride)
    x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    return F.max_pool2d(x, kernel, stride)


def avg_pool_same(x: torch.Tensor, kernel: int = 2, stride: int = 1) -> torch.Tensor:
    """Average-pool with TF 'SAME' padding, padded cells excluded from each average."""
    top, bottom = same_pads(x.shape[-2], kernel, stride)
    left, right = same_pads(x.shape[-1], kernel, stride)
    pads = (left, right, top, bottom)
    summed = F.avg_pool2d(F.pad(x, pads), kernel, stride, divisor_override=1)
    ones = torch.ones(1, 1, x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
    counts = F.avg_pool2d(F.pad(ones, pads), kernel, stride, divisor_override=1)
    return summed / counts


class MaxPoolSame(torch.nn.Module):
    """nn.Module form of `max_pool_same` (the release's version-1 stem pool)."""

    def __init__(self, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_same(x, self.kernel, self.stride)


class AvgPoolSame(torch.nn.Module):
    """nn.Module form of `avg_pool_same` (the release's ResNet-D shortcut pool)."""

    def __init__(self, kernel: int = 2, stride: int = 1) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_same(x, self.kernel, self.stride)
