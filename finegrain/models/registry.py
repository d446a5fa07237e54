"""Named variants as data, the bounds of every config field, and `build` (random weights).

Each variant is a family plus the config fields that differ from that family's defaults, the
preprocessing its weights expect by default, and the resolution the paper evaluates it at.
`check_overrides` is the one validation of user- or file-given overrides (recipes, checkpoint
metadata); the factories that load weights live in models/factory.py.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

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


# ------------------------------------------------------------------------------- bounds
# Far beyond any real network, yet small enough that no value builds a model for minutes or
# allocates without limit (ResNet-152 has 36 blocks in a stage; 64 is the standard width).
MAX_BLOCKS_PER_STAGE = 100
MAX_WIDTH = 1024
MAX_CLASSES = 1_000_000
TIMM_NAME = re.compile(r"timm/[A-Za-z0-9_.\-]{1,100}")
Check = Callable[[Any], bool]


def _int(low: int, high: int) -> tuple[Check, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high), f"an integer in [{low}, {high}]"


def _float(low: float, high: float) -> tuple[Check, str]:
    # Bounds first: NaN fails them, and math.isfinite would overflow on a 400-digit JSON integer.
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
            and math.isfinite(v)), f"a number in [{low}, {high}]"


def _optional(rule: tuple[Check, str]) -> tuple[Check, str]:
    return (lambda v: v is None or rule[0](v)), f"{rule[1]}, or null"


def _one_of(*values: Any) -> tuple[Check, str]:
    return (lambda v: any(v is c or (type(v) is type(c) and v == c) for c in values)), \
        "one of " + ", ".join("null" if c is None else repr(c) for c in values)


def _ints(length: int, low: int, high: int, exact: bool = True) -> tuple[Check, str]:
    item = _int(low, high)[0]
    return (lambda v: isinstance(v, (list, tuple)) and (len(v) == length if exact else len(v) <= length)
            and all(item(x) for x in v)), \
        f"a list of {'' if exact else 'at most '}{length} integers in [{low}, {high}]"


def _floats(length: int, low: float, high: float) -> tuple[Check, str]:
    item = _float(low, high)[0]
    return (lambda v: isinstance(v, (list, tuple)) and len(v) == length and all(item(x) for x in v)), \
        f"a list of {length} numbers in [{low}, {high}]"


BOOL: tuple[Check, str] = (lambda v: isinstance(v, bool), "true or false")
FIELD_RULES: dict[str, dict[str, tuple[Check, str]]] = {
    "resnet": {
        "layers": _ints(4, 1, MAX_BLOCKS_PER_STAGE), "base_width": _int(2, MAX_WIDTH),
        "stem": _one_of("plain", "deep", "biglittle"), "maxpool_padding": _one_of("torch", "tf_same"),
        "shortcut": _one_of("conv", "avg_d", "biglittle"), "d_pool_at_stride1": BOOL,
        "biglittle": _optional(_ints(2, 1, 8)), "sk": _one_of(None, "doubled", "original"),
        "sk_reduction": _int(1, MAX_WIDTH), "sk_min_hidden": _int(1, MAX_WIDTH),
        "se_reduction": _optional(_int(1, MAX_WIDTH)), "aa_filter": _int(0, 7), "aa_on_conv": BOOL,
        "aa_on_projection": BOOL, "aa_on_maxpool": BOOL, "drop_block_stages": _ints(4, 1, 4, exact=False),
        "drop_block_size": _int(1, 64), "drop_block_gamma_scales": _floats(4, 0.0, 10.0), "zero_gamma": BOOL,
        "stage4_stride": _one_of(1, 2), "global_pool": _one_of("avg", "gem"), "gem_p": _float(0.1, 100.0),
        "gem_learnable": BOOL, "embedding_size": _int(0, 65536),
    },
    "mobilenet": {
        "base_width": _int(1, 256), "se_reduction": _optional(_int(1, MAX_WIDTH)), "drop_block": BOOL,
        "drop_block_size": _int(1, 64),
    },
    # timm builds its own models; only regularisation knobs that do not change a tensor's shape.
    "timm": {"drop_rate": _float(0.0, 0.99), "drop_path_rate": _float(0.0, 0.99)},
}


def family_of(name: str) -> str:
    """"timm" for timm/NAME, else the registered variant's family (an unknown name is refused)."""
    if name.startswith("timm/"):
        if not TIMM_NAME.fullmatch(name):
            raise FinegrainError(f"{name!r} is not a timm model name. Write timm/NAME, e.g. timm/resnet50d.")
        return "timm"
    return variant(name).family


def check_overrides(name: str, overrides: Mapping[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """The overrides of model `name`, each key known to its family and each value of the right type
    and within bounds (refused naming the key and its valid range); lists become tuples.

    Recipes call this before a run starts; checkpoint metadata passes through it before any model is
    built from it, so `layers: [3, 4, 200000, 3]` or `base_width: 0` never reach a constructor.
    """
    family = family_of(name)
    rules = FIELD_RULES[family]
    if not isinstance(overrides, Mapping):
        raise FinegrainError(f"The overrides of {name!r} must be a mapping of names to values, got "
                             f"{type(overrides).__name__}.")
    if "num_classes" in overrides:
        raise FinegrainError("num_classes is not an override: it comes from the data set (or the num_classes "
                             "argument). Remove it from the overrides.")
    if num_classes is not None and not _int(0, MAX_CLASSES)[0](num_classes):
        raise FinegrainError(f"num_classes must be an integer in [0, {MAX_CLASSES}], got {num_classes!r}.")
    unknown = sorted(str(key) for key in overrides if key not in rules)
    if unknown:
        raise FinegrainError(f"Unknown override(s) {unknown} for {name!r}. Valid overrides: {', '.join(sorted(rules))}.")
    for key, value in overrides.items():
        check, expected = rules[key]
        if not check(value):
            raise FinegrainError(f"Override {key} of {name!r} must be {expected}, got {reprlib.repr(value)}.")
    checked = {key: tuple(value) if isinstance(value, list) else value for key, value in overrides.items()}
    if family == "resnet":
        _check_resnet_combination(name, checked)
    return checked


def _check_resnet_combination(name: str, overrides: dict[str, Any]) -> None:
    """Combinations the fields' own bounds allow but the network cannot be built with."""
    values = {**variant(name).config, **overrides}
    if values.get("stem") != "biglittle" and not values.get("biglittle"):
        return
    layers, alpha, width = values.get("layers", (3, 4, 6, 3)), (values.get("biglittle") or (2, 4))[0], \
        values.get("base_width", 64)
    if values.get("biglittle") and min(layers[:3]) < 2:
        raise FinegrainError(f"BigLittle stages need at least 2 blocks each; {name!r} got layers {list(layers)}. "
                             "Use layers of 2 or more in stages 1-3.")
    if width < alpha:
        raise FinegrainError(f"base_width {width} of {name!r} is narrower than its BigLittle alpha {alpha}. "
                             f"Use a base_width of {alpha} or more.")


def build_config(name: str, num_classes: int, overrides: Mapping[str, Any]) -> Any:
    """The variant's config with `num_classes` and user overrides, each override checked."""
    spec = variant(name)
    config_cls = FAMILIES[spec.family][1]
    values = {**spec.config, **check_overrides(name, overrides, num_classes), "num_classes": num_classes}
    return config_cls(**values)


def build(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build a registered variant with random weights and attach its identity and preprocessing."""
    spec = variant(name)
    config = build_config(name, num_classes, overrides)
    try:
        model = FAMILIES[spec.family][0](config)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:  # a combination the bounds let through
        raise FinegrainError(f"{name!r} cannot be built with overrides {overrides} ({error}). "
                             "Change the overrides.") from None
    model.arch = name
    model.overrides = dict(overrides)
    model.preprocessing = spec.preprocessing
    return model
