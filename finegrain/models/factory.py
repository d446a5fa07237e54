"""Building models: by name (random weights, or weights given as a file), from one of our
checkpoints alone, or as a retrieval embedder.

Whatever comes from a file is checked before a full-size model exists: the overrides against
their bounds (registry.check_overrides), then the tensors the metadata implies (a copy of the
model built on the meta device, which allocates nothing) against the file's header. So crafted
metadata cannot make us build a network of 200,000 blocks, and a damaged file fails in
milliseconds with the names of the tensors that differ.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.models import registry
from finegrain.models.checkpoint import (FIX, describe_mismatch, header_shapes, mismatch_error, model_shapes,
                                         open_weights, read_tensors)
from finegrain.models.metadata import ARCH, NUM_CLASSES, OVERRIDES, parse_metadata, read_header, require
from finegrain.models.onnx_model import is_onnx_file, load_onnx_model
from finegrain.preprocessing import Preprocessing

# Settings of a task's head, not of the backbone: a warm start from a file keeps the new task's own.
HEAD_OVERRIDES = ("global_pool", "stage4_stride", "embedding_size", "gem_p", "gem_learnable")
TIMM_HEADS = ("fc.", "classifier.", "head.")


def build_any(arch: str, num_classes: int, overrides: Mapping[str, Any]) -> nn.Module:
    """A registered variant, or `timm/NAME` built by timm with random weights (never downloaded)."""
    if registry.family_of(arch) != "timm":
        return registry.build(arch, num_classes, **overrides)
    checked = registry.check_overrides(arch, overrides, num_classes)
    import timm

    if not timm.is_model(arch[5:]):
        raise FinegrainError(f"timm has no model {arch[5:]!r}. See timm.list_models().")
    try:
        model = timm.create_model(arch[5:], pretrained=False, num_classes=num_classes, **checked)
    except (RuntimeError, ValueError, TypeError) as error:
        raise FinegrainError(f"timm cannot build {arch[5:]!r} with {num_classes} classes ({error}).") from None
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    model.arch, model.overrides = arch, dict(checked)
    model.preprocessing = Preprocessing(
        mean=tuple(255 * m for m in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(255 * s for s in cfg.get("std", (0.229, 0.224, 0.225))),
        train_size=size, resize=round(size / cfg.get("crop_pct", 0.875)), crop=size,
    )
    return model


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the task head, which a warm start from another task does not copy."""
    return model.classifier_prefixes() if hasattr(model, "classifier_prefixes") else TIMM_HEADS


@functools.lru_cache(maxsize=16)
def _meta_entries(arch: str, num_classes: int, overrides_json: str) -> tuple[tuple, tuple[str, ...]]:
    with torch.device("meta"):
        model = build_any(arch, num_classes, json.loads(overrides_json))
    return tuple(model_shapes(model).items()), classifier_prefixes(model)


def expected_entries(arch: str, num_classes: int, overrides: Mapping[str, Any]
                     ) -> tuple[dict[str, tuple[tuple[int, ...], str]], tuple[str, ...]]:
    """(state-dict shapes and dtype classes, head prefixes) of a model, without allocating it."""
    entries, heads = _meta_entries(arch, num_classes, json.dumps(dict(overrides), sort_keys=True))
    return dict(entries), heads


def load_model(path: str | Path, *, allow_non_finite: bool = False, **runtime_overrides: Any) -> nn.Module:
    """Rebuild a model from one of our checkpoints alone (architecture, head, preprocessing).

    The metadata is validated and the tensors it implies compared with the file's header before
    the model is built; the weights must be finite unless `allow_non_finite` (to inspect a run
    that diverged). The model carries the file's `info` (CheckpointInfo) and raw `metadata`.
    An ONNX file written by `finegrain export` loads as onnxruntime behind the same interface.
    """
    if is_onnx_file(path):
        return load_onnx_model(path)
    header = read_header(path)
    info = parse_metadata(header.metadata, path)
    if info.architecture is None:
        raise FinegrainError(
            f"{path} has no finegrain metadata (a plain state dict?). Use create_model(NAME, weights=...) "
            "or convert it first with `finegrain convert --from torchvision|timm`."
        )
    require(info, path, "num_classes", "overrides", "preprocessing")
    overrides = {**info.overrides, **runtime_overrides}
    expected, _ = expected_entries(info.architecture, info.num_classes, overrides)
    problems = describe_mismatch(expected, header_shapes(header))
    if problems:
        raise mismatch_error(path, info.architecture, problems,
                             f"Its tensors are not those of the model its metadata ({ARCH}, {OVERRIDES}, "
                             f"{NUM_CLASSES}) describes. {FIX}")
    state = read_tensors(header, allow_non_finite)
    model = build_any(info.architecture, info.num_classes, overrides)
    model.load_state_dict(state)
    model.preprocessing, model.info, model.metadata = info.preprocessing, info, header.metadata
    return model


def create_model(name: str, num_classes: int = 1000, weights: str | Path | None = None, *,
                 allow_non_finite: bool = False, **overrides: Any) -> nn.Module:
    """Build a named model; `weights` (a local file, never a download) must fit it exactly.

    Accepts our safetensors checkpoints (their preprocessing is adopted) and plain state dicts of
    torchvision's resnet50/101/152 and timm's resnet50d, whose names our modules share.
    """
    model = build_any(name, num_classes, overrides)
    if weights is not None:
        file = open_weights(weights)
        problems = describe_mismatch(model_shapes(model), file.shapes)
        if problems:
            raise mismatch_error(weights, name, problems)
        model.load_state_dict(file.tensors(allow_non_finite))
        if file.info.preprocessing is not None:
            model.preprocessing = file.info.preprocessing
        model.info, model.metadata = file.info, file.metadata
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
    """A retrieval network: stride-free Stage 4, GeM, 1x1 embedding + BN; calling it gives
    L2-normalised embeddings (with num_classes 0).

    `weights` may be a backbone (classifier) checkpoint, whose head is then left at random, or an
    embedder checkpoint of the same shape, loaded whole.
    """
    if registry.family_of(name) != "resnet":
        raise FinegrainError(f"Embedders are built on ResNet-family backbones; {name!r} is not one.")
    overrides = {"global_pool": "gem", "stage4_stride": 1, "embedding_size": embedding_size,
                 "gem_p": gem_p, "gem_learnable": learnable_p, **overrides}
    model = build_any(name, num_classes, overrides)
    if weights is not None:
        file = open_weights(weights)
        if describe_mismatch(model_shapes(model), file.shapes):
            load_backbone_weights(model, weights)
        else:
            model.load_state_dict(file.tensors())
            if file.info.preprocessing is not None:
                model.preprocessing = file.info.preprocessing
    return model


def load_backbone_weights(model: nn.Module, path: str | Path, reset_bn_stats: bool = False) -> dict[str, int]:
    """Warm start: copy every weight but the classifier and embedding, which must all fit.

    reset_bn_stats zeroes the BN running means and sets variances to 1, as the release's
    fine-tuning does (its BN statistics are re-estimated with the BN momentum rule).
    """
    file = open_weights(path)
    skip = classifier_prefixes(model)
    problems = [p for p in describe_mismatch(model_shapes(model), file.shapes, skip) if not p.startswith("unexpected")]
    if problems:
        raise mismatch_error(path, getattr(model, "arch", type(model).__name__), problems,
                             "Warm-start from weights of this network, or set model.name and model.overrides "
                             "to the network the file was made for.")
    own = model.state_dict()
    state = file.tensors()
    backbone = {k: v for k, v in state.items() if not k.startswith(skip) and k in own}
    model.load_state_dict(backbone, strict=False)
    if reset_bn_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.reset_running_stats()
    if file.info.preprocessing is not None:
        model.preprocessing = file.info.preprocessing
    return {"loaded": len(backbone), "skipped": len(state) - len(backbone)}


def warm_start_architecture(name: str, overrides: Mapping[str, Any], weights: str | Path
                            ) -> tuple[str, dict[str, Any], str | None]:
    """(architecture, overrides, note) to build for a warm start from `weights`.

    `name` with `overrides` when the file's backbone tensors fit them; else the architecture the
    file records (its tensors were saved from that network: a `finegrain convert --arch
    resnet50` file fine-tunes as resnet50 whatever the recipe's default model), with the file's
    overrides minus its head settings. The note says what was chosen instead, and why.
    """
    file = open_weights(weights)
    recorded = file.info.architecture
    if recorded is None:
        return name, dict(overrides), None
    expected, heads = expected_entries(name, 0, overrides)
    if not [p for p in describe_mismatch(expected, file.shapes, heads) if not p.startswith("unexpected")]:
        return name, dict(overrides), None
    kept = {key: value for key, value in (file.info.overrides or {}).items() if key not in HEAD_OVERRIDES}
    return recorded, kept, (f"model: {recorded} {kept or ''} as recorded in {weights} (the recipe's {name} "
                            f"{dict(overrides) or ''} does not fit its tensors)").replace("  ", " ")
