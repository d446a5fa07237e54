"""The model zoo: one configurable ResNet, MobileNet-V1, and named variants as data.

registry.py: the variants and the bounds of every override; factory.py: building models (by
name, from a checkpoint, as an embedder); checkpoint.py: weights files; metadata.py: what a
checkpoint records (CheckpointInfo), its one reader and writer.
"""
from finegrain.layers.drop_block import set_drop_block_keep_prob
from finegrain.models.checkpoint import read_weights, save_model
from finegrain.models.factory import create_embedder, create_model, load_backbone_weights, load_model
from finegrain.models.metadata import CheckpointInfo, DataRecord, check_classes, read_info
from finegrain.models.registry import VARIANTS, Variant, check_overrides, variant

__all__ = [
    "VARIANTS", "CheckpointInfo", "DataRecord", "Variant", "check_classes", "check_overrides", "create_embedder",
    "create_model", "load_backbone_weights", "load_model", "read_info", "read_weights", "save_model",
    "set_drop_block_keep_prob", "variant",
]
