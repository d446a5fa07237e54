"""`export_checkpoint`: one of our checkpoints -> an ONNX or TorchScript file a consumer can run
with nothing of finegrain, checked before it is written.

The order is the cheap checks first (format, batch, opset, calibration folder), then the model
from the checkpoint alone (`load_model` refuses a file without architecture metadata), then the
trace, then a comparison of the written graph's outputs with the PyTorch fast path's on the same
inputs: a file that does not compute what the checkpoint computes is never left behind. The file
appears atomically, so an interrupted export leaves the previous one intact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from finegrain.errors import FinegrainError
from finegrain.export.graph import TASKS, check_task, default_task, deployable, fast_path, reference_outputs
from finegrain.export.metadata import export_metadata
from finegrain.export.onnx_export import (DEFAULT_OPSET, MIN_OPSET, MIN_QUANTIZE_OPSET, add_metadata, onnx_outputs,
                                           write_onnx)
from finegrain.export.quantize import quantize_int8
from finegrain.export.torchscript_export import trace, write_torchscript
from finegrain.fileio import atomic_path
from finegrain.models.onnx_model import ExportSpec, import_optional

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # relative to the largest output: what FP32 kernels of two runtimes may differ by


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    task: str
    resolution: int
    bytes: int
    max_relative_difference: float | None  # None for INT8, whose accuracy is measured on data instead


def parse_batch(text: str) -> int | None:
    """None for "dynamic", else the fixed batch size."""
    if text == "dynamic":
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65536:
        raise FinegrainError(f"--batch must be 'dynamic' or a batch size from 1 to 65536, got {text!r}.")
    return int(text)


def _check_request(fmt: str, task: str | None, opset: int, quantize: str | None, calibrate: Path | None) -> None:
    """The checks that need no model, before minutes of loading and tracing."""
    if fmt not in FORMATS:
        raise FinegrainError(f"Unknown format {fmt!r}. Use --format onnx or --format torchscript.")
    if task is not None and task not in TASKS:
        raise FinegrainError(f"Unknown task {task!r}. Use --task classify (logits) or --task embed (embeddings).")
    if quantize not in (None, "int8"):
        raise FinegrainError(f"Unknown quantization {quantize!r}. Use --quantize int8.")
    if quantize and fmt != "onnx":
        raise FinegrainError("--quantize int8 makes an ONNX file (onnxruntime's quantizer). Use --format onnx.")
    if quantize and calibrate is None:
        raise FinegrainError("--quantize int8 needs --calibrate DIR: a folder of images like those the model will "
                             "see, to measure the range of every activation.")
    if fmt == "onnx" and opset < MIN_OPSET:
        raise FinegrainError(f"onnxruntime runs ONNX opset {MIN_OPSET} or later, got --opset {opset}. Pass --opset "
                             f"{DEFAULT_OPSET}.")
    if quantize and opset < MIN_QUANTIZE_OPSET:
        raise FinegrainError(f"Per-channel INT8 needs ONNX opset {MIN_QUANTIZE_OPSET} or later, got --opset {opset}.")
    if fmt == "onnx":
        import_optional("onnx")
        import_optional("onnxruntime")


def relative_difference(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|: one number for a whole output."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))


def _example(batch: int, resolution: int, pixels: bool) -> Tensor:
    """Random inputs the graph is traced and checked on: normalised floats, or uint8 pixels."""
    if resolution < 1:
        raise FinegrainError(f"--resolution must be a positive number of pixels, got {resolution}.")
    if pixels:
        return torch.randint(0, 256, (batch, resolution, resolution, 3), dtype=torch.uint8)
    return torch.randn(batch, 3, resolution, resolution)


def _normalised(example: Tensor, model: torch.nn.Module, pixels: bool) -> Tensor:
    if not pixels:
        return example
    pre = model.preprocessing
    return (example.permute(0, 3, 1, 2).float() - torch.tensor(pre.mean).view(1, 3, 1, 1)) / \
        torch.tensor(pre.std).view(1, 3, 1, 1)


def export_checkpoint(weights: str | Path, out: str | Path, fmt: str = "onnx", *, task: str | None = None,
                      batch: str = "dynamic", resolution: int | None = None, opset: int = DEFAULT_OPSET,
                      preprocess_in_graph: bool = False, quantize: str | None = None,
                      calibrate: str | Path | None = None) -> ExportReport:
    """Export the model of checkpoint `weights` to `out` as `fmt` (onnx | torchscript).

    task: classify (logits) or embed (L2-normalised embeddings); default: embed for a retrieval
    network, classify otherwise. resolution: the square input side (default: the checkpoint's
    eval crop). preprocess_in_graph: the input is uint8 [B, H, W, 3] RGB pixels.
    """
    from finegrain.models import load_model

    out, calibrate = Path(out), None if calibrate is None else Path(calibrate)
    _check_request(fmt, task, opset, quantize, calibrate)
    fixed_batch = parse_batch(batch)
    model = load_model(weights).eval()
    task = task or default_task(model)
    resolution = resolution or model.preprocessing.crop
    check_task(model, task)
    predictor = fast_path(model)
    example = _example(fixed_batch or 2, resolution, preprocess_in_graph)
    expected = reference_outputs(predictor, task, _normalised(example, model, preprocess_in_graph))
    deployed = deployable(predictor, task, preprocess_in_graph, example)
    spec = ExportSpec(output="embedding" if task == "embed" else "logits",
                      input_kind="uint8_nhwc" if preprocess_in_graph else "float_nchw", resolution=resolution,
                      batch=fixed_batch, opset=opset if fmt == "onnx" else None, quantized=quantize)
    metadata = export_metadata(model, spec)
    with atomic_path(out) as tmp:
        if fmt == "torchscript":
            traced = trace(deployed, example)
            with torch.no_grad():
                difference = relative_difference(traced(example), expected)
            _check(difference, out)
            write_torchscript(traced, tmp, metadata)
        else:
            fp32 = tmp.with_name(tmp.name + ".fp32.onnx") if quantize else tmp
            write_onnx(deployed, example, fp32, arch=model.arch, opset=opset, dynamic_batch=fixed_batch is None,
                       metadata=metadata)
            difference = relative_difference(onnx_outputs(fp32, example), expected)
            _check(difference, out)
            if quantize:
                quantize_int8(fp32, tmp, model, calibrate, pixels=preprocess_in_graph, embed=task == "embed",
                              fixed_batch=fixed_batch)
                add_metadata(tmp, metadata)  # the quantizer keeps the graph, not always its metadata
                difference = None
    return ExportReport(out, fmt, task, resolution, out.stat().st_size, difference)


def _check(difference: float, out: Path) -> None:
    if not difference <= TOLERANCE:
        raise FinegrainError(f"The exported graph's outputs differ from PyTorch's by {difference:.2e} (relative), "
                             f"more than {TOLERANCE}: {out} is not written. Please report this with the checkpoint's "
                             "architecture.")
