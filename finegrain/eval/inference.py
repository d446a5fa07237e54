"""The one predictor: how every evaluation, embedding, robustness, teacher-logits and benchmark
run feeds images to a model, and what "the embedding of a model" is.

It decides in one place: the device; the autocast dtype (bf16 where the hardware has it
natively); channels_last inputs; BN folding (eval-mode BN is an affine map, so it folds into the
preceding conv: one op fewer per layer), done on a frozen copy so a live training model is never
altered; normalisation of raw uint8 images by the checkpoint's preprocessing; batching over a
loader or a stack of images, gathered across torchrun ranks. Each caller states its options;
the defaults run the eager model in FP32, so training-time metrics are exactly `model(x)`'s.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from finegrain.distributed import gather_rows
from finegrain.errors import FinegrainError
from finegrain.preprocessing import Preprocessing
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


# ------------------------------------------------------------------------------ the embedding
def embedding_mode(model: nn.Module) -> str:
    """'forward_embedding' for retrieval networks, else 'pooled_features' (a classifier's pooled
    pre-logit features). An index records it, so a query is embedded as its items were."""
    return "forward_embedding" if callable(getattr(model, "forward_embedding", None)) else "pooled_features"


def embed_batch(model: nn.Module, images: Tensor) -> Tensor:
    """The embedding of a model: [B, 3, H, W] normalised images -> [B, E], L2-normalised.

    A retrieval network's `forward_embedding` (L2-normalised by the model, as it was trained);
    a classifier's features pooled by its own head (`forward_head(pre_logits=True)`, which for
    ours is the global average), in float32, then L2-normalised.
    """
    if embedding_mode(model) == "forward_embedding":
        return model.forward_embedding(images)
    pooled = model.forward_head(model.forward_features(images).float(), pre_logits=True)
    return F.normalize(pooled.float(), dim=1)


# -------------------------------------------------------------------------------- the options
def native_bf16(device: torch.device) -> bool:
    """bf16 is safe to choose where the hardware computes it natively (emulation is slower than FP32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_supports_bf16()


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a model; the defaults are the eager model in FP32, exactly as `model(x)`.

    dtype: autocast dtype (None = FP32). channels_last: feed NHWC inputs (and convert the
    predictor's own copy); without it inputs keep their layout. fold_bn: run a frozen copy with
    BN folded into the convs.
    """

    dtype: torch.dtype | None = None
    channels_last: bool = False
    fold_bn: bool = False

    @classmethod
    def fast(cls, device: torch.device, bf16: bool | None = None) -> "InferenceOptions":
        """The fast path: BN folded, channels_last; bf16 on a GPU that has it natively, and on
        such a CPU when asked (`bf16=True`)."""
        use_bf16 = (device.type == "cuda") if bf16 is None else bf16
        return cls(dtype=torch.bfloat16 if use_bf16 and native_bf16(device) else None, channels_last=True, fold_bn=True)

    @classmethod
    def for_collection(cls, device: torch.device) -> "InferenceOptions":
        """Embedding image collections (the index): bf16 with channels_last inputs on a GPU with
        native bf16 (several times faster; cosine ranking barely moves), exact FP32 elsewhere."""
        if device.type == "cuda" and native_bf16(device):
            return cls(dtype=torch.bfloat16, channels_last=True)
        return cls()


# ------------------------------------------------------------------------------ the predictor
class Predictor:
    """Runs a model for inference on `device` as `options` say; call it for logits, `embed` for
    embeddings, `predict` over a loader, `logits_in_batches` over a stack of images.

    With `fold_bn` it runs its own frozen eval-mode copy, so the caller's model is untouched.
    Otherwise it runs the caller's model itself (moved to `device`), in eval mode during each
    call and every module's mode restored after, so the trainer can evaluate its live model
    mid-training. With `preprocessing`, inputs are raw RGB images (uint8 [B, 3, H, W], 0-255),
    normalised here on the device by the preprocessing's mean and std.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, options: InferenceOptions = InferenceOptions(),
                 preprocessing: Preprocessing | None = None) -> None:
        self.device, self.options = torch.device(device), options
        self.owns_model = options.fold_bn
        model = copy.deepcopy(model).eval().to(self.device) if self.owns_model else model.to(self.device)
        if self.owns_model:
            fold_batchnorm(model)
            if options.channels_last:
                model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._normalisation = None if preprocessing is None else (
            torch.tensor(preprocessing.mean, device=self.device).view(1, 3, 1, 1),
            torch.tensor(preprocessing.std, device=self.device).view(1, 3, 1, 1))

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        if self.owns_model:
            yield
            return
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode

    def _prepare(self, images: Tensor) -> Tensor:
        images = images.to(self.device, non_blocking=True)
        if self._normalisation is not None:
            mean, std = self._normalisation
            images = (images.float() - mean) / std
        return images.contiguous(memory_format=torch.channels_last) if self.options.channels_last else images

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        """Logits [B, C], float32 on the device."""
        with self._eval_mode(), autocast(self.device, self.options.dtype):
            return self.model(self._prepare(images)).float()

    @torch.inference_mode()
    def embed(self, images: Tensor) -> Tensor:
        """The model's embeddings [B, E] (`embed_batch`), float32 on the device."""
        with self._eval_mode(), autocast(self.device, self.options.dtype):
            return embed_batch(self.model, self._prepare(images)).float()

    @torch.inference_mode()
    def predict(self, loader: Iterable, embeddings: bool = False, progress: bool = False) -> tuple[Tensor, Tensor]:
        """(logits or embeddings [N, .] float32 on the CPU, labels [N] int64) over a loader of
        `(images, labels, ...)`, in loader order; under torchrun each rank's shard, gathered in order."""
        run = self.embed if embeddings else self
        outputs: list[Tensor] = []
        labels: list[Tensor] = []
        with self._eval_mode():
            for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
                outputs.append(run(batch[0]).cpu())
                labels.append(torch.as_tensor(batch[1]).long().cpu())
        if not outputs:
            raise FinegrainError("The evaluation data set is empty. Check the test split of --data.")
        return gather_rows(torch.cat(outputs)), gather_rows(torch.cat(labels))

    def logits_in_batches(self, images: Tensor, batch_size: int) -> Tensor:
        """Logits [N, C] (float32 on the CPU) of a stack of images, `batch_size` at a time."""
        with self._eval_mode():
            return torch.cat([self(chunk).cpu() for chunk in images.split(batch_size)])
