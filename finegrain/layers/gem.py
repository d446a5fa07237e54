"""Generalised-mean (GeM) pooling, Radenovic et al.; p = 1 is average, p -> inf is max."""
from __future__ import annotations

import torch
from torch import nn


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM over H, W of [B, C, H, W] -> [B, C], computed in float32 as the release does.

    The release clips x to [eps, 1e12], floors the SUM of x^p over H, W at eps, and scales the
    root by (H*W)^(-1/p): on an all-zero map that gives (eps / (H*W))^(1/p), not eps^(1/p).
    """
    x32 = x.float().clamp(eps, 1e12)
    p32 = p.float() if isinstance(p, torch.Tensor) else float(p)
    area = x.shape[-2] * x.shape[-1]
    summed = x32.pow(p32).sum(dim=(-2, -1)).clamp_min(eps)
    return (summed / area).pow(1.0 / p32).to(x.dtype)


class GeM(nn.Module):
    """GeM pooling with a fixed p (the release's 3) or a learnable one (its own optimizer group)."""

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3g}, learnable={isinstance(self.p, nn.Parameter)}"
