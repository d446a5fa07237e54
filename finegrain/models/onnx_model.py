"""Running an exported ONNX file through onnxruntime behind the interface of our models, so the
one predictor (eval/inference.py) and every command built on it (`finegrain eval`, `finegrain
index build/search`) check the deployed artefact itself, not the checkpoint it came from.

An exported file is an outside file: its size is bounded before onnxruntime parses it, and its
metadata (the checkpoint's own `finegrain.*` keys plus `finegrain.export`) goes through the same
validating reader as a checkpoint's (models/metadata.py) before anything uses it. It lives in
`models`, beside the checkpoint readers, so that loading a model can take an exported file too;
`finegrain export` (export/) writes what it reads.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.models.metadata import FIX, CheckpointInfo, parse_metadata, require
from finegrain.preprocessing import Preprocessing

EXPORT_KEY = "finegrain.export"
FORMAT_VERSION = 1
OUTPUTS = ("logits", "embedding")
INPUT_KINDS = ("float_nchw", "uint8_nhwc")
# protobuf's own limit for one message: an ONNX file without external data cannot be larger.
MAX_ONNX_BYTES = 2 * 1024**3
MAX_METADATA_ENTRIES = 512
MAX_METADATA_CHARS = 64 * 1024**2  # class names of a 1,000,000-class head fit; a crafted file does not grow us
MISSING_EXTRA = "pip install 'finegrain[export]'"


def import_optional(name: str) -> ModuleType:
    """onnx / onnxruntime, or one message naming the extra that installs them."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FinegrainError(f"Exporting and running ONNX files needs the package {name}, which is not installed. "
                             f"Install it with: {MISSING_EXTRA}") from None


@dataclass(frozen=True)
class ExportSpec:
    """What an exported graph computes and how to feed it (the `finegrain.export` key).

    output: "logits" or "embedding" (L2-normalised). input_kind: "float_nchw" (normalised by
    the preprocessing's mean and std) or "uint8_nhwc" (decoded RGB pixels, normalised inside).
    batch: None for a dynamic batch, else the fixed batch size. resolution: the square input side.
    """

    output: str
    input_kind: str
    resolution: int
    batch: int | None = None
    opset: int | None = None
    quantized: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        layout = {"float_nchw": ("NCHW", "float32", "(pixel - mean) / std, pixels in 0-255 RGB"),
                  "uint8_nhwc": ("NHWC", "uint8", "raw 0-255 RGB pixels; normalised inside the graph")}[self.input_kind]
        return json.dumps({**dataclasses.asdict(self), "input": {
            "name": "images", "layout": layout[0], "dtype": layout[1], "color": "RGB", "range": layout[2]}})


@dataclass(frozen=True)
class ExportedFile:
    """The validated metadata of an exported file: the checkpoint's record and the export's."""

    info: CheckpointInfo
    spec: ExportSpec
    metadata: dict[str, str]

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing


def _whole(value: Any, low: int, high: int, what: str, source: str | Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FinegrainError(f"{source}: metadata {EXPORT_KEY} {what} must be an integer in [{low}, {high}]. {FIX}")
    return value


def parse_spec(text: str, source: str | Path) -> ExportSpec:
    """The `finegrain.export` value, every field checked (a flipped bit names the field)."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise FinegrainError(f"{source}: metadata {EXPORT_KEY} is not valid JSON. {FIX}") from None
    fields = {f.name for f in dataclasses.fields(ExportSpec)}
    if not isinstance(raw, dict) or not fields <= set(raw) <= fields | {"input"}:
        raise FinegrainError(f"{source}: metadata {EXPORT_KEY} must be a JSON object with the keys "
                             f"{', '.join(sorted(fields))}. {FIX}")
    if raw["output"] not in OUTPUTS or raw["input_kind"] not in INPUT_KINDS or raw["quantized"] not in (None, "int8"):
        raise FinegrainError(f"{source}: metadata {EXPORT_KEY} has an unknown output, input_kind or quantized "
                             f"value. {FIX}")
    _whole(raw["format_version"], FORMAT_VERSION, FORMAT_VERSION, "format_version", source)
    return ExportSpec(output=raw["output"], input_kind=raw["input_kind"],
                      resolution=_whole(raw["resolution"], 1, 16384, "resolution", source),
                      batch=None if raw["batch"] is None else _whole(raw["batch"], 1, 1_000_000, "batch", source),
                      opset=None if raw["opset"] is None else _whole(raw["opset"], 1, 1000, "opset", source),
                      quantized=raw["quantized"])


def parse_export_metadata(metadata: Mapping[str, Any], source: str | Path) -> ExportedFile:
    """An exported file's metadata map -> ExportedFile, bounded and validated like a checkpoint's.

    Refuses a file that is not a finegrain export (no `finegrain.export` or no architecture),
    naming the file and what to do.
    """
    if len(metadata) > MAX_METADATA_ENTRIES or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in metadata.items()):
        raise FinegrainError(f"{source}: its metadata is not a map of at most {MAX_METADATA_ENTRIES} texts. {FIX}")
    if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_CHARS:
        raise FinegrainError(f"{source}: its metadata holds more than {MAX_METADATA_CHARS} characters. {FIX}")
    if EXPORT_KEY not in metadata:
        raise FinegrainError(f"{source} was not made by `finegrain export` (no {EXPORT_KEY} metadata): finegrain "
                             "cannot know its preprocessing. Export the checkpoint with `finegrain export`.")
    spec = parse_spec(metadata[EXPORT_KEY], source)
    info = parse_metadata({k: v for k, v in metadata.items() if k != EXPORT_KEY}, source)
    require(info, source, "architecture", "num_classes", "preprocessing")
    return ExportedFile(info, spec, dict(metadata))


def check_size(path: Path, limit: int = MAX_ONNX_BYTES) -> None:
    if not path.is_file():
        raise FinegrainError(f"{path} does not exist. Pass the path of a file made by `finegrain export`.")
    size = path.stat().st_size
    if size > limit:
        raise FinegrainError(f"{path} is {size} bytes, more than the {limit} an exported model may have. {FIX}")


class OnnxModel(nn.Module):
    """An exported ONNX graph as the predictor sees a model: `model(x)` gives logits, and
    `forward_embedding(x)` embeddings when the file was exported with `--task embed`.

    It carries `arch`, `info`, `preprocessing` and `metadata` like a loaded checkpoint. It has no
    parameters, so BN folding and device moves leave it alone; a deep copy is the same session
    (inference does not change it). Inputs are normalised float [B, 3, H, W] on any device; a
    uint8-input graph gets them back as pixels (the loaders' pixels are whole numbers).
    """

    def __init__(self, session: Any, exported: ExportedFile, path: Path) -> None:
        super().__init__()
        self.session, self.exported, self.path = session, exported, path
        self.arch, self.info, self.preprocessing = exported.info.architecture, exported.info, exported.preprocessing
        self.metadata = exported.metadata
        self.input_name = session.get_inputs()[0].name
        if exported.spec.output == "embedding":
            self.forward_embedding = self._run

    def __deepcopy__(self, memo: dict) -> "OnnxModel":
        return self

    def _run(self, images: Tensor) -> Tensor:
        spec = self.exported.spec
        if tuple(images.shape[-2:]) != (spec.resolution, spec.resolution):
            raise FinegrainError(f"{self.path} was exported for {spec.resolution}x{spec.resolution} inputs, got "
                                 f"{tuple(images.shape[-2:])}. Export it again with --resolution "
                                 f"{images.shape[-1]}, or feed images of its size.")
        batch = images.detach().float().cpu()
        if spec.input_kind == "uint8_nhwc":
            pre = self.preprocessing
            batch = batch * torch.tensor(pre.std).view(1, 3, 1, 1) + torch.tensor(pre.mean).view(1, 3, 1, 1)
            batch = batch.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        array = np.ascontiguousarray(batch.numpy())
        outputs = [self.session.run(None, {self.input_name: part})[0] for part in self._chunks(array)]
        return torch.from_numpy(np.concatenate(outputs)[:len(array)]).to(images.device)

    def _chunks(self, array: np.ndarray) -> list[np.ndarray]:
        """A fixed-batch graph takes exactly its batch: pad the last chunk, cut the output after."""
        size = self.exported.spec.batch
        if size is None or len(array) == size:
            return [array]
        chunks = []
        for start in range(0, len(array), size):
            part = array[start:start + size]
            chunks.append(np.concatenate([part, np.zeros((size - len(part),) + part.shape[1:], part.dtype)])
                          if len(part) < size else part)
        return chunks

    def forward(self, images: Tensor) -> Tensor:
        return self._run(images)

    def forward_features(self, images: Tensor) -> Tensor:
        raise FinegrainError(f"{self.path} gives {self.exported.spec.output} only: embedding or indexing needs a file "
                             "exported with `finegrain export --task embed`.")


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxModel:
    """An exported ONNX file as a model for the predictor (onnxruntime's CPU provider).

    The size is checked before onnxruntime parses the file and the metadata before it is used.
    `threads`: onnxruntime's intra-op threads (default: its own choice, all cores).
    """
    path = Path(path)
    check_size(path)
    ort = import_optional("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for files it cannot read
        raise FinegrainError(f"{path} is not an ONNX model onnxruntime can load ({str(error)[:200]}). "
                             f"{FIX}") from None
    exported = parse_export_metadata(dict(session.get_modelmeta().custom_metadata_map), path)
    check_signature(session, exported.spec, path)
    return OnnxModel(session, exported, path)


def check_signature(session: Any, spec: ExportSpec, path: Path) -> None:
    """The graph takes the one input its metadata describes and gives a float output, so that a
    damaged file is refused here by name, not by onnxruntime in the middle of an evaluation."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    side, batch = spec.resolution, spec.batch
    dtype, dims = (("float", (batch, 3, side, side)) if spec.input_kind == "float_nchw"
                   else ("uint8", (batch, side, side, 3)))
    shape = inputs[0].shape if len(inputs) == 1 else []
    if (len(inputs) != 1 or inputs[0].type != f"tensor({dtype})" or len(shape) != 4
            or any(isinstance(got, int) and want is not None and got != want for got, want in zip(shape, dims))
            or not outputs or outputs[0].type != "tensor(float)"):
        raise FinegrainError(f"{path}: its graph does not match its metadata, which promises one {dtype} input of "
                             f"shape {['batch' if d is None else d for d in dims]} and a float output. {FIX}")
