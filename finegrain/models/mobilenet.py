"""MobileNet-V1 and SE-MobileNet-V1 (paper Table 9): depthwise-separable convs, width 32..1024."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from finegrain.layers.drop_block import DropBlock2d
from finegrain.layers.squeeze_excite import SqueezeExcite

# (output channels, stride) of the 13 depthwise-separable blocks at width multiplier 1.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


@dataclass(frozen=True)
class MobileNetConfig:
    """base_width scales every layer (32 = the standard network); se_reduction adds SE after
    each block (Table 9 M1: r=16, M6-M8: r=2); DropBlock acts on the 14x14 and 7x7 blocks."""

    base_width: int = 32
    se_reduction: int | None = None
    drop_block: bool = False
    drop_block_size: int = 7
    num_classes: int = 1000


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 and pointwise 1x1, each BN/ReLU6; given its layers as timm's blocks are."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        attn_layer: Callable[[int], nn.Module] | None = None,
        drop_block: nn.Module | None = None,
        act_layer: type[nn.Module] = nn.ReLU6,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False)
        self.bn_dw = norm_layer(in_ch)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn_pw = norm_layer(out_ch)
        self.act = act_layer(inplace=True)
        self.se = attn_layer(out_ch) if attn_layer is not None else nn.Identity()
        self.drop_block = drop_block if drop_block is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.drop_block(self.bn_dw(self.conv_dw(x))))
        x = self.act(self.drop_block(self.bn_pw(self.conv_pw(x))))
        return self.se(x)


class MobileNetV1(nn.Module):
    """Same interface as ResNet: forward_features / forward_head / forward, num_features."""

    def __init__(self, cfg: MobileNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        scale = cfg.base_width / 32
        stem = cfg.base_width
        self.conv_stem = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU6(inplace=True)
        attn_layer = partial(SqueezeExcite, reduction=cfg.se_reduction) if cfg.se_reduction else None
        blocks, in_ch, total_stride = [], stem, 2
        for channels, stride in MOBILENET_V1_BLOCKS:
            total_stride *= stride
            out_ch = max(8, int(channels * scale))
            drop = DropBlock2d(cfg.drop_block_size) if cfg.drop_block and total_stride >= 16 else None
            blocks.append(DepthwiseSeparable(in_ch, out_ch, stride, attn_layer, drop))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if self.conv_stem.weight.is_meta:
            return  # a shape-only copy (factory.expected_entries): meta init costs seconds of torch imports
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.act1(self.bn1(self.conv_stem(x))))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def classifier_prefixes(self) -> tuple[str, ...]:
        return ("fc.",)
