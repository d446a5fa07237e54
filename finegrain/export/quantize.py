"""INT8 for CPUs: onnxruntime's static quantization of an exported FP32 graph (QDQ format,
per-channel weights), its activation ranges calibrated on a folder of the user's own images
preprocessed exactly as evaluation preprocesses them.

Activations are unsigned, weights signed (U8S8, onnxruntime's fast CPU kernels). Without VNNI
(AVX2 only) those kernels multiply with VPMADDUBSW, whose 16-bit sums can saturate; onnxruntime's
remedy is 7-bit weights (`reduce_range`), chosen here from the CPU's flags.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from finegrain.data.base import IMAGE_EXTENSIONS
from finegrain.data.images import decode_rgb
from finegrain.errors import FinegrainError
from finegrain.data.transforms import eval_transform, retrieval_eval_transform
from finegrain.export.onnx_export import INPUT
from finegrain.models.onnx_model import import_optional

MAX_CALIBRATION_IMAGES = 64  # onnxruntime keeps every activation of every image until it computes the ranges


def calibration_images(folder: Path, limit: int = MAX_CALIBRATION_IMAGES) -> list[Path]:
    """Up to `limit` images under `folder`, spread evenly over its sorted listing (every class
    folder is represented, not only the first ones)."""
    if not folder.is_dir():
        raise FinegrainError(f"Calibration folder {folder} does not exist. Pass --calibrate with a folder of images "
                             "like those the model will see (a few hundred are enough).")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FinegrainError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). Pass --calibrate "
                             "with a folder of images.")
    step = max(1, len(files) / limit)
    return [files[int(i * step)] for i in range(min(limit, len(files)))]


def calibration_batches(model: nn.Module, paths: list[Path], pixels: bool, embed: bool, batch_size: int = 16
                        ) -> Iterator[np.ndarray]:
    """The images as the exported graph takes them, preprocessed as its task evaluates them (a
    classifier: short side resized, centre crop; an embedder: the index's square resize):
    normalised float NCHW, or uint8 NHWC pixels for a graph that normalises inside."""
    pre = model.preprocessing
    transform = retrieval_eval_transform(pre, size=pre.crop) if embed else eval_transform(pre)
    std, mean = torch.tensor(pre.std).view(3, 1, 1), torch.tensor(pre.mean).view(3, 1, 1)
    rows = []
    for path in paths:
        tensor = transform(decode_rgb(str(path)))
        if pixels:
            tensor = (tensor * std + mean).round().clamp(0, 255).byte().permute(1, 2, 0)
        rows.append(tensor.numpy())
        if len(rows) == batch_size:
            yield np.stack(rows)
            rows = []
    if rows:
        yield np.stack(rows)


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI (AVX512-VNNI or AVX-VNNI): 8-bit dot products without saturation."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8(fp32: Path, int8: Path, model: nn.Module, calibrate: Path, *, pixels: bool, embed: bool,
                  fixed_batch: int | None) -> None:
    """Write the INT8 (QDQ, per-channel) version of the FP32 graph `fp32` to `int8`."""
    quantization = import_optional("onnxruntime.quantization")
    paths = calibration_images(calibrate)
    if fixed_batch is not None and len(paths) < fixed_batch:
        raise FinegrainError(f"{calibrate}: {len(paths)} calibration images (at most {MAX_CALIBRATION_IMAGES} are "
                             f"used) are fewer than one batch of the fixed --batch {fixed_batch}. Export with "
                             "--batch dynamic, or a smaller batch.")
    # A fixed-batch graph takes only full batches.
    batches = (batch for batch in calibration_batches(model, paths, pixels, embed, batch_size=fixed_batch or 16)
               if fixed_batch is None or len(batch) == fixed_batch)

    class Reader(quantization.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {INPUT: batch}

    prepared = int8.with_name(int8.name + ".prepared.onnx")
    quantization.shape_inference.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantization.quantize_static(str(prepared), str(int8), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, reduce_range=not cpu_has_vnni(),
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8,
                                 calibrate_method=quantization.CalibrationMethod.MinMax)
    prepared.unlink(missing_ok=True)
