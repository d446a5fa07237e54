"""Deploying a trained model: `finegrain export` to ONNX (optionally INT8) and TorchScript, with
the metadata a consumer needs, and running an exported ONNX file behind the predictor's model
interface so `finegrain eval` and `finegrain index` check the deployed artefact itself.

api.py: the one entry point; graph.py: the network as the fast path runs it; onnx_export.py,
torchscript_export.py, quantize.py: the writers; metadata.py: what a file says and --inspect.
Reading and running an exported ONNX file is models/onnx_model.py, beside the checkpoint readers.
"""
