"""Computing the offline teacher logits of the paper's knowledge distillation.

The paper computes the teacher's logits once, before training, on the un-augmented training
images (an EfficientNet-B7 teacher for the backbone; Section 3.2). They are written in the format
of finegrain.train.distill (which also reads them back for training) with the image paths
relative to the data root, the class names, the teacher's preprocessing and architecture, so a
file made for other classes is refused by name, not only by count.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.fileio import sha256_file
from finegrain.models.metadata import PATHS_RELATIVE_TO, TEACHER, TEACHER_ARCH, CheckpointInfo, check_classes
from finegrain.train.distill import save_teacher_logits, split_keys


def teacher_fingerprint(weights: str | Path) -> str:
    """Identifies the teacher a logits file came from: the sha256 of its weights file."""
    return f"sha256:{sha256_file(weights)}"


def class_count(model: nn.Module) -> int:
    """How many logits `model` outputs: our models' config, or timm's `num_classes`."""
    count = getattr(getattr(model, "cfg", None), "num_classes", None)
    return int(count if count is not None else getattr(model, "num_classes", 0))


def load_teacher(weights: str | Path, arch: str | None = None) -> nn.Module:
    """A teacher network from a local weights file.

    Our checkpoints rebuild themselves. A plain state dict needs `arch` (a registered name or
    "timm/NAME"); its class count is the rows of its last 2-D tensor, and it loads by tensor
    name when the names fit, else by position with every shape checked (as the EfficientNet-Lite0
    package's file loads into timm).
    """
    from finegrain.models import create_model, load_model, read_info, read_weights
    from finegrain.train.pretrained import timm_model_by_key_order

    if Path(weights).suffix == ".safetensors" and read_info(weights).architecture is not None:
        return load_model(weights)
    state, _ = read_weights(weights)
    if arch is None:
        raise FinegrainError(f"{weights} is a plain state dict without finegrain metadata. Pass the architecture it "
                             "was made for, e.g. --arch timm/efficientnet_lite0.")
    matrices = [value for value in state.values() if value.ndim == 2]
    if not matrices:
        raise FinegrainError(f"{weights} holds no classifier matrix. A teacher needs its classification head.")
    model = create_model(arch, num_classes=matrices[-1].shape[0])
    if set(model.state_dict()) == set(state):
        model.load_state_dict(state)
        return model
    return timm_model_by_key_order(weights, arch)


def check_teacher_classes(model: nn.Module, classes: list[str], weights: str | Path) -> None:
    """A teacher must predict exactly the data set's classes (names too, when it records them)."""
    recorded = model.info.classes if isinstance(getattr(model, "info", None), CheckpointInfo) else None
    check_classes(CheckpointInfo(num_classes=class_count(model), classes=recorded), classes, f"The teacher {weights}",
                  "the training data", "Fine-tune the teacher on these classes first (finegrain fgvc), then write "
                  "its logits")


@torch.inference_mode()
def write_teacher_logits(weights: str | Path, data: str | Path, out: str | Path, kind: str = "folder",
                         arch: str | None = None, options: dict[str, Any] | None = None, batch_size: int = 64,
                         workers: int = 2, device: torch.device | None = None, progress: bool = True,
                         echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the teacher once over the training split of `data` (eval transform at the teacher's
    own preprocessing, no augmentation) and write its logits to `out`.

    Returns a summary: images, classes, the teacher's fingerprint and its top-1 on those images
    (a sanity check: a fine-tuned teacher should fit its own training data well).
    """
    from finegrain.data import ImageDataset, load_splits
    from finegrain.data.transforms import eval_transform
    from finegrain.eval.classification import predict_logits, topk_accuracy
    from finegrain.runtime import default_device
    from finegrain.data.loaders import eval_loader

    echo = echo or (lambda message: print(message, file=sys.stderr))
    device = device or default_device()
    train = load_splits(kind, data, **(options or {}))["train"]
    model = load_teacher(weights, arch)
    check_teacher_classes(model, train.classes, weights)
    dataset = ImageDataset(train.samples, eval_transform(model.preprocessing))
    echo(f"teacher {getattr(model, 'arch', type(model).__name__)} ({weights}) over {len(train)} training images of "
         f"{data} at {model.preprocessing.resize}->{model.preprocessing.crop}")
    loader = eval_loader(dataset, batch_size, workers, device.type == "cuda")
    logits, labels = predict_logits(model.to(device), loader, device, progress=progress)
    bad_paths = set(dataset.bad_paths)
    bad = [i for i, sample in enumerate(train.samples) if sample.path in bad_paths]
    if bad:  # ImageDataset put the next image's logits there; those rows are never looked up in training
        logits[bad] = 0.0
        echo(f"warning: {len(bad)} undecodable image(s) got uniform logits, e.g. {train.samples[bad[0]].path}")
    fingerprint = teacher_fingerprint(weights)
    info = CheckpointInfo(classes=tuple(train.classes), preprocessing=model.preprocessing,
                          extra={TEACHER: fingerprint, PATHS_RELATIVE_TO: "data root",
                                 TEACHER_ARCH: str(getattr(model, "arch", type(model).__name__))})
    save_teacher_logits(out, split_keys(train.samples, data), logits, info)
    accuracy = topk_accuracy(logits, labels, ks=(1,))["top1"]
    return {"out": Path(out), "images": len(train), "classes": len(train.classes), "teacher": fingerprint,
            "teacher_top1": accuracy}

