"""The network an export traces: the model exactly as the one predictor runs it on its fast path.

That is the predictor's own frozen eval-mode copy with BN folded into the convs (DropBlock is the
identity in eval mode), wrapped so its one output is what the task asks for: logits, or the
L2-normalised embedding `embed_batch` defines. Optionally the wrapper takes decoded uint8 NHWC
pixels and normalises them inside the graph, so a consumer feeds pixels and nothing else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.eval.inference import InferenceOptions, Predictor, embed_batch
from finegrain.layers.blur_pool import BlurPool2d
from finegrain.preprocessing import Preprocessing

TASKS = ("classify", "embed")


class FixedBlurPool(nn.Module):
    """BlurPool2d with its depthwise filter expanded to the channels it sees, as a constant.

    BlurPool2d builds its [C, 1, k, k] filter from the input's channel count at run time; a
    traced ONNX graph then has a convolution whose kernel shape is unknown, which the exporter
    refuses. The same reflect pad and the same filter, fixed: the same numbers.
    """

    def __init__(self, blur: BlurPool2d, channels: int) -> None:
        super().__init__()
        size = blur.filt.shape[-1]
        self.stride, self.before, self.after = blur.stride, (size - 1) // 2, size - 1 - (size - 1) // 2
        self.register_buffer("weight", blur.filt.expand(channels, 1, size, size).clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.before or self.after:
            x = F.pad(x, (self.before, self.after, self.before, self.after), mode="reflect")
        return F.conv2d(x, self.weight, stride=self.stride, groups=self.weight.shape[0])


def fix_blur_pools(model: nn.Module, example: Tensor) -> int:
    """Replace every BlurPool2d by a FixedBlurPool for the channels one forward pass shows."""
    channels: dict[BlurPool2d, int] = {}
    hooks = [module.register_forward_hook(lambda mod, inputs, _: channels.__setitem__(mod, inputs[0].shape[1]))
             for module in model.modules() if isinstance(module, BlurPool2d)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    replaced = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, BlurPool2d) and child in channels:
                setattr(owner, name, FixedBlurPool(child, channels[child]))
                replaced += 1
    return replaced


class Deployed(nn.Module):
    """images -> logits or embeddings, as the predictor computes them; with `pixels`, images
    are uint8 [B, H, W, 3] RGB normalised here by the checkpoint's mean and std."""

    def __init__(self, model: nn.Module, task: str, preprocessing: Preprocessing | None) -> None:
        super().__init__()
        self.model, self.embed = model, task == "embed"
        self.pixels = preprocessing is not None
        if preprocessing is not None:
            self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        if self.pixels:
            images = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return embed_batch(self.model, images) if self.embed else self.model(images)


def default_task(model: nn.Module) -> str:
    """embed for a retrieval network (its forward is the embedding), classify for a classifier."""
    info = getattr(model, "info", None)
    retrieval = callable(getattr(model, "forward_embedding", None)) and (
        getattr(info, "task", None) == "retrieval" or getattr(info, "num_classes", 1) == 0)
    return "embed" if retrieval else "classify"


def check_task(model: nn.Module, task: str) -> None:
    """Logits need a classifier head."""
    info = getattr(model, "info", None)
    if task == "classify" and getattr(info, "num_classes", None) == 0:
        raise FinegrainError("This checkpoint has no classifier head (0 classes): export it with --task embed.")


def fast_path(model: nn.Module) -> Predictor:
    """The PyTorch fast path on the CPU in FP32 (BN folded, channels_last): the reference an export must equal."""
    return Predictor(model, torch.device("cpu"), InferenceOptions.fast(torch.device("cpu"), bf16=False))


def reference_outputs(predictor: Predictor, task: str, images: Tensor) -> Tensor:
    """What the fast path gives for normalised float images."""
    return predictor.embed(images) if task == "embed" else predictor(images)


def deployable(predictor: Predictor, task: str, pixels_in_graph: bool, example: Tensor) -> Deployed:
    """The module to trace, made from the fast path's own folded copy of the model (which it
    changes: take the references first); `example` is an input of the graph."""
    folded = predictor.model.to(memory_format=torch.contiguous_format)
    images = example.permute(0, 3, 1, 2).float() if pixels_in_graph else example
    fix_blur_pools(folded, images)
    return Deployed(folded, task, folded.preprocessing if pixels_in_graph else None).eval()
