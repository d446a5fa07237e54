"""Fuzz target: the files `finegrain export` writes, read back (`finegrain.models.onnx_model`,
`finegrain.export.metadata`).

An input that starts like a zip archive is a TorchScript file: `describe` (what `finegrain export
--inspect` prints) reads its extra file `finegrain.json` straight from the zip. Anything else is
an ONNX file: `describe` (onnx's parser, metadata_props, graph facts) and then `load_onnx_model`
(onnxruntime's session, the metadata's validating reader, the graph's input). Only FinegrainError
may leave them.

Both formats wrap the metadata in a container that raw byte mutations mostly break (protobuf
lengths, zip CRCs). So the custom mutator decodes the container and changes one thing: for ONNX a
metadata_props value (libFuzzer's mutations of its text, or a number in it turned into an edge
case), a key, the graph's inputs and outputs, an input's type or dims, the opset or IR version, a
node, an initializer; for TorchScript the same metadata edits inside `finegrain.json`, its raw
text, the entry's name, an entry's compression, or a field of a zip header patched after the
archive is written. Now and then the raw file is mutated instead.

    pip install -e ".[fuzz]"
    python tests/fuzz/fuzz_exported.py -atheris_runs=100000 -artifact_prefix=/tmp/fuzz/ /tmp/fuzz/corpus
    python tests/fuzz/fuzz_exported.py --write-seeds            # rebuild the seed corpus
"""
from __future__ import annotations

import atexit
import io
import json
import random
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

try:
    import atheris
except ImportError:  # the replay test runs the corpus without it
    atheris = None

if atheris is not None and __name__ == "__main__" and "--write-seeds" not in sys.argv:
    import onnx  # noqa: F401  (instrument our code, not the libraries)
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["finegrain"]):
        from finegrain.export.metadata import describe
        from finegrain.models.onnx_model import load_onnx_model
else:
    from finegrain.export.metadata import describe
    from finegrain.models.onnx_model import load_onnx_model
from finegrain.errors import FinegrainError  # noqa: E402

CORPUS = Path(__file__).parent / "corpus" / "exported"
ZIP_MAGIC = b"PK\x03\x04"
EXTRA = "finegrain.json"
# Numbers that a metadata value's digits become: edges of every bound, non-finite, huge, wrong type.
NUMBERS = ["0", "-1", "1", "2", "7", "13", "1000", "1001", "16384", "16385", "1000000", "1000001", "0.0", "1e308",
           "1e999", "NaN", "Infinity", "1" + "0" * 400, "true", "null", '"3"', "[]", "{}", "[" * 2000 + "]" * 2000]
NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
DIMS = [0, 1, 2, 3, 32, -1, 1 << 31, (1 << 63) - 1]
OPS = ["Identity", "Relu", "Gemm", "Reshape", "Expand", "Tile", "ConstantOfShape", "Loop", "If", "NoSuchOp", ""]
# Where an initializer's external data may point: outside the model's folder, a device, itself, nothing.
EXTERNAL = ["/dev/zero", "../../../dev/zero", "/etc/hostname", "input.onnx", "missing.bin", ""]
_workdir: list[Path] = []
fuzzing = False  # atheris.Mutate works only inside atheris.Fuzz()


def one_input(data: bytes) -> None:
    """Read `data` as an exported file (TorchScript if it is a zip, else ONNX); only FinegrainError may escape."""
    if not _workdir:
        _workdir.append(Path(tempfile.mkdtemp(prefix="fuzz_exported_", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                              else None)))
        atexit.register(shutil.rmtree, _workdir[0], True)
    zipped = data.startswith(ZIP_MAGIC)
    path = _workdir[0] / ("input.pt" if zipped else "input.onnx")
    path.write_bytes(data)
    try:
        describe(path)
        if not zipped:
            load_onnx_model(path, threads=1)
    except FinegrainError:
        pass


# ---------------------------------------------------------------- structure-aware mutator
def mutate_text(text: str, rng: random.Random) -> str:
    """libFuzzer's mutations of a text while fuzzing; one random character otherwise."""
    raw = text.encode()
    if fuzzing:
        raw = atheris.Mutate(raw, len(raw) + 64)
    elif raw:
        chars = bytearray(raw)
        chars[rng.randrange(len(chars))] = rng.randrange(32, 127)
        raw = bytes(chars)
    return raw.decode("utf-8", "replace")


def mutate_metadata(metadata: dict[str, str], rng: random.Random) -> None:
    """One edit of a metadata map: a value's text, a number in a value, or a key."""
    if not metadata:
        metadata["finegrain.export"] = "{}"
        return
    key, choice = rng.choice(sorted(metadata)), rng.randrange(10)
    value = str(metadata[key])
    if choice < 5:
        metadata[key] = mutate_text(value, rng)
    elif choice < 8:
        spans = [m.span() for m in NUMBER.finditer(value)]
        start, end = rng.choice(spans) if spans else (0, len(value))
        metadata[key] = value[:start] + rng.choice(NUMBERS) + value[end:]
    else:  # renamed, dropped, or moved onto another key
        metadata.pop(key)
        if rng.random() < 0.7:
            metadata[mutate_text(key, rng) if rng.random() < 0.5 else rng.choice(sorted(metadata) or [key])] = value


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """One structured change to a well-formed file (19 in 20), else libFuzzer's raw mutations."""
    rng = random.Random(seed)
    if rng.randrange(20):
        try:
            changed = mutate_zip(data, rng) if data.startswith(ZIP_MAGIC) else mutate_onnx(data, rng)
        except Exception:  # noqa: BLE001 - a container already mutated out of shape: mutate its bytes
            changed = None
        if changed is not None:
            return changed[:max_size]
    return atheris.Mutate(data, max_size) if fuzzing else data


def mutate_onnx(data: bytes, rng: random.Random) -> bytes | None:
    import onnx

    model = onnx.ModelProto.FromString(data)
    graph, choice = model.graph, rng.randrange(16)
    if choice < 8:
        metadata = {p.key: p.value for p in model.metadata_props}
        mutate_metadata(metadata, rng)
        del model.metadata_props[:]
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
    elif choice == 8:  # inputs and outputs: none, two, or one dropped; or a constant graph without input
        what = rng.choice([graph.input, graph.output])
        if graph.output and rng.random() < 0.2:
            del graph.node[:], graph.input[:]
            graph.initializer.add().CopyFrom(onnx.helper.make_tensor(graph.output[0].name, onnx.TensorProto.FLOAT,
                                                                     [1, 1], [0.0]))
        elif what and rng.random() < 0.5:
            del what[rng.randrange(len(what))]
        elif what:
            what.add().CopyFrom(what[0])
    elif choice == 9 and graph.input:  # an input's type or a dim
        tensor = graph.input[0].type.tensor_type
        if rng.random() < 0.5 or not tensor.shape.dim:
            tensor.elem_type = rng.randrange(-1, 25)
        else:
            dim = tensor.shape.dim[rng.randrange(len(tensor.shape.dim))]
            dim.dim_value = rng.choice(DIMS) if rng.random() < 0.7 else 0
    elif choice == 10:
        if model.opset_import and rng.random() < 0.7:
            entry = model.opset_import[rng.randrange(len(model.opset_import))]
            entry.version, entry.domain = rng.choice([0, 1, 6, 7, 13, 17, 99, 1 << 40]), rng.choice(["", "", "x"])
        else:
            model.ir_version = rng.choice([0, 1, 3, 7, 8, 10, 11, 99])
    elif choice == 11 and graph.node:  # a node's operator, an input name, or the node gone
        node, what = graph.node[rng.randrange(len(graph.node))], rng.randrange(3)
        if what == 0:
            node.op_type = rng.choice(OPS)
        elif what == 1 and node.input:
            node.input[rng.randrange(len(node.input))] = rng.choice(["", "images", "missing", node.name])
        else:
            graph.node.remove(node)
    elif choice == 12 and graph.initializer:  # an initializer's dims or data, or its data in another file
        tensor = graph.initializer[rng.randrange(len(graph.initializer))]
        if rng.random() < 0.2:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", rng.choice(EXTERNAL)), ("offset", rng.choice(["0", "-1", "8"])),
                               ("length", str(rng.choice([0, 12, 36, 1 << 40])))):
                tensor.external_data.add(key=key, value=value)
        elif tensor.dims and rng.random() < 0.5:
            tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice(DIMS)
        else:
            tensor.raw_data = tensor.raw_data[:rng.randrange(len(tensor.raw_data) + 1)] + bytes(rng.randrange(8))
    elif choice >= 13 and fuzzing:  # the raw bytes of one metadata value, through the protobuf
        if model.metadata_props:
            prop = model.metadata_props[rng.randrange(len(model.metadata_props))]
            raw = atheris.Mutate(prop.value.encode(), len(prop.value) + 64)
            prop.value = raw.decode("utf-8", "surrogateescape").encode("utf-8", "replace").decode("utf-8", "replace")
    return model.SerializeToString()


def mutate_zip(data: bytes, rng: random.Random) -> bytes | None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    extra = next((i for i, (info, _) in enumerate(entries) if info.filename.endswith("/extra/" + EXTRA)), None)
    choice = rng.randrange(12)
    if extra is not None and choice < 7:
        info, text = entries[extra]
        try:
            metadata = json.loads(text)
        except (ValueError, RecursionError):
            metadata = None
        if isinstance(metadata, dict) and choice < 5:
            mutate_metadata(metadata, rng)
            text = json.dumps(metadata).encode()
        elif fuzzing:  # the raw JSON text
            text = atheris.Mutate(text, len(text) + 128)
        entries[extra] = (info, text)
    elif extra is not None and choice == 7:  # the entry moved out of extra/
        entries[extra][0].filename = rng.choice(["archive/extra/other.json", "archive/" + EXTRA, "extra/" + EXTRA])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for info, content in entries:
            if choice == 8 and rng.random() < 0.5:
                info.compress_type = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                                 zipfile.ZIP_LZMA])
            archive.writestr(info, content)
    written = out.getvalue()
    return patch_zip_header(written, rng) if choice >= 9 else written


def patch_zip_header(data: bytes, rng: random.Random) -> bytes:
    """One field of a local or central header overwritten: flags, method, CRC, sizes, name length."""
    signature = rng.choice([b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"])
    offsets = [m.start() for m in re.finditer(re.escape(signature), data)]
    if not offsets:
        return data
    at = rng.choice(offsets)
    fields = {b"PK\x03\x04": [(6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
              b"PK\x01\x02": [(8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (42, 4)],
              b"PK\x05\x06": [(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]}[signature]
    offset, size = rng.choice(fields)
    value = rng.choice([0, 1, 8, 9, 12, 14, 99, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << (8 * size))])
    out = bytearray(data)
    out[at + offset:at + offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return bytes(out)


# ---------------------------------------------------------------- seeds
def write_seeds() -> None:
    """Minimal graphs with the metadata of real finegrain exports (each a few KB).

    The metadata is what `export_metadata` writes for the checkpoint corpus' models; the graphs
    are hand-made (pooling and a linear head, or a normalised embedding), which is all the
    reader needs and keeps each seed tiny. The TorchScript seed is a traced linear head.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from finegrain.export.metadata import TORCHSCRIPT_EXTRA, export_metadata
    from finegrain.models import load_model
    from finegrain.models.onnx_model import ExportSpec

    checkpoints = CORPUS.parent / "checkpoint"
    classifier = load_model(checkpoints / "mobilenet_w1.safetensors")
    embedder = load_model(checkpoints / "r50d_sk_embedder.safetensors")
    CORPUS.mkdir(parents=True, exist_ok=True)

    def save(name: str, nodes: list, inputs: list, output: Any, initializers: list, metadata: dict) -> None:
        graph = helper.make_graph(nodes, "finegrain", inputs, [output], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="finegrain")
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(model)
        onnx.save(model, str(CORPUS / name))

    classes = len(classifier.info.classes)
    spec = ExportSpec(output="logits", input_kind="float_nchw", resolution=32, opset=17)
    save("logits_dynamic_batch.onnx",
         [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
          helper.make_node("Flatten", ["pooled"], ["features"]),
          helper.make_node("Gemm", ["features", "weight", "bias"], ["output"])],
         [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
         helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes]),
         [numpy_helper.from_array(np.eye(3, classes, dtype=np.float32), "weight"),
          numpy_helper.from_array(np.zeros(classes, np.float32), "bias")],
         export_metadata(classifier, spec))
    spec = ExportSpec(output="embedding", input_kind="uint8_nhwc", resolution=32, batch=2, opset=17)
    save("embedding_uint8_batch2.onnx",
         [helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
          helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
          helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
          helper.make_node("Flatten", ["pooled"], ["features"]),
          helper.make_node("LpNormalization", ["features"], ["output"], axis=1, p=2)],
         [helper.make_tensor_value_info("images", TensorProto.UINT8, [2, 32, 32, 3])],
         helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3]), [],
         export_metadata(embedder, spec))
    head = torch.jit.trace(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                               torch.nn.Linear(3, classes)), torch.zeros(1, 3, 32, 32))
    spec = ExportSpec(output="logits", input_kind="float_nchw", resolution=32)
    torch.jit.save(head, str(CORPUS / "logits_head.pt"),
                   _extra_files={TORCHSCRIPT_EXTRA: json.dumps(export_metadata(classifier, spec))})
    for path in sorted(CORPUS.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


def main() -> None:
    global fuzzing
    if "--write-seeds" in sys.argv:
        write_seeds()
    elif atheris is None:
        sys.exit('atheris is not installed: pip install -e ".[fuzz]" (tests/test_fuzz_replay.py replays the '
                 "corpus without it).")
    else:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # its log of every refused graph would drown libFuzzer's
        fuzzing = True
        atheris.Setup(sys.argv, one_input, custom_mutator=mutate)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
