"""`finegrain export`: every architecture family computes in onnxruntime and TorchScript what the
PyTorch fast path computes; the demo's top-1 and Recall@1 are the same through the exported file;
the metadata is enough to feed the file; bad input gets one message."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import finegrain
from finegrain.cli import app
from finegrain.data import ImageDataset, demo_root, load_splits
from finegrain.data.loaders import eval_loader
from finegrain.data.transforms import eval_transform
from finegrain.errors import FinegrainError
from finegrain.eval.classification import predict_logits, topk_accuracy
from finegrain.eval.embed import image_transform
from finegrain.eval.inference import InferenceOptions, Predictor
from finegrain.eval.retrieval import retrieval_metrics
from finegrain.eval.retrieval_eval import embed_loader
from finegrain.export.api import TOLERANCE, export_checkpoint, relative_difference
from finegrain.export.graph import fast_path, reference_outputs
from finegrain.export.metadata import describe
from finegrain.models.onnx_model import load_onnx_model
from finegrain.models import load_model, save_model, variant
from finegrain.preprocessing import Preprocessing
from test_models import randomize_bn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
CPU = torch.device("cpu")
# (architecture, reduced-width overrides, embedder?, the paper's resolution). BL models run at
# any size >= 32 as in PyTorch; the other resolution is 48, not a multiple of 32.
SLOW = pytest.mark.slow  # over a minute each on 2 shared cores
FAMILIES = [
    pytest.param("resnet50", {"base_width": 8}, False, 224, id="resnet50"),
    pytest.param("resnet50d", {"base_width": 8}, False, 224, id="resnet50d"),
    pytest.param("r50d_sk", {"base_width": 8}, False, 224, id="r50d_sk", marks=SLOW),
    pytest.param("r50d_sk_bl", {"base_width": 8}, False, 256, id="r50d_sk_bl", marks=SLOW),
    pytest.param("assemble_resnet50", {"base_width": 8}, False, 256, id="assemble_resnet50", marks=SLOW),
    pytest.param("assemble_resnet152", {"base_width": 4}, False, 256, id="assemble_resnet152", marks=SLOW),
    pytest.param("mobilenet_v1", {"base_width": 8}, False, 224, id="mobilenet_v1"),
    # The retrieval embedder: GeM, stride-free Stage 4, 1x1 embedding + BN, L2 normalisation.
    pytest.param("assemble_resnet50", {"base_width": 8}, True, 224, id="embedder"),
    pytest.param("timm/test_resnet", {}, False, 160, id="timm"),
]
OTHER_RESOLUTION = 48


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core CPU it is the fastest (see test_trainer.one_thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(folder: Path, name: str, overrides: dict, embedder: bool, classes: int = 5) -> Path:
    torch.manual_seed(0)
    if embedder:
        model = finegrain.create_embedder(name, embedding_size=16, **overrides)
    else:
        model = finegrain.create_model(name, num_classes=classes, **overrides)
    randomize_bn(model.eval())
    for module_name, module in model.named_modules():
        if module_name.endswith("bn3"):
            # Residual branches damped as in a trained network: a random 152-layer one amplifies
            # every rounding difference chaotically (1e-7 per layer -> 1e-4 at the logits).
            module.weight.data.mul_(0.2)
    return save_model(model, folder / f"{name.replace('/', '_')}.safetensors",
                      task="retrieval" if embedder else "fgvc")


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def fails_with(result, pattern: str) -> None:
    assert isinstance(result.exception, FinegrainError), result.output
    assert re.search(pattern, str(result.exception)), str(result.exception)


@pytest.mark.parametrize("name,overrides,embedder,paper_resolution", FAMILIES)
def test_onnx_and_torchscript_equal_the_fast_path(name, overrides, embedder, paper_resolution, tmp_path):
    if not name.startswith("timm/") and not embedder:
        assert variant(name).resolution == paper_resolution
    weights = make_checkpoint(tmp_path, name, overrides, embedder)
    predictor = fast_path(load_model(weights))
    task = "embed" if embedder else "classify"
    for resolution in (paper_resolution, OTHER_RESOLUTION):
        onnx_file = export_checkpoint(weights, tmp_path / f"{resolution}.onnx", "onnx", resolution=resolution).path
        script_file = export_checkpoint(weights, tmp_path / f"{resolution}.pt", "torchscript",
                                        resolution=resolution).path
        onnx_model = load_onnx_model(onnx_file, threads=1)
        scripted = torch.jit.load(str(script_file))  # our own file, just written
        for batch in (1, 3):
            images = torch.randn(batch, 3, resolution, resolution)
            expected = reference_outputs(predictor, task, images)
            from_onnx = onnx_model.forward_embedding(images) if embedder else onnx_model(images)
            with torch.no_grad():
                from_script = scripted(images)
            assert from_onnx.shape == from_script.shape == expected.shape
            assert relative_difference(from_onnx, expected) <= TOLERANCE
            assert relative_difference(from_script, expected) <= TOLERANCE


# ------------------------------------------------------------------------------ on the demo
@pytest.fixture(scope="module")
def demo_classifier(tmp_path_factory) -> Path:
    """A classifier of the demo's 16 classes evaluated at 70 -> 64 px (random weights: what is
    compared is the same network through two runtimes, image by image)."""
    folder = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = finegrain.create_model("assemble_resnet50", num_classes=16, base_width=8).eval()
    randomize_bn(model)
    pre = model.preprocessing
    model.preprocessing = Preprocessing(pre.mean, pre.std, 64, 70, 64)
    classes = load_splits("folder", demo_root())["test"].classes
    return save_model(model, folder / "demo.safetensors", classes=tuple(classes), task="fgvc")


def demo_loader(model, split: str, kind: str = "folder"):
    """The demo photos as `finegrain eval` (classifiers) or the index (embedders) preprocess them."""
    samples = load_splits(kind, demo_root())[split].samples
    transform = image_transform(model, model.preprocessing) if kind == "folder_zeroshot" else \
        eval_transform(model.preprocessing)
    return eval_loader(ImageDataset(samples, transform), 32, 0, False)


def test_demo_top1_is_the_same_through_the_exported_file(demo_classifier, tmp_path):
    model = load_model(demo_classifier)
    loader = demo_loader(model, "test")
    logits, labels = predict_logits(model, loader, CPU)
    exported = load_onnx_model(export_checkpoint(demo_classifier, tmp_path / "demo.onnx").path, threads=1)
    # The predictor's fast path takes the exported file as it takes a model.
    onnx_logits, onnx_labels = Predictor(exported, CPU, InferenceOptions.fast(CPU)).predict(loader)
    assert torch.equal(onnx_labels, labels)
    assert relative_difference(onnx_logits, logits) <= TOLERANCE
    assert torch.equal(onnx_logits.argmax(1), logits.argmax(1))  # image by image
    assert topk_accuracy(onnx_logits, labels) == topk_accuracy(logits, labels)


def test_demo_recall_at_1_is_the_same_through_the_exported_file(tmp_path):
    weights = make_checkpoint(tmp_path, "assemble_resnet50", {"base_width": 8}, embedder=True)
    model = load_model(weights)
    model_pre = model.preprocessing.with_eval_size(64)
    exported = load_onnx_model(export_checkpoint(weights, tmp_path / "e.onnx", resolution=64).path, threads=1)
    assert exported.preprocessing == model_pre
    model.preprocessing = model_pre
    loader = demo_loader(model, "test", "folder_zeroshot")
    embeddings, labels = embed_loader(model, loader, CPU)
    onnx_embeddings, onnx_labels = embed_loader(exported, loader, CPU)
    assert relative_difference(onnx_embeddings, embeddings) <= TOLERANCE
    expected = retrieval_metrics(embeddings, labels, (1, 2))
    assert retrieval_metrics(onnx_embeddings, onnx_labels, (1, 2)).recall == expected.recall


def test_eval_and_index_take_the_exported_file_as_weights(demo_classifier, tmp_path):
    """The deployed artefact checked with the same commands: `finegrain eval` gives the checkpoint's
    top-1 through the .onnx file, and an index built through an exported embedder finds each of
    its photos first."""
    assert run("export", "--weights", demo_classifier, "--out", tmp_path / "demo.onnx").exit_code == 0
    scores = []
    for weights in (demo_classifier, tmp_path / "demo.onnx"):
        result = run("eval", "--weights", weights, "--data", demo_root(), "--json", "--workers", "0", "--quiet")
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout))
    assert scores[0]["images"] == scores[1]["images"] == 160 and scores[0]["top1"] == scores[1]["top1"], scores
    photos = tmp_path / "photos"
    for name in ("Lemon", "Braeburn"):
        (photos / name).mkdir(parents=True)
        for path in sorted((demo_root() / "test" / name).glob("*.jpg"))[:3]:
            (photos / name / path.name).write_bytes(path.read_bytes())
    embedder = make_checkpoint(tmp_path, "assemble_resnet50", {"base_width": 8}, embedder=True)
    assert run("export", "--weights", embedder, "--out", tmp_path / "e.onnx", "--resolution", "64").exit_code == 0
    built = run("index", "build", "--weights", tmp_path / "e.onnx", "--images", photos, "--out", tmp_path / "idx")
    assert built.exit_code == 0, built.output
    queries = sorted(photos.glob("*/*.jpg"))
    found = run("index", "search", "--index", tmp_path / "idx", *queries, "--k", "1", "--json")
    assert found.exit_code == 0, found.output
    results = json.loads(found.stdout)["results"]
    assert [Path(r["neighbours"][0]["path"]).name for r in results] == [q.name for q in queries], results


def test_pixels_in_the_graph_and_a_fixed_batch(demo_classifier, tmp_path):
    """--preprocess-in-graph: uint8 NHWC crops in, the same logits as normalised floats; a fixed
    batch of 4 still evaluates 160 images (the predictor pads the last chunk)."""
    model = load_model(demo_classifier)
    path = export_checkpoint(demo_classifier, tmp_path / "pixels.onnx", preprocess_in_graph=True, batch="4").path
    facts = describe(path)
    assert facts["input"]["layout"] == "NHWC" and facts["input"]["dtype"] == "uint8" and facts["input"]["batch"] == 4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    pre = model.preprocessing
    floats = (pixels.permute(0, 3, 1, 2).float() - torch.tensor(pre.mean).view(1, 3, 1, 1)) / \
        torch.tensor(pre.std).view(1, 3, 1, 1)
    out = torch.from_numpy(session.run(None, {"images": pixels.numpy()})[0])
    assert relative_difference(out, reference_outputs(fast_path(model), "classify", floats)) <= TOLERANCE
    loader = demo_loader(model, "test")
    logits, labels = predict_logits(model, loader, CPU)
    onnx_logits, _ = predict_logits(load_onnx_model(path, threads=1), loader, CPU)
    assert onnx_logits.shape == logits.shape
    assert topk_accuracy(onnx_logits, labels) == topk_accuracy(logits, labels)


def test_inspect_prints_what_a_consumer_needs(demo_classifier, tmp_path):
    path = tmp_path / "demo.pt"
    assert run("export", "--weights", demo_classifier, "--format", "torchscript", "--out", path).exit_code == 0
    result = run("export", "--inspect", path, "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    model = load_model(demo_classifier)
    assert facts["format"] == "torchscript" and facts["arch"] == "assemble_resnet50"
    assert facts["classes"] == list(model.info.classes) and facts["output"] == "logits"
    assert facts["preprocessing"]["mean"] == list(model.preprocessing.mean)
    assert (facts["preprocessing"]["resize"], facts["preprocessing"]["crop"]) == (70, 64)
    assert facts["input"] == {"name": "images", "layout": "NCHW", "dtype": "float32", "color": "RGB",
                              "range": "(pixel - mean) / std, pixels in 0-255 RGB", "height": 64, "width": 64,
                              "batch": "dynamic"}
    printed = run("export", "--inspect", path)
    assert printed.exit_code == 0 and "assemble_resnet50" in printed.output and "Golden 1" in printed.output


@pytest.mark.slow
def test_int8_is_quantized_and_runs_through_the_predictor(demo_classifier, tmp_path):
    """INT8 calibrated on the demo's training photos: QDQ nodes with per-channel weight scales,
    smaller than FP32, and finite logits for every test photo. What it costs in top-1 on a
    trained demo model is measured by benchmarks/export_speed.py (benchmarks/RESULTS.md)."""
    import onnx

    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert run("export", "--weights", demo_classifier, "--out", fp32).exit_code == 0
    result = run("export", "--weights", demo_classifier, "--out", int8, "--quantize", "int8", "--calibrate",
                 demo_root() / "train")
    assert result.exit_code == 0, result.output
    assert describe(int8)["quantized"] == "int8" and int8.stat().st_size < fp32.stat().st_size / 2
    graph = onnx.load(str(int8)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    scales = {init.name: init for init in graph.initializer}
    per_channel = [node for node in graph.node if node.op_type == "DequantizeLinear"
                   and len(scales.get(node.input[1], onnx.TensorProto()).dims) == 1]
    assert per_channel  # weight scales are vectors: one per output channel
    model = load_model(demo_classifier)
    int8_logits, labels = predict_logits(load_onnx_model(int8, threads=1), demo_loader(model, "test"), CPU)
    assert int8_logits.shape == (160, 16) and torch.isfinite(int8_logits).all() and len(labels) == 160


# ------------------------------------------------------------------------------ bad input
def test_bad_input_gets_one_clear_message(tmp_path, monkeypatch):
    weights = make_checkpoint(tmp_path, "r50d_sk", {"base_width": 8}, embedder=False)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in load_model(weights).state_dict().items()}, str(plain))
    fails_with(run("export", "--weights", plain, "--out", tmp_path / "x.onnx"), "no finegrain metadata")
    fails_with(run("export", "--weights", weights, "--out", tmp_path / "x.bin", "--format", "tflite"),
               "Unknown format 'tflite'.*onnx.*torchscript")
    fails_with(run("export", "--weights", weights, "--out", tmp_path / "x.onnx", "--opset", "11", "--resolution", "32"),
               r"r50d_sk cannot be exported to ONNX opset 11.*unflatten.*Pass --opset 13 or later")
    fails_with(run("export", "--weights", weights, "--out", tmp_path / "x.onnx", "--quantize", "int8"),
               "needs --calibrate")
    fails_with(run("export", "--weights", weights, "--out", tmp_path / "x.onnx", "--batch", "many"),
               "--batch must be 'dynamic'")
    fails_with(run("export", "--weights", weights, "--out", tmp_path / "x.onnx", "--opset", "5"),
               "onnxruntime runs ONNX opset 7 or later")
    assert not (tmp_path / "x.onnx").exists()
    fails_with(run("export", "--inspect", weights), "neither an ONNX file")
    fails_with(run("export", "--inspect", tmp_path / "missing.onnx"), "does not exist")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk" * 10)
    fails_with(run("export", "--inspect", tmp_path / "junk.onnx"), "junk.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    fails_with(run("export", "--weights", weights, "--out", tmp_path / "x.onnx"),
               re.escape("pip install 'finegrain[export]'"))


def test_damaged_export_metadata_is_refused_by_name(tmp_path):
    import onnx

    weights = make_checkpoint(tmp_path, "resnet50", {"base_width": 8}, embedder=False)
    path = export_checkpoint(weights, tmp_path / "m.onnx", resolution=32).path
    graph = onnx.load(str(path))
    for prop in graph.metadata_props:
        if prop.key == "finegrain.export":
            prop.value = prop.value.replace('"resolution": 32', '"resolution": -5')
        if prop.key == "finegrain.num_classes":
            prop.value = "5"
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    with pytest.raises(FinegrainError, match="bad.onnx: metadata finegrain.export resolution"):
        load_onnx_model(tmp_path / "bad.onnx")
    del graph.metadata_props[:]
    onnx.save(graph, str(tmp_path / "bare.onnx"))
    with pytest.raises(FinegrainError, match="not made by `finegrain export`"):
        describe(tmp_path / "bare.onnx")
    with pytest.raises(FinegrainError, match="exported for 32x32 inputs"):
        load_onnx_model(path)(torch.zeros(1, 3, 48, 48))


def test_a_graph_without_its_input_or_a_damaged_torchscript_zip_is_refused():
    """Defects the exported-file fuzzer found (tests/fuzz/fuzz_exported.py), each one clear message."""
    found = Path(__file__).parent / "fuzz" / "regressions" / "exported"
    with pytest.raises(FinegrainError, match="does not match its metadata.*one float input"):
        load_onnx_model(found / "graph_without_input.onnx")
    for name in ("torchscript_encrypted_flag.pt", "torchscript_compression_method_99.pt",
                 "torchscript_broken_deflate_stream.pt"):
        with pytest.raises(FinegrainError, match="not a readable TorchScript archive"):
            describe(found / name)
