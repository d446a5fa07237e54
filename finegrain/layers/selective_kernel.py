"""Selective Kernel unit (Li et al. 2019) in the paper's two forms.

"doubled" (the paper's choice, Table 2 C3): one 3x3 conv with 2F outputs whose halves are the
two branches. "original" (C2): separate 3x3 and 5x5 branches, the 5x5 as a 3x3 with dilation 2 as SKNet does. Either way the branches are fused
by a global descriptor and re-weighted per channel by a softmax across branches.
"""
from __future__ import annotations

import torch
from torch import nn


def select_branches(branches: torch.Tensor, attention_logits: torch.Tensor) -> torch.Tensor:
    """Weighted sum of `branches` [B, M, C, H, W] with softmax over M of logits [B, M, C]."""
    weights = attention_logits.softmax(dim=1)
    return (branches * weights[..., None, None]).sum(dim=1)


class SelectiveKernel(nn.Module):
    """The SK unit: split (conv/BN/ReLU per branch) -> fuse (pool, fc, BN, ReLU) -> select.

    Parameter names follow the release: `conv`/`bn` is the 2F conv ("doubled"), `fc1`,
    `fc_bn`, `fc2` the fuse/select 1x1 convs (sk_fc_1, its BN, sk_fc_2).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        kind: str = "doubled",
        reduction: int = 2,
        min_hidden: int = 32,
    ) -> None:
        super().__init__()
        if kind not in ("doubled", "original"):
            raise ValueError(f"SK kind must be 'doubled' or 'original', got {kind!r}")
        self.kind = kind
        self.width = width
        if kind == "doubled":
            self.conv = nn.Conv2d(in_channels, 2 * width, 3, stride, 1, bias=False)
            self.bn = nn.BatchNorm2d(2 * width)
        else:
            self.conv = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
            self.bn = nn.BatchNorm2d(width)
            self.conv_wide = nn.Conv2d(in_channels, width, 3, stride, 2, dilation=2, bias=False)
            self.bn_wide = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)
        hidden = max(width // reduction, min_hidden)
        self.fc1 = nn.Conv2d(width, hidden, 1, bias=False)
        self.fc_bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, 2 * width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "doubled":
            both = self.act(self.bn(self.conv(x)))
            branches = torch.stack(both.split(self.width, dim=1), dim=1)
        else:
            branches = torch.stack([self.act(self.bn(self.conv(x))), self.act(self.bn_wide(self.conv_wide(x)))], dim=1)
        summary = branches.sum(dim=1).mean(dim=(2, 3), keepdim=True)
        logits = self.fc2(self.act(self.fc_bn(self.fc1(summary))))
        return select_branches(branches, logits.flatten(1).unflatten(1, (2, self.width)))
