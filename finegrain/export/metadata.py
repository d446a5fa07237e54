"""What an exported file says about itself, so a consumer needs nothing else: the checkpoint's own
record (architecture, classes, preprocessing, task; models/metadata.py writes it) plus the
export's (`finegrain.export`: output, input layout and range, resolution, batch, opset, INT8).

ONNX keeps it in `metadata_props`, TorchScript in the extra file `finegrain.json` of its zip
archive. `read_exported` reads either back for `finegrain export --inspect` without running or
unpickling anything: the size is bounded, the zip entry is read with a byte limit, and every
value goes through the validating reader of models/onnx_model.py.
"""
from __future__ import annotations

import dataclasses
import json
import lzma
import zipfile
import zlib
from pathlib import Path
from typing import Any

from torch import nn

from finegrain.errors import FinegrainError
from finegrain.models.onnx_model import (EXPORT_KEY, MAX_METADATA_CHARS, ExportedFile, ExportSpec, check_size,
                                             import_optional, parse_export_metadata)
from finegrain.models.metadata import FIX, CheckpointInfo, to_metadata

TORCHSCRIPT_EXTRA = "finegrain.json"
ZIP_MAGIC = b"PK\x03\x04"
MAX_TORCHSCRIPT_BYTES = 8 * 1024**3
# What zipfile raises for a damaged archive besides BadZipFile: a broken deflate or LZMA stream, an
# unsupported method or flag (NotImplementedError), an encrypted entry (RuntimeError), a cut stream.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, RuntimeError,
              UnicodeDecodeError, OSError)


def export_metadata(model: nn.Module, spec: ExportSpec) -> dict[str, str]:
    """The metadata map of an export of `model` (loaded by `load_model`, so it carries `info`).

    The preprocessing is the checkpoint's at the exported resolution; the data set's local path
    and keys finegrain does not interpret stay behind (they mean nothing on another machine).
    """
    info: CheckpointInfo = model.info
    preprocessing = model.preprocessing
    if preprocessing.crop != spec.resolution:
        preprocessing = preprocessing.with_eval_size(spec.resolution)
    record = dataclasses.replace(info, preprocessing=preprocessing, data=None, extra={})
    metadata = {**to_metadata(record), EXPORT_KEY: spec.to_json()}
    parse_export_metadata(metadata, "the export")  # what a reader would refuse is never written
    return metadata


def _torchscript_metadata(path: Path) -> dict[str, Any]:
    check_size(path, MAX_TORCHSCRIPT_BYTES)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [e for e in archive.infolist() if e.filename.endswith(f"/extra/{TORCHSCRIPT_EXTRA}")]
            if not entries:
                raise FinegrainError(f"{path} is a TorchScript archive without {TORCHSCRIPT_EXTRA}: it was not made by "
                                     "`finegrain export`. Export the checkpoint with `finegrain export`.")
            if entries[0].file_size > MAX_METADATA_CHARS:
                raise FinegrainError(f"{path}: its {TORCHSCRIPT_EXTRA} is {entries[0].file_size} bytes, more than "
                                     f"{MAX_METADATA_CHARS}. {FIX}")
            with archive.open(entries[0]) as handle:
                text = handle.read(MAX_METADATA_CHARS + 1).decode("utf-8")
    except ZIP_ERRORS as error:
        raise FinegrainError(f"{path} is not a readable TorchScript archive ({str(error)[:200]}). {FIX}") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise FinegrainError(f"{path}: its {TORCHSCRIPT_EXTRA} is not valid JSON. {FIX}") from None
    if not isinstance(value, dict):
        raise FinegrainError(f"{path}: its {TORCHSCRIPT_EXTRA} must be a JSON object of texts. {FIX}")
    return value


def _onnx_metadata(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata_props, graph facts) of an ONNX file, parsed by onnx without external data."""
    check_size(path)
    onnx = import_optional("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and onnx's own errors
        raise FinegrainError(f"{path} is not an ONNX model ({str(error)[:200]}). Pass a .onnx file made by "
                             "`finegrain export --format onnx`.") from None
    facts = {"opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
             "inputs": [_value_info(v) for v in model.graph.input],
             "outputs": [_value_info(v) for v in model.graph.output]}
    return {p.key: p.value for p in model.metadata_props}, facts


def _value_info(value: Any) -> str:
    dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
    return f"{value.name} [{', '.join(dims)}]"


def read_exported(path: str | Path) -> tuple[str, ExportedFile, dict[str, Any]]:
    """(format, validated metadata, graph facts) of a file made by `finegrain export`.

    The format is told by content: a zip archive is TorchScript, a file ending in .onnx is ONNX;
    anything else is refused with what finegrain reads.
    """
    path = Path(path)
    if not path.is_file():
        raise FinegrainError(f"{path} does not exist. Pass the path of a file made by `finegrain export`.")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == ZIP_MAGIC:
        return "torchscript", parse_export_metadata(_torchscript_metadata(path), path), {}
    if path.suffix.lower() == ".onnx":
        metadata, facts = _onnx_metadata(path)
        return "onnx", parse_export_metadata(metadata, path), facts
    raise FinegrainError(f"{path} is neither an ONNX file (.onnx) nor a TorchScript archive: finegrain export "
                         "--inspect reads the files `finegrain export` writes.")


def describe(path: str | Path) -> dict[str, Any]:
    """What `finegrain export --inspect` prints: everything a consumer needs to feed the file."""
    path = Path(path)
    kind, exported, facts = read_exported(path)
    info, spec, pre = exported.info, exported.spec, exported.preprocessing
    spec_json = json.loads(spec.to_json())
    return {"file": str(path), "format": kind, "bytes": path.stat().st_size, "arch": info.architecture,
            "task": info.task, "output": spec.output, "num_classes": info.num_classes,
            "classes": list(info.classes) if info.classes is not None else None,
            "input": {**spec_json["input"], "height": spec.resolution, "width": spec.resolution,
                      "batch": spec.batch or "dynamic"},
            "preprocessing": {"mean": list(pre.mean), "std": list(pre.std), "resize": pre.resize, "crop": pre.crop,
                              "note": f"resize the short side to {pre.resize}, centre-crop {pre.crop}"},
            "opset": spec.opset, "quantized": spec.quantized, "metrics": info.metrics, **facts}
