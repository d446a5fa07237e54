"""torchvision / timm state dicts -> our checkpoint format (names already match our modules)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from finegrain.errors import FinegrainError
from finegrain.models.checkpoint import load_exact, read_weights
from finegrain.models.registry import build

SUPPORTED = ("resnet50", "resnet101", "resnet152", "resnet50d")


def convert_state_dict(path: str | Path, arch: str) -> nn.Module:
    """Load a plain torchvision resnet50/101/152 or timm resnet50d state dict into our model."""
    if arch not in SUPPORTED:
        raise FinegrainError(f"--from torchvision|timm supports {', '.join(SUPPORTED)}; got {arch!r}.")
    state, _ = read_weights(path)
    if "fc.weight" not in state or state["fc.weight"].ndim != 2:
        raise FinegrainError(f"{path} has no 2-D fc.weight: not a torchvision/timm ResNet state dict.")
    model = build(arch, num_classes=state["fc.weight"].shape[0])
    load_exact(model, state, path)
    return model.eval()
