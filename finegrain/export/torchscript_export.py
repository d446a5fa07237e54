"""Writing the deployable network as TorchScript: traced (our modules branch on Python values,
not on data, so a trace is the network), the metadata as the archive's extra file
`finegrain.json`, loadable from C++ with `torch::jit::load` and nothing of finegrain.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from finegrain.export.metadata import TORCHSCRIPT_EXTRA


def trace(module: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    """The traced module; torch.jit's deprecation notice and the tracer's note on BigLittle's
    Python-level size check (a constant in the trace, as in eager mode) are not the user's concern."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, (example,), check_trace=False)


def write_torchscript(traced: torch.jit.ScriptModule, path: Path, metadata: dict[str, str]) -> None:
    """Save `traced` to `path` (a fresh temporary path) with `metadata` as its extra file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(metadata)})
