"""The model zoo: one configurable ResNet, MobileNet-V1, and named variants as data."""
from finegrain.layers.drop_block import set_drop_block_keep_prob
from finegrain.models.checkpoint import (
    create_embedder,
    create_model,
    load_backbone_weights,
    load_model,
    read_weights,
    save_model,
)
from finegrain.models.registry import VARIANTS, Variant, variant

__all__ = [
    "VARIANTS", "Variant", "create_embedder", "create_model", "load_backbone_weights", "load_model",
    "read_weights", "save_model", "set_drop_block_keep_prob", "variant",
]
