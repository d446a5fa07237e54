"""Writing the deployable network as ONNX: torch's TorchScript-based exporter (`dynamo=False`,
which needs no network and no onnxscript), a dynamic or fixed batch, the metadata in
`metadata_props`, and the file checked with onnx's checker before it replaces anything.

An operator the chosen opset lacks gives one message naming the operator and the opset to use.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.models.onnx_model import import_optional

DEFAULT_OPSET = 17
# Per-channel QDQ quantization needs QuantizeLinear's axis, added in opset 13; so do our SK blocks (unflatten).
MIN_QUANTIZE_OPSET = 13
MIN_OPSET = 7  # the oldest opset onnxruntime guarantees to run
INPUT, OUTPUT = "images", "output"


def _opset_error(arch: str, opset: int, error: Exception) -> FinegrainError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    added = re.search(r"added in (?:opset )?version (\d+)", message)
    fix = f"Pass --opset {added.group(1)} or later" if added else f"Pass a newer --opset (default {DEFAULT_OPSET})"
    return FinegrainError(f"{arch} cannot be exported to ONNX opset {opset}: {message[:300]} {fix}.")


def write_onnx(module: nn.Module, example: Tensor, path: Path, *, arch: str, opset: int, dynamic_batch: bool,
               metadata: dict[str, str]) -> None:
    """Export `module` traced on `example` to `path` (a fresh temporary path: the caller makes it
    final) with `metadata` as metadata_props."""
    import_optional("onnx")  # before minutes of tracing, not after
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            # The legacy exporter's deprecation notice and the tracer's notes about Python-level
            # shape checks (BigLittle's minimum input size) concern the exporter, not the user.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes=axes, do_constant_folding=True,
                              external_data=False)
    except (torch.onnx.errors.UnsupportedOperatorError, torch.onnx.errors.SymbolicValueError) as error:
        raise _opset_error(arch, opset, error) from None
    except RuntimeError as error:  # "Unsupported onnx_opset_version: 40"
        if "opset" not in str(error).lower():
            raise
        raise FinegrainError(f"torch cannot export ONNX opset {opset} ({str(error)[:200]}). Pass an older --opset "
                             f"(default {DEFAULT_OPSET}).") from None
    add_metadata(path, metadata)


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set `metadata` as the file's metadata_props (replacing any of the same keys), then check it."""
    onnx = import_optional("onnx")
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def onnx_outputs(path: Path, images: Tensor) -> Tensor:
    """What onnxruntime computes for `images` with the file at `path` (one thread: a check, not a run)."""
    ort = import_optional("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
