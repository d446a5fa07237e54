"""Weights files: our safetensors checkpoints (metadata rebuilds the model) and plain state
dicts of torchvision / timm, which load by name because our modules use their names."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from finegrain import __version__
from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path
from finegrain.models import registry
from finegrain.preprocessing import Preprocessing

META_ARCH = "finegrain.arch"


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file or a torch file loaded with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise FinegrainError(f"Weights file {path} does not exist. Pass the path of a .safetensors or .pth file.")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise FinegrainError(f"{path} is not a readable safetensors file ({error}). Re-create or re-download it.") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FinegrainError(
            f"{path} could not be loaded as a tensors-only torch file ({type(error).__name__}). "
            "finegrain never unpickles arbitrary objects: save a plain state_dict, or convert with `finegrain convert`."
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise FinegrainError(f"{path} does not hold a state dict of tensors. Save model.state_dict() instead.")
    return {key.removeprefix("module."): value for key, value in loaded.items()}, {}


def describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between a model's parameters and a state dict."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in state.items() if not k.startswith(skip)}
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in given]
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in given.items() if k not in own]
    problems += [
        f"shape {k}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items() if k in given and given[k].shape != v.shape
    ]
    return problems


def mismatch_error(path: str | Path, arch: str, problems: list[str]) -> FinegrainError:
    shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
    return FinegrainError(
        f"Weights {path} do not fit {arch!r} ({len(problems)} differences: {shown}). "
        "Pick the --arch/model the file was made for, or pass the matching overrides (base_width, num_classes)."
    )


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    problems = describe_mismatch(model, state)
    if problems:
        raise mismatch_error(path, getattr(model, "arch", type(model).__name__), problems)
    model.load_state_dict(state)


def model_metadata(model: nn.Module, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata that lets `load_model` rebuild `model` from the file alone."""
    cfg = getattr(model, "cfg", None)
    num_classes = getattr(cfg, "num_classes", None)
    if num_classes is None:
        num_classes = getattr(model, "num_classes", 0)
    metadata = {
        "format": "pt",
        META_ARCH: model.arch,
        "finegrain.num_classes": str(num_classes),
        "finegrain.overrides": json.dumps(model.overrides, sort_keys=True),
        "finegrain.preprocessing": model.preprocessing.to_json(),
        "finegrain.version": __version__,
    }
    metadata.update(extra or {})
    return metadata


def save_model(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write weights + rebuild metadata as safetensors, atomically (temp name, then rename)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=model_metadata(model, extra_metadata))
    return Path(path)


def build_any(arch: str, num_classes: int, overrides: dict[str, Any]) -> nn.Module:
    """A registered variant, or `timm/NAME` built by timm with random weights (never downloaded)."""
    if not arch.startswith("timm/"):
        return registry.build(arch, num_classes, **overrides)
    import timm

    try:
        model = timm.create_model(arch[5:], pretrained=False, num_classes=num_classes, **overrides)
    except RuntimeError as error:
        raise FinegrainError(f"timm has no model {arch[5:]!r} ({error}). See timm.list_models().") from None
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    model.arch, model.overrides = arch, dict(overrides)
    model.preprocessing = Preprocessing(
        mean=tuple(255 * m for m in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(255 * s for s in cfg.get("std", (0.229, 0.224, 0.225))),
        train_size=size, resize=round(size / cfg.get("crop_pct", 0.875)), crop=size,
    )
    return model


def load_model(path: str | Path, **runtime_overrides: Any) -> nn.Module:
    """Rebuild a model from one of our checkpoints alone (architecture, head, preprocessing)."""
    state, metadata = read_weights(path)
    if META_ARCH not in metadata:
        raise FinegrainError(
            f"{path} has no finegrain metadata (a plain state dict?). Use create_model(NAME, weights=...) "
            "or convert it first with `finegrain convert --from torchvision|timm`."
        )
    overrides = {**json.loads(metadata["finegrain.overrides"]), **runtime_overrides}
    model = build_any(metadata[META_ARCH], int(metadata["finegrain.num_classes"]), overrides)
    load_exact(model, state, path)
    model.preprocessing = Preprocessing.from_json(metadata["finegrain.preprocessing"])
    model.metadata = metadata
    return model


def create_model(name: str, num_classes: int = 1000, weights: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a named model; `weights` (a local file, never a download) must fit it exactly.

    Accepts our safetensors checkpoints (their preprocessing is adopted) and plain state dicts of
    torchvision's resnet50/101/152 and timm's resnet50d, whose names our modules share.
    """
    model = build_any(name, num_classes, overrides)
    if weights is not None:
        state, metadata = read_weights(weights)
        load_exact(model, state, weights)
        if "finegrain.preprocessing" in metadata:
            model.preprocessing = Preprocessing.from_json(metadata["finegrain.preprocessing"])
        model.metadata = metadata
    return model


def create_embedder(
    name: str,
    embedding_size: int = 1536,
    num_classes: int = 0,
    weights: str | Path | None = None,
    gem_p: float = 3.0,
    learnable_p: bool = False,
    **overrides: Any,
) -> nn.Module:
    """A retrieval network: stride-free Stage 4, GeM, 1x1 embedding + BN, L2-normalised output.

    `weights` may be a backbone (classifier) checkpoint, whose head is then left at random, or an
    embedder checkpoint of the same shape, loaded whole.
    """
    if variant_family(name) != "resnet":
        raise FinegrainError(f"Embedders are built on ResNet-family backbones; {name!r} is not one.")
    overrides = {"global_pool": "gem", "stage4_stride": 1, "embedding_size": embedding_size,
                 "gem_p": gem_p, "gem_learnable": learnable_p, **overrides}
    model = build_any(name, num_classes, overrides)
    if weights is not None:
        state, metadata = read_weights(weights)
        if describe_mismatch(model, state):
            load_backbone_weights(model, weights)
        else:
            model.load_state_dict(state)
            if "finegrain.preprocessing" in metadata:
                model.preprocessing = Preprocessing.from_json(metadata["finegrain.preprocessing"])
    return model


def variant_family(name: str) -> str:
    return "timm" if name.startswith("timm/") else registry.variant(name).family


def load_backbone_weights(model: nn.Module, path: str | Path, reset_bn_stats: bool = False) -> dict[str, int]:
    """Warm start: copy every weight but the classifier and embedding, which must all fit.

    reset_bn_stats zeroes the BN running means and sets variances to 1, as the release's
    fine-tuning does (its BN statistics are re-estimated with the BN momentum rule).
    """
    state, metadata = read_weights(path)
    skip = model.classifier_prefixes() if hasattr(model, "classifier_prefixes") else ("fc.", "classifier.", "head.")
    problems = [p for p in describe_mismatch(model, state, skip) if not p.startswith("unexpected")]
    if problems:
        raise mismatch_error(path, getattr(model, "arch", type(model).__name__), problems)
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith(skip) and k in own}
    model.load_state_dict(backbone, strict=False)
    if reset_bn_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.reset_running_stats()
    if "finegrain.preprocessing" in metadata:
        model.preprocessing = Preprocessing.from_json(metadata["finegrain.preprocessing"])
    return {"loaded": len(backbone), "skipped": len(state) - len(backbone)}
