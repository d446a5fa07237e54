"""Weights files: our safetensors checkpoints and plain state dicts of torchvision / timm (which
load by name because our modules use their names), read bounded and checked, written atomically.

Reading never trusts the file: a safetensors header is validated (models/metadata.py) before a
tensor is loaded, and every floating tensor must be finite unless the caller opts out to inspect
a damaged or diverged file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path
from finegrain.models.metadata import FIX, CheckpointInfo, SafetensorsHeader, parse_metadata, read_header, to_metadata

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_OTHER_DTYPES = {torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                 torch.bool: "BOOL"}
Shapes = Mapping[str, tuple[tuple[int, ...], str]]  # name -> (shape, safetensors dtype, or "float")
NON_FINITE_FIX = ("Use an earlier checkpoint of the run, or re-create the file; to inspect it anyway, pass "
                  "allow_non_finite=True (--allow-non-finite).")


def check_finite(state: Mapping[str, torch.Tensor], path: str | Path, fix: str = NON_FINITE_FIX) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: they predict nothing."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise FinegrainError(f"{path}: tensor {name} holds {bad} non-finite value(s) (NaN or inf); the run that "
                                 f"made it diverged or the file is damaged. {fix}")


def read_tensors(header: SafetensorsHeader, allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a file whose header was read (and checked) already."""
    try:
        with safe_open(str(header.path), framework="pt") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # the file changed since its header was read, or a dtype torch lacks
        raise FinegrainError(f"{header.path}: its tensors cannot be read ({str(error)[:200]}). {FIX}") from None
    if not allow_non_finite:
        check_finite(state, header.path)
    return state


@dataclass
class WeightsFile:
    """A weights file opened for checking: its entries' shapes and its metadata are known before
    its tensors are loaded (safetensors), so a model can be compared with it first."""

    path: Path
    shapes: dict[str, tuple[tuple[int, ...], str]]
    info: CheckpointInfo
    metadata: dict[str, str]
    header: SafetensorsHeader | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # a torch file is loaded whole to be read

    def tensors(self, allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
        if self.header is not None:
            return read_tensors(self.header, allow_non_finite)
        if not allow_non_finite:
            check_finite(self.state, self.path)
        return self.state


def open_weights(path: str | Path) -> WeightsFile:
    """A safetensors file (header bounded, metadata validated, nothing loaded) or a torch file
    (loaded with weights_only: never unpickles objects)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        header = read_header(path)
        return WeightsFile(path, header_shapes(header), parse_metadata(header.metadata, path), header.metadata, header)
    if not path.is_file():
        raise FinegrainError(f"Weights file {path} does not exist. Pass the path of a .safetensors or .pth file.")
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
    state = {str(key).removeprefix("module."): value for key, value in loaded.items()}
    return WeightsFile(path, state_shapes(state), CheckpointInfo(), {}, state=state)


def read_weights(path: str | Path, allow_non_finite: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file (metadata validated) or a tensors-only torch
    file; floating tensors must be finite unless `allow_non_finite`."""
    weights = open_weights(path)
    return weights.tensors(allow_non_finite), weights.metadata


# ----------------------------------------------------------------------------- fitting weights
def model_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each state-dict entry's shape and dtype class ("float", or the safetensors integer name)."""
    return {name: (tuple(value.shape), "float" if value.is_floating_point() else _OTHER_DTYPES.get(value.dtype, "?"))
            for name, value in model.state_dict().items()}


def header_shapes(header: SafetensorsHeader) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (entry.shape, "float" if entry.dtype in FLOAT_DTYPES else entry.dtype)
            for name, entry in header.tensors.items()}


def state_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (tuple(value.shape), "float" if value.is_floating_point() else _OTHER_DTYPES.get(value.dtype, "?"))
            for name, value in state.items()}


def describe_mismatch(own: Shapes, given: Shapes, skip: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between a model's entries and a file's (shapes and dtype class)."""
    own = {k: v for k, v in own.items() if not k.startswith(skip)}
    given = {k: v for k, v in given.items() if not k.startswith(skip)}
    problems = [f"missing {k} {v[0]}" for k, v in own.items() if k not in given]
    problems += [f"unexpected {k[:100]} {v[0]}" for k, v in given.items() if k not in own]
    problems += [f"shape {k}: file {given[k][0]} vs model {v[0]}" for k, v in own.items()
                 if k in given and given[k][0] != v[0]]
    problems += [f"dtype {k}: file {given[k][1]} vs model {v[1]}" for k, v in own.items()
                 if k in given and given[k][0] == v[0] and given[k][1] != v[1]]
    return problems


def mismatch_error(path: str | Path, arch: str, problems: list[str], fix: str | None = None) -> FinegrainError:
    shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
    return FinegrainError(
        f"Weights {path} do not fit {arch!r} ({len(problems)} differences: {shown}). "
        + (fix or "Use weights made for this model, or pass the overrides it was made with (base_width, num_classes).")
    )


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    problems = describe_mismatch(model_shapes(model), state_shapes(state))
    if problems:
        raise mismatch_error(path, getattr(model, "arch", type(model).__name__), problems)
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------- writing
def model_info(model: nn.Module, **fields: Any) -> CheckpointInfo:
    """What lets `load_model` rebuild `model` from the file alone, plus the caller's `fields`
    (classes, data, task, epoch, ...: see CheckpointInfo)."""
    from finegrain import __version__

    num_classes = getattr(getattr(model, "cfg", None), "num_classes", None)
    if num_classes is None:
        num_classes = getattr(model, "num_classes", 0)
    return CheckpointInfo(architecture=model.arch, num_classes=int(num_classes),
                          overrides=json.loads(json.dumps(model.overrides)), preprocessing=model.preprocessing,
                          version=__version__, extra={"format": "pt"}, **fields)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically, readable like any other file the user creates
    (safetensors itself creates it 0600; under the usual umask this gives 0644)."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
    return Path(path)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def save_model(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None,
               **fields: Any) -> Path:
    """Write weights + the metadata that rebuilds the model; `fields` are CheckpointInfo fields
    (classes=..., epoch=...), `extra_metadata` raw keys. What `load_model` would refuse (a bad
    value, a non-finite weight) is refused here, before anything is written."""
    metadata = {**to_metadata(model_info(model, **fields)), **(extra_metadata or {})}
    parse_metadata(metadata, path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    check_finite(state, path, "Not written: lower the learning rate or check the data, and train again.")
    return write_safetensors(state, path, metadata)
