"""The inference fast path every evaluation and embedding command uses.

Eval-mode BN is an affine map, so it folds into the preceding conv (one op fewer per layer);
channels_last lets oneDNN / cuDNN pick their fastest kernels; bf16 autocast uses the CPU's
AVX512-BF16/AMX units or a GPU's tensor cores; torch.compile is optional (slow to start).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from finegrain.runtime import autocast, cpu_supports_bf16

# (conv attribute, BN attribute) pairs of our modules, beyond Conv->BN pairs inside nn.Sequential.
CONV_BN_NAMES: tuple[tuple[str, str], ...] = (
    ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv", "bn"), ("conv_wide", "bn_wide"),
    ("fc1", "fc_bn"), ("big_conv", "big_bn"), ("little_conv1", "little_bn1"), ("little_conv2", "little_bn2"),
    ("little_conv3", "little_bn3"), ("merge_conv", "merge_bn"), ("conv_dw", "bn_dw"), ("conv_pw", "bn_pw"),
    ("conv_stem", "bn1"),
)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv computing bn(conv(x)) with BN's running statistics (eval mode only)."""
    fused = copy.deepcopy(conv)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).detach())
    fused.bias = nn.Parameter((bn.bias + (bias - bn.running_mean) * scale).detach())
    return fused


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every Conv2d -> BatchNorm2d pair of `model` in place; returns how many were folded."""
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in CONV_BN_NAMES:
            owner, conv = module, getattr(module, conv_name, None)
            if isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[-1], nn.Conv2d):
                owner, conv_name, conv = conv, str(len(conv) - 1), conv[-1]  # deep stem: last conv, then bn1
            bn = getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(owner, conv_name, fold_conv_bn(conv, bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(module, conv_name, fold_conv_bn(conv, bn))
                    setattr(module, bn_name, nn.Identity())
                    folded += 1
    return folded


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a model for evaluation; `dtype` None means FP32."""

    channels_last: bool = True
    fold_bn: bool = True
    compile: bool = False
    dtype: torch.dtype | None = None

    @classmethod
    def fast(cls, device: torch.device, bf16: bool | None = None) -> "InferenceOptions":
        """Defaults for `device`: bf16 on CUDA, and on CPUs with native bf16 when asked."""
        use_bf16 = (device.type == "cuda") if bf16 is None else bf16
        if use_bf16 and device.type == "cpu" and not cpu_supports_bf16():
            use_bf16 = False
        return cls(dtype=torch.bfloat16 if use_bf16 else None)


class InferenceModel(nn.Module):
    """A frozen eval-mode copy of a model with the fast path applied; call it like the model."""

    def __init__(self, model: nn.Module, options: InferenceOptions, device: torch.device) -> None:
        super().__init__()
        prepared = copy.deepcopy(model).eval().to(device)
        if options.fold_bn:
            fold_batchnorm(prepared)
        if options.channels_last:
            prepared = prepared.to(memory_format=torch.channels_last)
        self.model = prepared
        self.options = options
        self.device = device
        self._run = torch.compile(prepared) if options.compile else prepared
        self._embed = torch.compile(prepared.forward_embedding) if options.compile and hasattr(prepared, "forward_embedding") else getattr(prepared, "forward_embedding", None)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else x

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.options.dtype):
            return self._run(self._prepare(x)).float()

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings: forward_embedding, or pooled features for a classifier."""
        with autocast(self.device, self.options.dtype):
            x = self._prepare(x)
            if self._embed is not None:
                out = self._embed(x)
            else:
                out = torch.nn.functional.normalize(self.model.forward_head(self.model.forward_features(x), pre_logits=True), dim=1)
        return out.float()
