"""The one ResNet class behind every backbone of the paper (timm's resnet.py is the model).

Flags cover ResNet (torchvision-equivalent names, so torchvision and timm state dicts load as
they are), ResNet-D, SE, Selective Kernel, anti-aliased downsampling, DropBlock, BigLittleNet
(the release's "resnet_version 2") and a stride-free Stage 4 for retrieval. Block order and
padding follow the authors' TF release (see REFERENCE.md and the release fixtures' README).
As in timm, the config's names are resolved once (`layer_kwargs`) to the layer classes that
blocks and stages are given; no block reads the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.layers.blur_pool import BlurPool2d
from finegrain.layers.drop_block import DropBlock2d
from finegrain.layers.gem import GeM
from finegrain.layers.padding import AvgPoolSame, MaxPoolSame
from finegrain.layers.selective_kernel import SelectiveKernel
from finegrain.layers.squeeze_excite import SqueezeExcite


@dataclass(frozen=True)
class ResNetConfig:
    """Every architectural choice; registry variants are instances of this (see registry.py).

    stem: "plain" 7x7 conv + max-pool, "deep" 3x3 x3 + max-pool (ResNet-D), "biglittle" 7x7 conv
      + the BL stem module (release version 2). maxpool_padding "torch" (torchvision/timm) or
      "tf_same" (the release: 0 before, 1 after at even sizes).
    shortcut: "conv" strided 1x1, "avg_d" ResNet-D 2x2 avg-pool then 1x1, "biglittle" 3x3/2
      avg-pool (padding counted) then 1x1. d_pool_at_stride1: the release's ResNet-D still
      average-pools 2x2/1 (TF SAME) at stride 1, where timm uses none.
    aa_filter: 0 for none, else blur filter size; aa_on_conv / aa_on_projection / aa_on_maxpool
      say where (Table 3). biglittle: (alpha, beta) or None. sk: None, "doubled" or "original".
    """

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    base_width: int = 64
    stem: str = "plain"
    maxpool_padding: str = "torch"
    shortcut: str = "conv"
    d_pool_at_stride1: bool = False
    biglittle: tuple[int, int] | None = None
    sk: str | None = None
    sk_reduction: int = 2
    sk_min_hidden: int = 32
    se_reduction: int | None = None
    aa_filter: int = 0
    aa_on_conv: bool = True
    aa_on_projection: bool = False
    aa_on_maxpool: bool = False
    drop_block_stages: tuple[int, ...] = ()
    drop_block_size: int = 7
    drop_block_gamma_scales: tuple[float, float, float, float] = (0.0, 0.0, 0.25, 1.0)
    zero_gamma: bool = True
    stage4_stride: int = 2
    global_pool: str = "avg"
    gem_p: float = 3.0
    gem_learnable: bool = False
    embedding_size: int = 0
    num_classes: int = 1000


def make_shortcut(
    kind: str,
    in_ch: int,
    out_ch: int,
    stride: int,
    norm_layer: type[nn.Module] = nn.BatchNorm2d,
    aa_layer: Callable[..., nn.Module] | None = None,
    d_pool_at_stride1: bool = False,
) -> nn.Sequential:
    """The projection shortcut of a block layer's first block (always present in the release).

    kind: "conv" strided 1x1, "avg_d" ResNet-D 2x2 avg-pool then 1x1, "biglittle" 3x3/2 avg-pool
    (padding counted) then 1x1. An `aa_layer` blurs before an unstrided 1x1 instead (Table 3).
    """
    blur = stride > 1 and aa_layer is not None
    conv = nn.Conv2d(in_ch, out_ch, 1, stride if kind == "conv" and not blur else 1, bias=False)
    norm = norm_layer(out_ch)
    if blur:
        return nn.Sequential(aa_layer(stride=stride), conv, norm)
    if kind == "conv":
        return nn.Sequential(conv, norm)
    if kind == "avg_d":
        if stride > 1:
            pool: nn.Module = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        else:
            pool = AvgPoolSame(2, 1) if d_pool_at_stride1 else nn.Identity()
        return nn.Sequential(pool, conv, norm)
    if kind == "biglittle":
        pool = nn.AvgPool2d(3, stride, 1, count_include_pad=True) if stride > 1 else nn.Identity()
        return nn.Sequential(pool, conv, norm)
    raise ValueError(f"unknown shortcut {kind!r}")


class Bottleneck(nn.Module):
    """Post-activation bottleneck in the release's order (DropBlock after every BN, SE before add).

    Like timm's blocks it is given its layers rather than a config: `attn_layer(channels)` (SE),
    `aa_layer(stride=)` (blur before a strided 3x3, which then runs at stride 1), `sk_layer(in,
    out, stride=)` (a Selective Kernel unit in place of the 3x3, with its own BN and ReLU), and
    `drop_block`, one module shared by a stage's blocks (the trainer sets its keep_prob).
    """

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        final_act: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        attn_layer: Callable[[int], nn.Module] | None = None,
        aa_layer: Callable[..., nn.Module] | None = None,
        sk_layer: Callable[..., nn.Module] | None = None,
        drop_block: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out_ch = width * self.expansion
        use_aa = stride > 1 and aa_layer is not None
        conv_stride = 1 if use_aa else stride
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        if sk_layer is not None:
            self.conv2: nn.Module = sk_layer(width, width, stride=conv_stride)
            self.bn2: nn.Module = nn.Identity()
        else:
            self.conv2 = nn.Conv2d(width, width, 3, conv_stride, 1, bias=False)
            self.bn2 = norm_layer(width)
        self.aa = aa_layer(stride=stride) if use_aa else nn.Identity()
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = norm_layer(out_ch)
        # `se` for any attn_layer: the name torchvision-style checkpoints and the release mapping use.
        self.se = attn_layer(out_ch) if attn_layer is not None else nn.Identity()
        self.downsample = downsample
        self.drop_block = drop_block if drop_block is not None else nn.Identity()
        self.act1 = act_layer(inplace=True)
        self.act2 = act_layer(inplace=True) if sk_layer is None else nn.Identity()  # SK ends in its ReLU
        self.act3 = act_layer(inplace=True)
        self.final_act = final_act
        self.sk = sk_layer is not None  # the release converter maps an SK unit's own scopes

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.drop_block(self.downsample(x))
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
        x = self.aa(x)
        x = self.se(self.drop_block(self.bn3(self.conv3(x))))
        x = x + shortcut
        return self.act3(x) if self.final_act else x


def make_layer(
    in_ch: int,
    width: int,
    blocks: int,
    stride: int,
    downsample_layer: Callable[[int, int, int], nn.Module],
    last_final_act: bool = True,
    **block_kwargs: Any,
) -> nn.Sequential:
    """A block layer: a first block at `stride` with a `downsample_layer(in, out, stride)`
    shortcut, then blocks at stride 1; `block_kwargs` are the blocks' layers.

    The release drops the final ReLU of a BL big branch's last block, but never of a layer's
    first block (which only matters for a one-block big branch).
    """
    layers = []
    out_ch = width * Bottleneck.expansion
    for index in range(blocks):
        first = index == 0
        final_act = last_final_act or first or index < blocks - 1
        block_stride = stride if first else 1
        downsample = downsample_layer(in_ch, out_ch, block_stride) if first else None
        layers.append(Bottleneck(in_ch, width, block_stride, downsample, final_act, **block_kwargs))
        in_ch = out_ch
    return nn.Sequential(*layers)


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, norm_layer: type[nn.Module] = nn.BatchNorm2d
) -> tuple[nn.Conv2d, nn.Module]:
    return nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False), norm_layer(out_ch)


class BigLittleStem(nn.Module):
    """The release's version-2 stem after the 7x7 conv: a small BL module replaces the max-pool."""

    def __init__(self, channels: int, alpha: int) -> None:
        super().__init__()
        little = channels // alpha
        self.big_conv, self.big_bn = conv_bn(channels, channels, 3, 2)
        self.little_conv1, self.little_bn1 = conv_bn(channels, little, 3, 1)
        self.little_conv2, self.little_bn2 = conv_bn(little, little, 3, 2)
        self.little_conv3, self.little_bn3 = conv_bn(little, channels, 1)
        self.merge_conv, self.merge_bn = conv_bn(channels, channels, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = self.big_bn(self.big_conv(x))
        little = self.act(self.little_bn1(self.little_conv1(x)))
        little = self.act(self.little_bn2(self.little_conv2(little)))
        little = self.little_bn3(self.little_conv3(little))
        return self.act(self.merge_bn(self.merge_conv(self.act(big + little))))


class BigLittleStage(nn.Module):
    """Stages 1-3 of BigLittleNet: a big branch at half resolution, a thin little branch (width /
    alpha, depth / beta) at full resolution, merged by nearest upsampling, a ReLU'd sum and one
    block at the stage's stride. `layer_kwargs` are make_layer's (shortcut and block layers)."""

    def __init__(
        self,
        in_ch: int,
        width: int,
        depth: int,
        merge_stride: int,
        alpha: int,
        beta: int,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
        **layer_kwargs: Any,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("a BigLittle stage needs at least 2 blocks")
        out_ch = width * Bottleneck.expansion
        layer_kwargs = {**layer_kwargs, "norm_layer": norm_layer, "act_layer": act_layer}
        self.big = make_layer(in_ch, width, depth - 1, 2, last_final_act=False, **layer_kwargs)
        little_width = width // alpha
        self.little = make_layer(in_ch, little_width, max(1, depth // beta - 1), 1, **layer_kwargs)
        self.little_expand = nn.Sequential(*conv_bn(little_width * Bottleneck.expansion, out_ch, 1, 1, norm_layer))
        self.merge = make_layer(out_ch, width, 1, merge_stride, **layer_kwargs)
        self.act = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = self.big(x)
        little = self.little_expand(self.little(x))
        # Nearest upsampling to the little branch's size: the release's 2x UpSampling2D at even
        # sizes, and it also accepts sizes that are not multiples of 32.
        big = F.interpolate(big, size=little.shape[-2:], mode="nearest")
        return self.merge(self.act(little + big))


def layer_kwargs(cfg: ResNetConfig) -> dict[str, Any]:
    """The config's names resolved, once, to the layers make_layer and the blocks take."""
    blur = partial(BlurPool2d, cfg.aa_filter) if cfg.aa_filter else None
    norm_layer = nn.BatchNorm2d
    return {
        "downsample_layer": partial(make_shortcut, cfg.shortcut, norm_layer=norm_layer,
                                    aa_layer=blur if cfg.aa_on_projection else None,
                                    d_pool_at_stride1=cfg.d_pool_at_stride1),
        "act_layer": nn.ReLU,
        "norm_layer": norm_layer,
        "attn_layer": partial(SqueezeExcite, reduction=cfg.se_reduction) if cfg.se_reduction else None,
        "aa_layer": blur if cfg.aa_on_conv else None,
        "sk_layer": partial(SelectiveKernel, kind=cfg.sk, reduction=cfg.sk_reduction, min_hidden=cfg.sk_min_hidden)
        if cfg.sk else None,
    }


class ResNet(nn.Module):
    """Configurable ResNet; `forward_features` -> last map, `forward_head` -> logits."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        nf = cfg.base_width
        self._build_stem(cfg, nf)
        drop = {
            stage: DropBlock2d(cfg.drop_block_size, cfg.drop_block_gamma_scales[stage - 1])
            for stage in cfg.drop_block_stages
        }
        layers = layer_kwargs(cfg)
        in_ch = nf
        for stage in range(1, 5):
            width = nf * 2 ** (stage - 1)
            blocks = cfg.layers[stage - 1]
            if cfg.biglittle and stage < 4:
                layer: nn.Module = BigLittleStage(in_ch, width, blocks, (2, 2, 1)[stage - 1], *cfg.biglittle,
                                                  drop_block=drop.get(stage), **layers)
            else:
                stride = cfg.stage4_stride if stage == 4 else (1, 2, 2)[stage - 1]
                layer = make_layer(in_ch, width, blocks, stride, drop_block=drop.get(stage), **layers)
            self.add_module(f"layer{stage}", layer)
            in_ch = width * Bottleneck.expansion
        self.num_features = in_ch
        self.global_pool = GeM(cfg.gem_p, cfg.gem_learnable) if cfg.global_pool == "gem" else None
        if cfg.embedding_size:
            self.embedding: nn.Module | None = nn.Sequential(
                nn.Linear(in_ch, cfg.embedding_size, bias=False), nn.BatchNorm1d(cfg.embedding_size)
            )
            in_ch = cfg.embedding_size
        else:
            self.embedding = None
        self.fc = nn.Linear(in_ch, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights(cfg.zero_gamma)

    def _build_stem(self, cfg: ResNetConfig, nf: int) -> None:
        act = nn.ReLU(inplace=True)
        if cfg.stem == "deep":
            half = nf // 2
            self.conv1: nn.Module = nn.Sequential(
                *conv_bn(3, half, 3, 2), act, *conv_bn(half, half, 3), act, nn.Conv2d(half, nf, 3, 1, 1, bias=False)
            )
        elif cfg.stem in ("plain", "biglittle"):
            self.conv1 = nn.Conv2d(3, nf, 7, 2, 3, bias=False)
        else:
            raise ValueError(f"unknown stem {cfg.stem!r}")
        self.bn1 = nn.BatchNorm2d(nf)
        self.act1 = act
        # `maxpool` is the stem's downsampling whatever it is (for BigLittle a module of convs): the
        # name torchvision/timm state dicts, saved checkpoints and the release mapping's keys use.
        if cfg.stem == "biglittle":
            self.maxpool: nn.Module = BigLittleStem(nf, (cfg.biglittle or (2, 4))[0])
        elif cfg.aa_filter and cfg.aa_on_maxpool:
            self.maxpool = nn.Sequential(nn.MaxPool2d(3, 1, 1), BlurPool2d(cfg.aa_filter, 2))
        elif cfg.maxpool_padding == "tf_same":
            self.maxpool = MaxPoolSame(3, 2)
        else:
            self.maxpool = nn.MaxPool2d(3, 2, 1)

    def _init_weights(self, zero_gamma: bool) -> None:
        if next(self.parameters()).is_meta:
            return  # a shape-only copy (factory.expected_entries): meta init costs seconds of torch imports
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_gamma:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    module.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.biglittle and min(x.shape[-2:]) < 32:
            raise FinegrainError(f"BigLittle models need inputs of at least 32x32 pixels; got {tuple(x.shape[-2:])}. "
                                 "Resize the images (the preprocessing's crop size) to 32 or more.")
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global pooling [B, C, H, W] -> [B, C] (average, or GeM for retrieval)."""
        return features.mean(dim=(2, 3)) if self.global_pool is None else self.global_pool(features)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(features)
        if self.embedding is not None:
            x = self.embedding(x)
            if pre_logits:
                return x
            x = F.relu(x)
        return x if pre_logits else self.fc(x)

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval embedding [B, E] (the embedding BN output, as the release)."""
        return F.normalize(self.forward_head(self.forward_features(x), pre_logits=True), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; a retrieval network (an embedding and no classifier) gives its L2-normalised
        embedding, so `create_embedder(...)(x)` is what retrieval compares."""
        if self.embedding is not None and self.cfg.num_classes == 0:
            return self.forward_embedding(x)
        return self.forward_head(self.forward_features(x))

    def classifier_prefixes(self) -> tuple[str, ...]:
        """Parameter prefixes that a warm start from another task does not copy (a learnable GeM p
        is part of the retrieval head, absent from classifier checkpoints)."""
        return ("fc.", "embedding.", "global_pool.")
