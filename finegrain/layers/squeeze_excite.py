"""Squeeze-and-Excitation (Hu et al.): per-channel gates from globally pooled features."""
from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """avg pool -> 1x1 conv C -> C/r -> ReLU -> 1x1 conv -> sigmoid -> scale (no biases, as the release)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * gate.sigmoid()
