"""Named variants as data, and `create_model` / `create_embedder` that build them.

Each variant is a family plus the config fields that differ from that family's defaults, the
preprocessing its weights expect by default, and the resolution the paper evaluates it at.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from finegrain.errors import FinegrainError
from finegrain.models.mobilenet import MobileNetConfig, MobileNetV1
from finegrain.models.resnet import ResNet, ResNetConfig
from finegrain.preprocessing import IMAGENET, Preprocessing

BL_EVAL = dataclasses.replace(IMAGENET, resize=292, crop=256)
FAMILIES: dict[str, tuple[type, type]] = {"resnet": (ResNet, ResNetConfig), "mobilenet": (MobileNetV1, MobileNetConfig)}


@dataclass(frozen=True)
class Variant:
    family: str
    config: dict[str, Any]
    description: str
    preprocessing: Preprocessing = IMAGENET
    resolution: int = 224
    fields: dict[str, Any] = field(default_factory=dict)


R50, R101, R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)
BL50, BL101, BL152 = (3, 4, 6, 3), (4, 8, 18, 3), (5, 12, 30, 3)
D = {"stem": "deep", "shortcut": "avg_d"}
SK = {"sk": "doubled"}
DB = {"drop_block_stages": (3, 4)}
BL_R50 = {"stem": "biglittle", "shortcut": "biglittle", "biglittle": (2, 4), "layers": BL50}
BL_R152 = {"stem": "biglittle", "shortcut": "biglittle", "biglittle": (1, 2), "layers": BL152}
AA3 = {"aa_filter": 3}

VARIANTS: dict[str, Variant] = {
    "resnet50": Variant("resnet", {"layers": R50}, "ResNet-50 (torchvision layout), Table 7 E0"),
    "resnet101": Variant("resnet", {"layers": R101}, "ResNet-101 (torchvision layout)"),
    "resnet152": Variant("resnet", {"layers": R152}, "ResNet-152 (torchvision layout)"),
    "resnet50d": Variant("resnet", {**D}, "ResNet-50-D (timm layout), Table 6 T1"),
    "r50d_se": Variant("resnet", {**D, "se_reduction": 16, **DB}, "R50D+SE, Table 7 E4/E5"),
    "r50d_sk": Variant("resnet", {**D, **SK, **DB}, "R50D+SK (3x3 doubled, r=2), Table 6 T2 / Table 7 E6"),
    "r50d_sk_bl": Variant("resnet", {**BL_R50, **SK, **DB}, "R50D+SK+BL (release version 2), Table 6 T4",
                          BL_EVAL, 256),
    "assemble_resnet50": Variant("resnet", {**BL_R50, **SK, **AA3, **DB},
                                 "Assemble-ResNet-50: R50D+SK+BL+AA, the released model (E11)", BL_EVAL, 256),
    "assemble_resnet101": Variant("resnet", {**BL_R50, "layers": BL101, **SK, **AA3, **DB},
                                  "Assemble-ResNet-101 (BL depth [4, 8, 18, 3])", BL_EVAL, 256),
    "assemble_resnet152": Variant("resnet", {**BL_R152, **SK, **AA3, **DB},
                                  "Assemble-ResNet-152 (alpha 1, beta 2), Table 7 E12", BL_EVAL, 256),
    # Table 2: channel attention on plain ResNet-50.
    "r50_se": Variant("resnet", {"se_reduction": 16}, "Table 2 C1: R50+SE"),
    "r50_sk_original": Variant("resnet", {"sk": "original"}, "Table 2 C2: R50+SK 3x3+5x5, r=2"),
    "r50_sk": Variant("resnet", {**SK}, "Table 2 C3: R50+SK 3x3 2x-channel, r=2"),
    "r50_sk_r16": Variant("resnet", {**SK, "sk_reduction": 16}, "Table 2 C4: R50+SK, r=16"),
    "r50_sk_se": Variant("resnet", {**SK, "se_reduction": 16}, "Table 2 C5: R50+SK+SE"),
    # Table 3: where anti-aliasing goes.
    "r50_aa5_all": Variant("resnet", {"aa_filter": 5, "aa_on_maxpool": True, "aa_on_projection": True},
                           "Table 3 A1: AA filter 5 on max-pool, projection and strided conv"),
    "r50_aa3_all": Variant("resnet", {**AA3, "aa_on_maxpool": True, "aa_on_projection": True},
                           "Table 3 A2: AA filter 3 on max-pool, projection and strided conv"),
    "r50_aa3_pool_conv": Variant("resnet", {**AA3, "aa_on_maxpool": True}, "Table 3 A3: AA 3 on max-pool and strided conv"),
    "r50_aa3_conv": Variant("resnet", {**AA3}, "Table 3 A4: AA 3 on strided conv only (the paper's choice)"),
    # Table 6 steps not named above.
    "r50d_sk_bl_aa": Variant("resnet", {**BL_R50, **SK, **AA3, **DB}, "Table 6 T5 (= assemble_resnet50)", BL_EVAL, 256),
    "mobilenet_v1": Variant("mobilenet", {}, "MobileNet-V1, Table 9 M0"),
    "se_mobilenet_v1": Variant("mobilenet", {"se_reduction": 16}, "SE-MobileNet-V1 r=16, Table 9 M1"),
    "se_mobilenet_v1_r2": Variant("mobilenet", {"se_reduction": 2, "drop_block": True},
                                  "SE-MobileNet-V1 r=2 + DropBlock, Table 9 M6-M8"),
}


def variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise FinegrainError(
            f"Unknown model {name!r}. Valid names: {', '.join(sorted(VARIANTS))} (or timm/NAME)."
        ) from None


def build_config(name: str, num_classes: int, overrides: dict[str, Any]) -> Any:
    """The variant's config with `num_classes` and user overrides, each override checked by name."""
    spec = variant(name)
    config_cls = FAMILIES[spec.family][1]
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise FinegrainError(f"Unknown override(s) {unknown} for {name!r}. Valid overrides: {', '.join(sorted(valid))}.")
    values = {**spec.config, **overrides, "num_classes": num_classes}
    values = {key: tuple(v) if isinstance(v, list) else v for key, v in values.items()}
    return config_cls(**values)


def build(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build a registered variant with random weights and attach its identity and preprocessing."""
    spec = variant(name)
    model = FAMILIES[spec.family][0](build_config(name, num_classes, overrides))
    model.arch = name
    model.overrides = dict(overrides)
    model.preprocessing = spec.preprocessing
    return model
